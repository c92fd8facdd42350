"""AutoEP benchmark for the deepspeed launcher (stock, autoep, autoep+replication):

    deepspeed --num_gpus 2 launch/bench_autoep.py --json docs/bench/autoep_cpu.json
"""

from ds_moe_replicate.bench.autoep import main

if __name__ == "__main__":
    raise SystemExit(main())
