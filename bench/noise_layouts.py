"""What the S-tile noise costs in layout conversions, read from the compiled code (no GPU).

Compiles a minimal loop of the attention's pass-1 shape for Hopper (sm_90, offline, with the
ptxas that ships with Triton): per key tile, S = q k^T (wgmma), the rounding draws of
`philox_bits24_rows`, `quantize_level`, a row sum of exp2; and the same in the backward's
orientation (S^T, the draws transposed). Variants of the draws: aligned runs of eight (one
Philox-4x32-7 per eight elements) interleaved by joins (`RUNS8` 1, the default) or spread by
broadcasts (2), one Philox per element (0), and noise off. For each it counts, in the loop body
and the whole kernel, Triton's `convert_layout` ops (a register-layout change goes through
shared memory or shuffles), shared-memory stores / loads and the 32x32->64-bit products of the
PTX (Philox's multiplies). Then the same counts for the shipped attention forward kernel
(`attention.triton_kernel("fwd")`, both passes, full and masked tiles) under each draw layout.
Counts, not times: the GPU decides (bench/attention_parts.py).

    python3 bench/noise_layouts.py --out bench/results/noise-layouts-sm90-triton3.9.txt
    # the GPU host's Triton, beside the installed one:
    #   python3 -m pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36 python3 bench/noise_layouts.py \
        --out bench/results/noise-layouts-sm90-triton3.6.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from torchtitan_ext.optical.kernels.quantizer import (  # noqa: E402
    philox_bits24_rows, quantize_level)


@triton.jit
def _s_tile_loop(Q, K, O, seed, stream, row0, lo, hi, span, inv_span, inv_lm1,
                 BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, RUNS: tl.constexpr,
                 NOISE: tl.constexpr, TRANSPOSED: tl.constexpr):
    """TRANSPOSED: the backward's orientation, S^T = k q^T with the draws transposed."""
    om = tl.arange(0, BM)
    on = tl.arange(0, BN)
    od = tl.arange(0, D)
    q = tl.load(Q + om[:, None] * D + od[None, :])
    acc = tl.zeros((BN,) if TRANSPOSED else (BM,), tl.float32)
    row_idx = (row0 + om).to(tl.int64) * 4096
    for start in range(0, 4096, BN):
        k = tl.load(K + (start + on)[:, None] * D + od[None, :])
        s = tl.dot(k, tl.trans(q)) if TRANSPOSED else tl.dot(q, tl.trans(k))
        if NOISE:
            w = philox_bits24_rows(seed, stream, row_idx, start, start + on, BN, RUNS)
            if TRANSPOSED:
                w = tl.trans(w)
        else:
            w = 0.0
        s_q, _ = quantize_level(s, lo, hi, span, inv_span, inv_lm1, w, 256, NOISE)
        acc += tl.sum(tl.math.exp2(s_q), 1)
    if TRANSPOSED:
        tl.store(O + on, acc)
    else:
        tl.store(O + om, acc)


_SIGNATURE = {"Q": "*bf16", "K": "*bf16", "O": "*fp32", "seed": "i64", "stream": "i32",
              "row0": "i32", "lo": "fp32", "hi": "fp32", "span": "fp32", "inv_span": "fp32",
              "inv_lm1": "fp32"}
# name: (RUNS, NOISE, TRANSPOSED)
VARIANTS = {"forward, runs of eight by joins (RUNS 1)": (1, 1, 0),
            "forward, runs of eight by broadcasts (RUNS 2)": (2, 1, 0),
            "forward, one Philox per element (RUNS 0)": (0, 1, 0),
            "forward, noise off": (1, 0, 0),
            "backward orientation, joins (RUNS 1)": (1, 1, 1),
            "backward orientation, broadcasts (RUNS 2)": (2, 1, 1),
            "backward orientation, one Philox per element (RUNS 0)": (0, 1, 1),
            "backward orientation, noise off": (1, 0, 1)}


def _loop_body(text: str, start: str, end: str) -> str:
    """The text between the first `start` marker and the next `end` marker after it."""
    i = text.find(start)
    j = text.find(end, i + len(start))
    return text[i:j] if i >= 0 and j > i else ""


def inspect(runs: int, noise: int, transposed: int, bm: int, bn: int, d: int, warps: int,
            stages: int) -> dict:
    const = {"BM": bm, "BN": bn, "D": d, "RUNS": runs, "NOISE": noise, "TRANSPOSED": transposed}
    src = ASTSource(fn=_s_tile_loop, signature={**_SIGNATURE, **{c: "constexpr" for c in const}},
                    constexprs=const)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": warps, "num_stages": stages,
                                 "enable_fp_fusion": False})
    ttgir, ptx = ck.asm["ttgir"], ck.asm["ptx"]
    loop = _loop_body(ttgir, "scf.for", "scf.yield")
    return {"convert_layout (loop)": loop.count("ttg.convert_layout"),
            "convert_layout (kernel)": ttgir.count("ttg.convert_layout"),
            "st.shared (PTX)": ptx.count("st.shared"), "ld.shared (PTX)": ptx.count("ld.shared"),
            "shfl (PTX)": ptx.count("shfl.sync"), "mul.wide.u32 (PTX)": ptx.count("mul.wide.u32"),
            "PTX lines": ptx.count("\n")}


def kernel_signature(kernel, ptrs: dict, floats, const: dict) -> dict:
    """Triton signature of `kernel` for offline compiles: the pointer types of `ptrs`, fp32 for
    the names in `floats`, constexpr for those in `const`, i32 for the rest."""
    return {n: ptrs.get(n) or ("fp32" if n in floats else ("constexpr" if n in const else "i32"))
            for n in kernel.arg_names}


def launch_attrs(kernel, aligned) -> dict:
    """The divisibility attributes a launch gives `kernel`'s arguments named in `aligned`:
    Triton specialises a pointer, or an integer not in `do_not_specialize`, whose value is a
    multiple of 16 (torch's allocations; the 1.1B's sizes and strides at L = 2048). Without
    them an offline compile keeps byte-wide loads and stores a launch vectorises."""
    return {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}


def forward_kernel_source(runs8: int = 1):
    """(ASTSource, options, tiles) of the shipped attention forward (both passes, full and masked
    tiles) at the 1.1B's head dim, 256 levels, causal, noisy, with its GPU tile configuration;
    the options launch it as the kernels do (no fp fusion)."""
    from torchtitan_ext.optical.kernels import attention as A

    kernel = A.triton_kernel("fwd")
    bm, bn, warps, stages = A.kernel_config("fwd", 64)
    ptrs = dict(Q="*bf16", KQ="*bf16", VQ="*bf16", Y="*bf16", LSE="*fp32", PART="*fp32",
                CODES="*u8", KPM="*u8", INV="*fp32", q_rng="*fp32", s_rng_ptr="*fp32",
                y_rng="*fp32", seeds="*i64", NKY="*fp32", QSTART="*i64")
    const = dict(LEVELS=256, D=64, BM=bm, BN=bn, CAUSAL=True, HAS_KPM=False, OBSERVE=True,
                 P_MODE=0, USE_CODES=True, RUNS8=runs8, INTERP=False, NOISE=1, LEVELS_Q=256,
                 LEVELS_K=256, LEVELS_P=256, LEVELS_Y=256, QSTART_PTR=False, sqd=1)
    sig = kernel_signature(kernel, ptrs, ("scale_log2", "inv_lm1", "NK_S"), const)
    attrs = launch_attrs(kernel, [*ptrs, "sqb", "sqh", "sql", "LQ", "LK", "W", "BH", "num_m"])
    return (ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs),
            {"num_warps": warps, "num_stages": stages, "enable_fp_fusion": False},
            f"{bm}x{bn}, {warps} warps, {stages} stages")


def backward_kernel_source(group: int = 3, *, extra_ptrs: dict | None = None,
                           extra_constexprs: dict | None = None, extra_aligned: tuple = ()):
    """(ASTSource, options, tiles) of the shipped attention dK/dV backward (with dQ atomics) at
    the 1.1B's head dim and GQA group, 256 levels, causal, noisy, its GPU tile configuration.
    `extra_*` add the pointer types, constexpr values and 16-divisible integers of arguments a
    variant of the kernel adds (bench/results/rejected/kept_codes_sass.py)."""
    from torchtitan_ext.optical.kernels import attention as A

    kernel = A.triton_kernel("bwd")
    bm, bn, warps, stages = A.kernel_config("bwd", 64)
    ptrs = dict(QQ="*bf16", Q="*bf16", K="*bf16", V="*bf16", DY="*bf16", LSE="*fp32",
                DELTA="*fp32", DQA="*fp32", DK="*bf16", DV="*bf16", KPM="*u8", INV="*fp32",
                k_rng="*fp32", v_rng="*fp32", s_rng_ptr="*fp32", seeds="*i64",
                **(extra_ptrs or {}))
    const = dict(LEVELS=256, HAS_LUT=True, D=64, BM=bm, BN=bn, GROUP=group, CAUSAL=True,
                 HAS_KPM=False, CLIPPED=False, RUNS8=1, INTERP=False, NOISE=1, LEVELS_Q=256,
                 LEVELS_K=256, LEVELS_P=256, LEVELS_Y=256, DQ=True, sqd=1, skd=1, svd=1, sdd=1,
                 **(extra_constexprs or {}))
    sig = kernel_signature(kernel, ptrs, ("scale", "scale_log2", "inv_lm1", "lut", "NK_S"), const)
    attrs = launch_attrs(kernel, [*ptrs, "sqb", "sqh", "sql", "skb", "skh", "skl", "svb", "svh",
                                  "svl", "sdb", "sdh", "sdl", "LQ", "L", *extra_aligned])
    return (ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs),
            {"num_warps": warps, "num_stages": stages, "enable_fp_fusion": False},
            f"{bm}x{bn}, {warps} warps, {stages} stages")


def operand_pass_source(cfg=None):
    """(ASTSource, options, tiles) of the linear's operand pass: the table's entry for K >= 256
    (or `cfg`, an OperandConfig), 256 levels, lut on; strides along K of 1 and the pointers,
    sizes and row strides divisible by 16, as Triton specialises a launch on the 1.1B's
    shapes."""
    from torchtitan_ext.optical.kernels import linear as LN

    kernel = LN.triton_kernel("operands")
    cfg = cfg or LN.operand_config(1536)
    const = dict(LEVELS=256, HAS_LUT=True, OBSERVE=True, BR=cfg.BR, BC=cfg.BC, LEVELS_W=256,
                 STAGES=cfg.num_stages, stride_xk=1, stride_wk=1)
    ptrs = dict(x_ptr="*bf16", w_ptr="*bf16", xq_ptr="*bf16", wq_ptr="*bf16", rng_ptr="*fp32",
                obs_ptr="*fp32", part_ptr="*fp32")
    sig = kernel_signature(kernel, ptrs, ("lut",), const)
    attrs = launch_attrs(kernel, [*ptrs, "M", "N", "K", "stride_xm", "stride_wn", "stride_xq",
                                  "stride_wq"])
    return (ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs),
            {"num_warps": cfg.num_warps, "enable_fp_fusion": False},
            f"{cfg.BR}x{cfg.BC}, {cfg.num_warps} warps, {cfg.programs_per_sm} programs per SM, "
            f"{cfg.num_stages} stages")


def inspect_forward_kernel(runs8: int) -> dict:
    """The same counts for the shipped attention forward (`forward_kernel_source`)."""
    src, options, tiles = forward_kernel_source(runs8)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ttgir, ptx = ck.asm["ttgir"], ck.asm["ptx"]
    return {"tiles": tiles,
            "convert_layout": ttgir.count("ttg.convert_layout"),
            "st.shared (PTX)": ptx.count("st.shared"), "ld.shared (PTX)": ptx.count("ld.shared"),
            "bar.sync (PTX)": ptx.count("bar.sync"),
            "mul.wide.u32 (PTX)": ptx.count("mul.wide.u32"), "PTX lines": ptx.count("\n")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bm", type=int, default=64)
    p.add_argument("--bn", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    lines = [f"triton {triton.__version__}, sm_90, tile {a.bm}x{a.bn}, D={a.head_dim}, "
             f"{a.warps} warps, {a.stages} stages"]
    for name, (runs, noise, transposed) in VARIANTS.items():
        counts = inspect(runs, noise, transposed, a.bm, a.bn, a.head_dim, a.warps, a.stages)
        lines.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for name, runs8 in (("joins", 1), ("broadcasts", 2), ("one Philox per element", 0)):
        counts = inspect_forward_kernel(runs8)
        lines.append(f"shipped forward kernel, draws by {name} (RUNS8 {runs8}): "
                     + ", ".join(f"{k} {v}" for k, v in counts.items()))
    write_report(lines, a.out)


def write_report(lines: list[str], out: str | None) -> None:
    """Print the report's lines, and write them to `out` when given."""
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if out:
        Path(out).write_text(text)


if __name__ == "__main__":
    main()
