#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one run for a machine that has one (CI has none):
# issue #5's CUDA benchmark rows, the CUDA tests (AMP, CUDA graphs, the layers against the oracle),
# the rows again without the layers' non-finite check (a host sync per layer), the CIFAR row replayed
# as CUDA graphs and the ImageNet row compiled (torch.compile, same numerics).
#
#   bash scripts/cuda_checks.sh [OUTDIR]        # from the repository root; OUTDIR defaults to cuda-checks
#
# The package is used from the checkout (PYTHONPATH), so nothing is installed. Wheels in .whl/ (e.g. a
# newer timm, `pip download --no-deps timm -d .whl`) are unpacked first into /tmp/site, for machines
# that cannot reach a package index. Every step writes its log and JSON into OUTDIR and runs under
# its own time limit (560 s in all, inside a lent machine's 10-minute call), so one that hangs does not
# cost the others; the exit status is 1 if any failed.
set -uo pipefail
out=${1:-cuda-checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G '.whl/*.whl' > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python3 - <<'EOF' 2>&1 | tee "$out/machine.log" || exit 1
import timm, torch
assert torch.cuda.is_available(), 'no CUDA device: these checks need one'
print(f'torch {torch.__version__}, timm {timm.__version__}, {torch.cuda.get_device_name()}')
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >> "$out/machine.log" 2>&1

status=0
step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, its output in OUTDIR/NAME.log
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" || { echo "cuda_checks: $name failed or timed out" >&2; status=1; }
}
# In order of importance, 560 s in all.
step cuda_suite 170 python3 scripts/benchmark.py --suite cuda --profile --count-ops --output "$out/cuda_suite.json"
step cuda_tests 120 python3 -m pytest tests/test_accelerated.py tests/test_layers.py -k cuda -q -ra -p no:cacheprovider
step cuda_suite_no_finite_check 70 python3 scripts/benchmark.py --suite cuda --no-literal --no-finite-check \
    --output "$out/cuda_suite_no_finite_check.json"
# The CIFAR row is small enough to be bound by kernel launches: replayed as CUDA graphs.
step cifar_cuda_graphs 100 python3 scripts/benchmark.py --pair resnet18_cifar_deconv:resnet18_cifar --device cuda \
    --dtype bf16 --batch-size 128 --compile --compile-mode reduce-overhead --no-literal \
    --output "$out/cifar_cuda_graphs.json"
step imagenet_compiled 100 python3 scripts/benchmark.py --pair resnet18_deconv:resnet18 --device cuda --dtype bf16 \
    --batch-size 128 --img-size 224 --compile --no-literal --output "$out/imagenet_compiled.json"
exit $status
