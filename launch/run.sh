#!/usr/bin/env bash
# Run a command inside the project's virtualenv, creating it first if needed.
#
#   bash launch/run.sh python -m pytest -q
#   bash launch/run.sh deepspeed --num_gpus 2 launch/infer.py --deepspeed_config configs/demo.json
#
# Needs only python3 (>= 3.9) with venv. PyTorch is pinned to the CPU build that lies on these
# machines (torch==2.13.0); on your own platform, install torch first and set DS_MOE_VENV to a
# virtualenv that has it (the pin is skipped when torch already imports there).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DS_MOE_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
stamp="$venv/.ds_moe_replicate-installed"
want="$(cat "$root/pyproject.toml" | sha1sum | cut -c1-16)"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtualenv $venv" >&2
  "$py" -m venv "$venv"
fi
# NOTE: a virtualenv named by DS_MOE_VENV is the caller's (it may serve several checkouts):
# install into it only if the package is missing there, never re-point it at this checkout.
if [ -n "${DS_MOE_VENV:-}" ] && "$venv/bin/python" -c "import ds_moe_replicate" 2>/dev/null; then
  :
elif [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing ds_moe_replicate with all extras into $venv (first run takes a few minutes)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    "$venv/bin/python" -m pip install -q "torch==2.13.0"
  fi
  "$venv/bin/python" -m pip install -q -e "$root[all]"
  echo "$want" > "$stamp"
fi

export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
# One thread per rank on CPU: several ranks share the cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
cd "$root"
exec "$@"
