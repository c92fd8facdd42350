"""Layer benchmark for the deepspeed launcher:

    deepspeed --num_gpus 2 launch/bench_layer.py --deepspeed_config configs/demo.json
"""

from ds_moe_replicate.bench.layer import main

if __name__ == "__main__":
    raise SystemExit(main())
