"""Predictor benchmark for the deepspeed launcher (see ds_moe_replicate/bench/predictors.py):

    deepspeed --num_gpus 2 launch/bench_predictors.py --deepspeed_config configs/demo.json
"""

from ds_moe_replicate.bench.predictors import main

if __name__ == "__main__":
    raise SystemExit(main())
