"""Offline sm_90 compile of the attention backward with and without kept codes: run from a tree
with rejected/attention-kept-codes-stop28.patch applied at /tmp/pc (git worktree add /tmp/pc f6ba2ac;
git -C /tmp/pc apply ...patch), python3 bench/results/rejected/kept_codes_sass.py."""
import sys
sys.path.insert(0, "/tmp/pc"); sys.path.insert(0, "/tmp/pc/bench")
from triton.compiler import ASTSource
import kernel_sass as KS
from noise_layouts import kernel_signature, launch_attrs
from torchtitan_ext.optical.kernels import attention as A

def src(keep):
    kernel = A.triton_kernel("bwd")
    bm, bn, warps, stages = A.kernel_config("bwd", 64)
    ptrs = dict(QQ="*bf16", Q="*bf16", K="*bf16", V="*bf16", DY="*bf16", LSE="*fp32",
                DELTA="*fp32", DQA="*fp32", DK="*bf16", DV="*bf16", KPM="*u8", INV="*fp32",
                k_rng="*fp32", v_rng="*fp32", s_rng_ptr="*fp32", seeds="*i64", CODES="*u8")
    const = dict(LEVELS=256, HAS_LUT=True, D=64, BM=bm, BN=bn, GROUP=3, CAUSAL=True,
                 HAS_KPM=False, CLIPPED=False, RUNS8=1, INTERP=False, NOISE=1, LEVELS_Q=256,
                 LEVELS_K=256, LEVELS_P=256, LEVELS_Y=256, DQ=True, sqd=1, skd=1, svd=1, sdd=1,
                 BMF=64 if keep else 1, KEEP=keep)
    sig = kernel_signature(kernel, ptrs, ("scale", "scale_log2", "inv_lm1", "lut", "NK_S"), const)
    attrs = launch_attrs(kernel, [*ptrs, "sqb", "sqh", "sql", "skb", "skh", "skl", "svb", "svh",
                                  "svl", "sdb", "sdh", "sdl", "LQ", "L", "S_BH", "WF"])
    return (ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs),
            {"num_warps": warps, "num_stages": stages, "enable_fp_fusion": False})

lines = []
for keep in (False, True):
    s, o = src(keep)
    lines += KS.inspect(f"backward KEEP={keep}", s, o)
print("\n".join(lines))
