"""Fused optical attention forward: pass 2 from pass 1's level codes vs pass 2 regenerating S.

Command (H200, from the repository root): PYTHONPATH=$PWD python bench/attention_codes.py

The forward keeps Q_s's level index of every S element in a per-program scratch so that pass 2
skips the S dot and the noise (kernels/attention.py). This times that choice against pass 2
regenerating S (the fallback the kernel takes past its scratch cap, forced here by a cap of 0),
with forward+backward and flash SDPA of the same inputs for scale. CUDA events, medians
(bench/timing.py), on bench/attention.py's inputs. Prints one JSON record per shape; --out
writes them all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import attention as bench_attention  # noqa: E402
from timing import events_median_ms  # noqa: E402
from torchtitan_ext.optical.kernels import attention as A  # noqa: E402

# (B, H, Hkv, L, D): the 1.1B flavor's attention is the second
SHAPES = [(16, 16, 16, 2048, 64), (8, 24, 8, 2048, 64), (8, 16, 16, 4096, 128)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the records to this JSON file")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    timed = events_median_ms
    records = []
    for B, H, HKV, L, D in SHAPES:
        x = bench_attention.Inputs(B, H, HKV, L, D, torch.bfloat16)
        rec = {"B": B, "H": H, "HKV": HKV, "L": L, "D": D}
        rec["fwd_codes_ms"] = timed(x.optical_fwd, 3, 10)
        with A.override_configs(code_scratch_bytes=0):  # no scratch: pass 2 regenerates S
            rec["fwd_regen_ms"] = timed(x.optical_fwd, 3, 10)
        rec["fwdbwd_ms"] = timed(x.optical_fwdbwd, 3, 10)
        rec["flash_fwdbwd_ms"] = timed(x.flash_fwdbwd, 3, 10)
        rec["flash_fwd_ms"] = timed(x.flash_fwd, 3, 10)
        print(json.dumps(rec), flush=True)
        records.append(rec)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
