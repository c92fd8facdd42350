"""Distill the "learned" predictor for the built-in model (see ds_moe_replicate/train_predictor.py):

    deepspeed --num_gpus 2 launch/train_predictor.py --out predictor.pt
"""

from ds_moe_replicate.train_predictor import main

if __name__ == "__main__":
    raise SystemExit(main())
