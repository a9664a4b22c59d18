#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one run for a machine that has one (CI has none):
# issue #5's CUDA benchmark rows, with and without the layers' non-finite check (a host sync per
# layer), and the CUDA tests (AMP, torch.compile, CUDA graphs, the layers against the oracle).
#
#   bash scripts/cuda_checks.sh [OUTDIR]        # from the repository root; OUTDIR defaults to cuda-checks
#
# The package is used from the checkout (PYTHONPATH), so nothing is installed. Wheels in .whl/ (e.g. a
# newer timm, `pip download --no-deps timm -d .whl`) are unpacked first into /tmp/site, for machines
# that cannot reach a package index. Every step writes its log and JSON into OUTDIR and runs under
# its own time limit (560 s in all, inside a lent machine's 10-minute call), so one that hangs does not
# cost the others.
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
timeout 200 python3 scripts/benchmark.py --suite cuda --profile --output "$out/cuda_suite.json" 2>&1 \
    | tee "$out/cuda_suite.log" || status=1
timeout 120 python3 scripts/benchmark.py --suite cuda --no-literal --no-finite-check \
    --output "$out/cuda_suite_no_finite_check.json" 2>&1 | tee "$out/cuda_suite_no_finite_check.log" || status=1
timeout 240 python3 -m pytest tests/test_accelerated.py tests/test_layers.py -q -ra -p no:cacheprovider 2>&1 \
    | tee "$out/cuda_tests.log" || status=1
exit $status
