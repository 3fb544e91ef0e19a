"""Compile the default-config kernel launches to PTX for sm_90 on a machine without a GPU (a fake
active Triton driver; nothing is launched) and print a hash of each kernel's PTX with debug lines
removed; OUTD=<dir> also writes the PTX files. Compare two trees to check that a change leaves the
default training path's code unchanged:

    OUTD=/tmp/a PYTHONPATH=<old tree> python3 scripts/default_ptx.py > a.txt
    OUTD=/tmp/b PYTHONPATH=<new tree> python3 scripts/default_ptx.py > b.txt

(issue 16: identical instructions; the linear, element-wise and attention forward kernels only
gained one unused parameter each.)"""
import hashlib, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import CudaDriver
import triton.runtime.driver as drv

class FakeDriver(CudaDriver):
    def __init__(self):
        pass
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)
    def get_current_device(self):
        return 0
    def get_current_stream(self, device=None):
        return 0
    def get_active_torch_device(self):
        return torch.device("cpu")
    @staticmethod
    def is_active():
        return True
drv.set_active(FakeDriver())
print(drv.active.get_current_target())
from triton.runtime.jit import JITFunction
PTX = {}
_orig_run = JITFunction.run
def _run(self, *args, grid, warmup, **kw):
    k = _orig_run(self, *args, grid=grid, warmup=True, **kw)
    import re
    ptx = k.asm["ptx"]
    lines = [l for l in ptx.split("\n") if not l.strip().startswith((".loc", ".file", "//"))]
    ptx = "\n".join(lines)
    ptx = re.split(r"\.section\s+\.debug", ptx)[0]
    PTX.setdefault(self.fn.__name__, []).append(hashlib.sha1(ptx.encode()).hexdigest()[:12])
    os.environ.get("OUTD") and open(f"{os.environ['OUTD']}/{self.fn.__name__}_{len(PTX[self.fn.__name__])}.ptx", "w").write(ptx)
    return k
JITFunction.run = _run

from torchtitan_ext.optical.kernels import linear as L, attention as A
M = N = K = 256
x = torch.randn(M, K, dtype=torch.bfloat16); w = torch.randn(N, K, dtype=torch.bfloat16)
ranges = torch.tensor([[-2., 2.]] * 3); seed = torch.tensor(1)
# The large-shape entry without TMA (no host tensor descriptors without a GPU), forced through the
# public override: without it a CPU tensor would get the interpreter's small tiles.
with L.override_gemm_config(L.GemmConfig(128, 128, 64, 8, 8, 3, False, maxnreg=128)):
    for noise in (True, False):
        L.linear_forward(x, w, None, *ranges, seed, levels=256, lut=0.02, stream=0,
                         index=L.LinearIndex.whole(M, N), observe=True, noise=noise)
L.quantize_tensor(x.float(), ranges[0], seed, levels=256, lut=None, stream=0, noisy=True, index=None)
# The attention forward sizes its persistent grid by the GPU's multiprocessor count, which it asks
# torch.cuda for; without a GPU, answer as an H200 (132 SMs) would. The grid size is a launch
# argument, not part of the compiled code, so the PTX is the same. (No public override of the SM
# count exists in kernels/attention.py; this fakes the hardware, like FakeDriver above, and
# touches no private name of the package.)
if not torch.cuda.is_available():
    import types
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(
        multi_processor_count=132, name="fake sm_90")
B, H, Lq, D = 1, 2, 128, 64
q = torch.randn(B, H, Lq, D, dtype=torch.bfloat16); k = torch.randn(B, 1, Lq, D, dtype=torch.bfloat16)
r = torch.tensor([-2., 2.]); seeds = torch.tensor([1, 2])
for noise in (True, False)[:int(os.environ.get("ATT", 2))]:
    kw = dict(levels=256, lut=0.02, stream=0, scale=0.125, causal=True, batch_offset=0, batch_global=1, head_offset=0, heads_global=2)
    try:
        y, lse, obs = A.attention_forward(q, k, k, r, r, r, r, r, seeds, observe=True, noise=noise, **kw)
    except Exception as e:
        print("fwd", type(e).__name__, str(e)[:200])
    for det in (False, True):
        try:
            A.attention_backward(q, q, k, k, q, torch.zeros(B, H, Lq), r, r, r, r, seeds, clipped=False, noise=noise, deterministic=det, **kw)
        except Exception as e:
            print("bwd", type(e).__name__, str(e)[:300])
for name, hs in sorted(PTX.items()):
    print(name, hs)
