#!/usr/bin/env bash
# GPU check of the Triton kernels, as one prepared script (needs a CUDA GPU, a CUDA build of
# PyTorch, triton and this package installed: `pip install -e ".[all]"` over your own torch).
#
#   bash launch/gpu_check.sh            # PYTHON=/path/to/python to pick the interpreter
#
# 1. tests/kernels compiled for real: TRITON_INTERPRET is unset, so the kernel tests launch on
#    the GPU (fp32, fp16 and bf16); the 2-rank layer test still runs interpreted on CPU ranks.
# 2. the micro-benchmark of each kernel against its PyTorch twin at Switch-base-128 sizes
#    (d_model 768, 128 experts, 16k tokens, EP 8, 2 replica slots), bf16 rows, k = 1 and 2.
# Put the printed tables in the README's "Kernels" section.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
unset TRITON_INTERPRET
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

"$PY" - <<'PYEOF'
import torch, triton
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device (torch.cuda.is_available() is False)"
print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
PYEOF

echo "== kernel tests, compiled =="
# NOTE: a failing test must not cost the benchmark (device time is scarce): both run, and the
# script exits non-zero if either failed.
tests_rc=0
"$PY" -m pytest -q tests/kernels -p no:cacheprovider --durations=5 || tests_rc=$?

echo "== micro-benchmark: kernels vs twins, Switch-base-128 sizes, bf16 =="
bench_rc=0
for k in 1 2; do
    "$PY" -m ds_moe_replicate.bench.kernels --tokens 16384 --hidden 768 --experts 128 --k "$k" \
        --ep-size 8 --slots 2 --dtype bf16 --reps 50 --json "${OUT:-.}/bench_kernels_k$k.json" || bench_rc=$?
    echo
done
echo "kernel tests rc=$tests_rc, benchmark rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
