"""Tune the bookkeeping kernels' launch parameters and write them to kernels/tuned.json.

    python launch/tune_kernels.py                      # Switch-base-128 sizes, k = 1 and 2, bf16
    python launch/tune_kernels.py --hidden 1024 --experts 256 --k 2 --dtype fp16

Needs a CUDA GPU: timings only mean something compiled on the device the parameters are for
(the file is keyed by ``torch.cuda.get_device_name()``, then kernel, then shape). For each
kernel it times every candidate on the same inputs as ``ds_moe_replicate.bench.kernels``, keeps
only candidates whose result matches the PyTorch twin, and merges the fastest into the file.
Launchers use an entry when device and shape match, and their defaults otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from ds_moe_replicate.bench.kernels import DTYPES, cases, make_inputs, max_diff, time_ms
from ds_moe_replicate.kernels import HAS_TRITON
from ds_moe_replicate.kernels._launch import TUNED_PATH, forced


def grid(**axes):
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


CANDIDATES = {
    "topk_gating": grid(BLOCK_T=[8, 16, 32, 64, 128], num_warps=[1, 2, 4, 8]),
    "assign_slots": grid(BLOCK_L=[128, 256, 512, 1024, 2048], num_warps=[2, 4, 8]),
    "permute": grid(BLOCK_N=[8, 16, 32, 64], BLOCK_H=[64, 128, 256, 512], num_warps=[2, 4, 8]),
    "combine": grid(BLOCK_T=[4, 8, 16, 32], BLOCK_H=[64, 128, 256, 512], num_warps=[2, 4, 8]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ep-size", type=int, default=8)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=str(TUNED_PATH))
    args = ap.parse_args()
    if not (HAS_TRITON and torch.cuda.is_available()):
        sys.exit("tune_kernels.py needs triton and a CUDA GPU: launch parameters tuned elsewhere mean nothing")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    try:
        with open(args.out) as f:
            table = json.load(f)
    except FileNotFoundError:
        table = {"format": 1, "devices": {}}
    entries = table.setdefault("devices", {}).setdefault(name, {})
    for k in args.k:
        inp = make_inputs(args.tokens, args.hidden, args.experts, k, args.ep_size, args.slots, DTYPES[args.dtype],
                          device)
        for kernel, (module, call_args) in cases(inp).items():
            launch, twin = getattr(module, kernel), getattr(module, kernel + "_torch")
            want = twin(*call_args)
            best = None
            for params in CANDIDATES[kernel]:
                with forced(kernel, params):
                    try:
                        if max_diff(launch(*call_args), want) > 1e-2:
                            continue
                        ms = time_ms(lambda: launch(*call_args), device, args.reps)
                    except Exception as err:  # noqa: BLE001 - a candidate the compiler refuses is skipped
                        print(f"  {kernel} {params}: skipped ({type(err).__name__})")
                        continue
                if best is None or ms < best[0]:
                    best = (ms, params)
            if best is None:
                sys.exit(f"no candidate of {kernel} matched its twin")
            key = module.shape_key(*call_args)
            entries.setdefault(kernel, {})[key] = best[1]
            print(f"{name} {kernel} [{key}]: {best[0]:.3f} ms with {best[1]}")
    table["note"] = "Launch parameters per device name -> kernel -> shape key, written by launch/tune_kernels.py."
    with open(args.out, "w") as f:
        json.dump(table, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
