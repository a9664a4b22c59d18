#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one run for a machine that has one (CI has none):
# issue #5's CUDA benchmark rows, the CUDA tests (AMP, CUDA graphs, the layers against the oracle),
# the rows again without the layers' non-finite check (a host sync per layer), the CIFAR row replayed
# as CUDA graphs and the ImageNet row compiled (torch.compile, same numerics).
#
#   bash scripts/cuda_checks.sh [OUTDIR]        # OUTDIR defaults to cuda-checks
#
# The package is used from the checkout (PYTHONPATH), so nothing is installed. Wheels in .whl/ (e.g. a
# newer timm, `pip download --no-deps timm -d .whl`) are installed first into /tmp/site, for machines
# that cannot reach a package index (.whl/ is git-ignored: a lent machine gets it only when the run
# carries it). OUTDIR gets one log of every step (cuda_checks.log) and each benchmark's JSON: five
# files, as a lent machine returns at most eight. The steps run in order of importance, each under its
# own time limit and all within 570 s of the start (inside a lent machine's 10-minute call; set
# CUDA_CHECKS_SECONDS for less), so one that hangs does not cost the earlier ones; a step the time
# left cannot hold is cut short or skipped.
# A suite's JSON is written after each of its cases. The exit status is 1 if any step failed, timed
# out or was skipped.
set -uo pipefail
out=$(mkdir -p "${1:-cuda-checks}" && cd "${1:-cuda-checks}" && pwd) || exit 1
cd "$(dirname "$0")/.." || exit 1
log=$out/cuda_checks.log
deadline=$((SECONDS + ${CUDA_CHECKS_SECONDS:-570}))
export PYTHONUNBUFFERED=1
if compgen -G '.whl/*.whl' > /dev/null; then
    # Without them the machine's own packages may still do, so a failed install does not end the run.
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl 2>&1 | tee -a "$log"; then
        export PYTHONPATH=/tmp/site
    else
        echo "cuda_checks: the wheels in .whl/ did not install; using the machine's packages" | tee -a "$log"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python3 - <<'EOF' 2>&1 | tee -a "$log" || exit 1
import timm, torch
assert torch.cuda.is_available(), 'no CUDA device: these checks need one'
print(f'torch {torch.__version__}, timm {timm.__version__}, {torch.cuda.get_device_name()}')
import deconv_zoo  # noqa: F401  (fails here, once, if this timm is too old for the zoo)
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$log"

status=0
step() {  # step NAME SECONDS COMMAND...: COMMAND under a time limit (cut to the time left), output in the log
    local name=$1 limit=$2 left=$((deadline - SECONDS)) start=$SECONDS rc
    shift 2
    if ((limit > left)); then
        limit=$left
    fi
    if ((limit < 30)); then
        echo "== $name: skipped, ${left} s left" | tee -a "$log"
        status=1
        return
    fi
    echo "== $name (limit $limit s): $*" | tee -a "$log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=$?
    echo "== $name: exit status $rc after $((SECONDS - start)) s" | tee -a "$log"
    if ((rc != 0)); then
        status=1
    fi
}
# In order of importance. Estimated on an H200 (not yet measured): about 60, 100, 40, 150 and 150 s;
# torch.compile takes most of the last two (the deconv model's training graph above all: about 2 min of
# inductor on the 2-core development VM for resnet18_cifar_deconv) and of the CUDA-graph test.
step cuda_suite 150 python3 scripts/benchmark.py --suite cuda --profile --count-ops --output "$out/cuda_suite.json"
# The layers' oracle tests first: the CUDA-graph test after them spends a minute or more compiling.
step cuda_tests 180 python3 -m pytest tests/test_layers.py tests/test_accelerated.py -k cuda -q -ra --durations=5 \
    -p no:cacheprovider
step cuda_suite_no_finite_check 90 python3 scripts/benchmark.py --suite cuda --no-literal --no-finite-check \
    --output "$out/cuda_suite_no_finite_check.json"
# The CIFAR row is small enough to be bound by kernel launches: replayed as CUDA graphs.
step cifar_cuda_graphs 240 python3 scripts/benchmark.py --pair resnet18_cifar_deconv:resnet18_cifar --device cuda \
    --dtype bf16 --batch-size 128 --compile --compile-mode reduce-overhead --no-literal \
    --output "$out/cifar_cuda_graphs.json"
step imagenet_compiled 240 python3 scripts/benchmark.py --pair resnet18_deconv:resnet18 --device cuda --dtype bf16 \
    --batch-size 128 --img-size 224 --compile --no-literal --output "$out/imagenet_compiled.json"
exit $status
