"""Calibrate the cost model on this device: expert MLP throughput at Switch-base sizes in bf16,
memory bandwidth, and (under the deepspeed launcher with 2+ ranks) all-to-all bandwidth.

    python launch/calibrate_costmodel.py --out calib.json            # one GPU, about a minute
    python launch/calibrate_costmodel.py --smoke --out calib.json    # CPU smoke check, seconds
    python -m ds_moe_replicate.bench.costmodel --trace T.json --hardware-json calib.json

Switch-base: d_model 768, d_ff 3072 (both Switch-base-128 and -256). The expert is timed on
row counts from 256 to 32768 (a hot expert's share of a 4096-token batch on 8-16 ranks, padded
or not); FLOP/s and the per-call overhead come from a straight-line fit. On CPU the dtype is fp32
(bf16 matmuls are emulated there and say nothing about a GPU). The written JSON holds the fields
of ``costmodel.Hardware`` for ``--hardware-json``; on a single device the all-to-all fields are
left at the named GPU type's defaults (NVLink/network are not measurable on one device).
"""

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds_moe_replicate.bench.calibrate import measure_hardware  # noqa: E402
from ds_moe_replicate.bench.costmodel import HARDWARE  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file for the measured Hardware fields")
    ap.add_argument("--like", default="H100", help=f"GPU type whose link figures fill in ({sorted(HARDWARE)})")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, any device (a check that it runs)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.like not in HARDWARE:
        ap.error(f"--like: unknown {args.like!r}; choose from {sorted(HARDWARE)}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    hidden, ffn = (64, 256) if args.smoke else (768, 3072)
    rows = (64, 256, 1024) if args.smoke else (256, 1024, 4096, 16384, 32768)
    if torch.distributed.is_available() and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        from ds_moe_replicate.runtime import init_distributed

        init_distributed()
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    hw, raw = measure_hardware(name, hidden, ffn, rows, dtype, device,
                               a2a_sizes=(1 << 16, 1 << 20) if args.smoke else (1 << 20, 64 << 20))
    if "all_to_all" not in raw:
        like = HARDWARE[args.like]
        hw = dataclasses.replace(hw, intra_bw=like.intra_bw, inter_bw=like.inter_bw, latency_s=like.latency_s,
                                 gpus_per_node=like.gpus_per_node)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return 0
    print(f"{name}: expert MLP H={hidden} F={ffn} {str(dtype).replace('torch.', '')}: "
          + ", ".join(f"{n} rows {ms:.3f} ms" for n, ms in zip(raw["expert"]["rows"], raw["expert"]["ms"])))
    print(f"fitted: {hw.flops / 1e12:.2f} TFLOP/s, {hw.launch_s * 1e6:.1f} us per call; memory copy "
          f"{hw.mem_bw / 1e9:.0f} GB/s" + (f"; all-to-all {hw.intra_bw / 1e9:.2f} GB/s + {hw.latency_s * 1e6:.0f} us"
                                           if "all_to_all" in raw else f"; links: {args.like} defaults"))
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(dataclasses.asdict(hw), fh, indent=1)
    with open(os.path.splitext(args.out)[0] + ".raw.json", "w", encoding="utf-8") as fh:
        json.dump(raw, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
