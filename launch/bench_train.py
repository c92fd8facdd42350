"""Training benchmark under the deepspeed launcher:

    deepspeed --num_gpus 2 launch/bench_train.py --deepspeed_config configs/train_demo.json --out DIR
"""

from ds_moe_replicate.bench.train import main

if __name__ == "__main__":
    raise SystemExit(main())
