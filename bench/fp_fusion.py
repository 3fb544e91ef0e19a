"""What `enable_fp_fusion=False` protects in the shipped kernels, read from compiled code (no GPU).

Every kernel is launched with fp fusion off: a multiply feeding an add must round on its own, or
the results differ from the reference's bits (kernels/attention.py, "Bit-compatibility"). A path
that launches the kernels some other way must keep that. Inductor launches user kernels
(`torch.library.triton_op` / `wrap_triton`) with only `num_warps`, `num_stages`, `num_ctas` and a
few more options taken from the call (torch 2.13, `_higher_order_ops/triton_kernel_wrap.py` and
`_inductor/codegen/wrapper.py`), so there `enable_fp_fusion` falls back to Triton's default,
`knobs.language.default_fp_fusion` (env `TRITON_DEFAULT_FP_FUSION`, true up to Triton 3.9).

For the linear forward, its operand pass and the attention forward, compiled for sm_90 with
Triton's ptxas, this prints the PTX fma count with fusion off (as launched), on, and left unset
under `default_fp_fusion = False`, and whether that last PTX equals the launched one (debug
lines aside).

    python3 bench/fp_fusion.py --out bench/results/fp-fusion-sm90-triton3.9.txt
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from noise_layouts import (forward_kernel_source, kernel_signature,  # noqa: E402
                           operand_pass_source, write_report)
from torchtitan_ext.optical.kernels import linear as L  # noqa: E402


def linear_sources() -> dict:
    """(ASTSource, options) of the linear forward (128x128x64 tiles, pointer mainloop, Q_out
    noisy, observing: one fixed configuration, so reports stay comparable across stops; the
    table's large-shape entry has been 128x256 since stop 29) and of the operand pass
    (`noise_layouts.operand_pass_source`), as launched."""
    fwd = L.triton_kernel("fwd")
    fwd_const = dict(LEVELS=256, QUANT_OUT=True, NOISE=True, SHOT=False, HAS_BIAS=False,
                     OBSERVE=True, SAVE_MASK=False, USE_TMA=False, IEEE_DOT=False,
                     UPCAST_DOT=False, EPI_SPLIT=8, RUNS8=True, BM=128, BN=128, BK=64,
                     GROUP_M=8, PART_BLOCK=256)
    fwd_ptrs = dict(a_src="*bf16", b_src="*bf16", y_ptr="*bf16", bias_ptr="*bf16",
                    rng_ptr="*fp32", seed_ptr="*i64", obs_ptr="*fp32", mask_ptr="*i1",
                    part_ptr="*fp32")
    ops_src, ops_options, ops_tiles = operand_pass_source()
    return {
        "linear forward (128x128x64, 8 warps, 3 stages)": (
            ASTSource(fn=fwd, signature=kernel_signature(fwd, fwd_ptrs, ("nk",), fwd_const),
                      constexprs=fwd_const),
            {"num_warps": 8, "num_stages": 3, "enable_fp_fusion": False}),
        f"linear operand pass ({ops_tiles})": (ops_src, ops_options),
    }


def _ptx(src, options: dict) -> str:
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def _body(ptx: str) -> str:
    return "\n".join(ln for ln in ptx.splitlines()
                     if not ln.strip().startswith((".loc", ".file", "//", ".section"))
                     and "debug" not in ln)


def probe(src, options: dict) -> str:
    fma = re.compile(r"\bfma\.rn\.f32")
    off = _ptx(src, options)
    on = _ptx(src, {**options, "enable_fp_fusion": True})
    unset_opts = {k: v for k, v in options.items() if k != "enable_fp_fusion"}
    old = triton.knobs.language.default_fp_fusion
    triton.knobs.language.default_fp_fusion = False
    try:
        unset = _ptx(src, unset_opts)
    finally:
        triton.knobs.language.default_fp_fusion = old
    return (f"fma.rn.f32 off {len(fma.findall(off))}, on {len(fma.findall(on))}, unset with "
            f"default_fp_fusion False {len(fma.findall(unset))}; that PTX equals the launched "
            f"one: {_body(unset) == _body(off)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    a = p.parse_args()
    sources = linear_sources()
    src, options, tiles = forward_kernel_source(1)
    sources[f"attention forward ({tiles})"] = (src, options)
    lines = [f"triton {triton.__version__}, sm_90"]
    for name, (src, options) in sources.items():
        lines.append(f"{name}: {probe(src, options)}")
    write_report(lines, a.out)


if __name__ == "__main__":
    main()
