"""Accuracy-retention harness for the deepspeed launcher (see ds_moe_replicate/eval):

    deepspeed --num_gpus 2 launch/evaluate.py --model tiny-switch --task synthetic --out report.json
"""

import os
import sys

# NOTE: this file is named like the `evaluate` package it needs; drop its folder from the import
# path so `import evaluate` finds the package, not this script.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from ds_moe_replicate.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
