"""Train the byte-level MoE language model on the standard library's text (see ds_moe_replicate/train_lm.py):

    deepspeed --num_gpus 2 launch/train.py --deepspeed_config configs/train_demo.json --out DIR
"""

from ds_moe_replicate.train_lm import main

if __name__ == "__main__":
    raise SystemExit(main())
