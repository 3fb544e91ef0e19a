"""Offline sm_90 compile of the attention backward with and without kept codes (no GPU).

    git worktree add /tmp/kept f6ba2ac
    git -C /tmp/kept apply bench/results/rejected/attention-kept-codes-stop28-v2.patch
    python3 bench/results/rejected/kept_codes_sass.py /tmp/kept

TREE (the argument) is a checkout with one of the kept-codes patches applied: its kernels are
compiled, by this tree's bench/noise_layouts.py and bench/kernel_sass.py.
"""
import os
import sys

if len(sys.argv) != 2 or not os.path.isdir(os.path.join(sys.argv[1], "torchtitan_ext")):
    sys.exit("usage: kept_codes_sass.py TREE (a checkout with a kept-codes patch applied)")
BENCH = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [sys.argv[1], BENCH]
# Imported first, from TREE: kernel_sass puts this repository at the front of sys.path.
import torchtitan_ext.optical.kernels.attention  # noqa: E402,F401

import kernel_sass as KS  # noqa: E402
from noise_layouts import backward_kernel_source  # noqa: E402

lines = []
for keep in (False, True):
    src, opts, _ = backward_kernel_source(
        extra_ptrs=dict(CODES="*u8"), extra_aligned=("S_BH", "WF"),
        extra_constexprs=dict(BMF=64 if keep else 1, KEEP=keep))
    lines += KS.inspect(f"backward KEEP={keep}", src, opts)
print("\n".join(lines))
