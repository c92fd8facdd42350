#!/usr/bin/env bash
# Everything that needs a GPU, as one prepared script (a CUDA build of PyTorch, triton and this
# package installed: `pip install -e ".[all]"` over your own torch).
#
#   bash launch/gpu_check.sh            # PYTHON=/path/to/python to pick the interpreter; OUT=dir for JSON
#
# 1. tests/kernels compiled (TRITON_INTERPRET unset): fp32, fp16, bf16 against the PyTorch twins.
#    On success the device's name is printed as the line to add to kernels/verified.json
#    (moe_replication.kernels "auto" uses the Triton kernels only on device kinds listed there).
# 2. tests/test_gpu.py: the replicated layer over NCCL on 2 GPUs (inference, training, weight
#    changes, device rule of every collective); skipped with fewer than 2 GPUs.
# 3. the kernels' micro-benchmark at Switch-base-128 sizes (bf16, k = 1 and 2).
# 4. with 2 GPUs, the layer benchmark (stock / ragged / replicated) through the deepspeed launcher.
# Nothing here had run on a GPU when this script was written.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-.}"
unset TRITON_INTERPRET
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

"$PY" - <<'PYEOF' || exit 1
import torch, triton
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device (torch.cuda.is_available() is False)"
print(f"device: {torch.cuda.get_device_name()} x{torch.cuda.device_count()}, torch {torch.__version__}, "
      f"triton {triton.__version__}")
PYEOF
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")

echo "== 1. kernel tests, compiled =="
tests_rc=0
"$PY" -m pytest -q tests/kernels -p no:cacheprovider --durations=5 || tests_rc=$?
if [ "$tests_rc" = 0 ]; then
  "$PY" -c "import torch; print('verified.json: add', repr(torch.cuda.get_device_name()))"
fi

echo "== 2. NCCL: replicated layer on 2 GPUs =="
nccl_rc=0
"$PY" -m pytest -q tests/test_gpu.py -p no:cacheprovider -rs || nccl_rc=$?

echo "== 3. micro-benchmark: kernels vs twins, Switch-base-128 sizes, bf16 =="
bench_rc=0
for k in 1 2; do
  "$PY" -m ds_moe_replicate.bench.kernels --tokens 16384 --hidden 768 --experts 128 --k "$k" \
      --ep-size 8 --slots 2 --dtype bf16 --reps 50 --json "$OUT/bench_kernels_k$k.json" || bench_rc=$?
done

layer_rc=0
if [ "$gpus" -ge 2 ]; then
  echo "== 4. layer benchmark on 2 GPUs =="
  deepspeed --num_gpus 2 launch/bench_layer.py --deepspeed_config configs/demo.json --tokens 16384 \
      --hidden 768 --ffn 3072 --experts 8 --json "$OUT/bench_layer_gpu.json" || layer_rc=$?
else
  echo "== 4. layer benchmark skipped: $gpus GPU(s), it needs 2 =="
fi
echo "kernel tests rc=$tests_rc, nccl tests rc=$nccl_rc, kernel bench rc=$bench_rc, layer bench rc=$layer_rc"
exit $(( tests_rc != 0 || nccl_rc != 0 || bench_rc != 0 || layer_rc != 0 ))
