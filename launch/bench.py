"""MoE stack benchmark for the deepspeed launcher (see ds_moe_replicate/bench/bench.py):

    deepspeed --num_gpus 2 launch/bench.py --deepspeed_config configs/demo.json --out bench_out
"""

from ds_moe_replicate.bench.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
