"""Main job for the deepspeed launcher (see ds_moe_replicate/infer.py):

    deepspeed --num_gpus 2 launch/infer.py --deepspeed_config configs/demo.json
"""

from ds_moe_replicate.infer import main

if __name__ == "__main__":
    raise SystemExit(main())
