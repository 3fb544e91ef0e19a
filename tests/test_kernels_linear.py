"""Triton optical linear (torchtitan_ext.optical.kernels.linear) against the plain-torch reference.

Runs on the GPU when there is one, else on CPU tensors under TRITON_INTERPRET=1 (conftest.py).
Interpreter cases are small on purpose (the whole file stays well under a minute on 2 cores).

Tolerances (semantics page s.7): the kernel's float32 accumulator differs from the reference's
only by summation order, so a Q_out result may differ by exactly one output level where the
accumulator sits within rounding of a level boundary; such elements are counted and bounded.
Operands are quantized elementwise and must match exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from torchtitan_ext.optical import reference as ref
from torchtitan_ext.optical.kernels import linear as klinear
from torchtitan_ext.optical.kernels.linear import LinearIndex
from torchtitan_ext.optical.kernels.quantizer import div_rn_by

UNSET = (float("inf"), float("-inf"))


def _rng(lo, hi, device):
    return torch.tensor([lo, hi], dtype=torch.float32, device=device)


def _inputs(M, K, N, dtype, device, gen_seed, bias=True):
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(device)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype).to(device)
    b = (torch.randn(N, generator=g) * 0.1).to(dtype).to(device) if bias else None
    return x, w, b


def _ranges_from_data(x, w, device, shrink=0.8):
    """Initialised ranges slightly inside the data, so that clamping happens too."""
    acc = x.float() @ w.float().t()
    r = [
        _rng(shrink * x.float().min().item(), shrink * x.float().max().item(), device),
        _rng(shrink * w.float().min().item(), shrink * w.float().max().item(), device),
        _rng(shrink * acc.min().item(), shrink * acc.max().item(), device),
    ]
    return r


def _seed(device, value=123456789, shape=()):
    return torch.full(shape, value, dtype=torch.int64, device=device)


def _level_mismatches(y, yr, out_range, levels, allowed_fraction=1e-3):
    """Assert y == yr except for a bounded number of one-level flips of Q_out."""
    yf, rf = y.float(), yr.float()
    diff = (yf - rf).abs()
    bad = diff > 0
    n_bad = int(bad.sum())
    assert n_bad <= max(2, allowed_fraction * y.numel()), f"{n_bad} of {y.numel()} differ"
    if n_bad:
        lo, hi = out_range.tolist()
        delta = (hi - lo) / (levels - 1)
        # one level, plus the output dtype's rounding of the two neighbours
        eps = torch.finfo(y.dtype).eps * rf.abs().max().item() * 2
        assert diff.max().item() <= delta * 1.001 + eps, (diff.max().item(), delta)
    return n_bad


def _ref_linear(x, w, b, ranges, seed, *, levels, lut, stream, index_map=None,
                quantize_output=True, noise=True, photons=0.0):
    return ref.optical_linear_forward(
        x.cpu(), w.cpu(), b.cpu() if b is not None else None, *[r.cpu() for r in ranges],
        levels=levels, lut=lut, seed=seed.cpu().reshape(()), stream=stream,
        index_map=index_map, quantize_output=quantize_output, noise=noise, photons=photons,
    )


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
# A covering set rather than the full product: every dtype meets bias on/off, lut on/off and
# both level counts, with odd M/N/K, M = 1 and K smaller than any block.
FWD_CASES = [
    # (M, K, N, dtype, bias, lut, levels)
    (37, 70, 45, torch.float32, True, 0.05, 256),
    (37, 70, 45, torch.bfloat16, False, None, 16),
    (29, 13, 50, torch.float16, True, None, 256),
    (1, 19, 33, torch.bfloat16, True, 0.05, 256),
    (53, 9, 7, torch.float32, False, None, 16),
    (21, 40, 66, torch.float16, False, 0.3, 16),
    # N % 8 == 0: the epilogue draws one Philox block per eight neighbouring outputs (N = 44:
    # N % 4 == 0 but not 8, one block per output)
    (37, 70, 44, torch.bfloat16, True, 0.05, 256),
    (37, 70, 48, torch.bfloat16, True, 0.05, 256),
    (19, 24, 64, torch.float32, False, None, 16),
]


@pytest.mark.parametrize("M,K,N,dtype,bias,lut,levels", FWD_CASES)
def test_forward_matches_reference(kernel_device, M, K, N, dtype, bias, lut, levels):
    dev = kernel_device
    x, w, b = _inputs(M, K, N, dtype, dev, gen_seed=M * 1000 + K, bias=bias)
    ranges = _ranges_from_data(x, w, dev)
    seed = _seed(dev, 987654321 + M)
    y, obs, mask = klinear.linear_forward(
        x, w, b, *ranges, seed, levels=levels, lut=lut, stream=11,
        index=LinearIndex.whole(M, N), observe=True, save_out_mask=True)
    assert y.dtype == dtype and y.shape == (M, N) and y.device.type == dev.type
    yr, acc = _ref_linear(x, w, b, ranges, seed, levels=levels, lut=lut, stream=11)
    _level_mismatches(y.cpu(), yr, ranges[2].cpu(), levels)
    # observed ranges: x and W exactly, the accumulator up to summation order
    assert obs.shape == (3, 2) and obs.dtype == torch.float32
    o = obs.cpu()
    assert o[0, 0] == x.float().min().cpu() and o[0, 1] == x.float().max().cpu()
    assert o[1, 0] == w.float().min().cpu() and o[1, 1] == w.float().max().cpu()
    torch.testing.assert_close(o[2], torch.stack([acc.min(), acc.max()]), rtol=1e-5, atol=1e-5)
    # the clipped-gradient mask (may differ only where the accumulator sits on a range end)
    mr = ref.clamp_mask(acc, ranges[2].cpu())
    assert mask.dtype == torch.bool
    assert int((mask.cpu() != mr).sum()) <= 2


@pytest.mark.parametrize("M,K,N,dtype", [(37, 70, 45, torch.float32), (29, 13, 44, torch.bfloat16),
                                          (1, 19, 33, torch.bfloat16)])
def test_q_noise_off_matches_reference_and_det(kernel_device, M, K, N, dtype):
    # q_noise: false -- Q_out rounds deterministically: kernel == reference, independent of the
    # seed, and the reference equals the det pipeline Q_out(Q_x(x) @ Q_w(W)^T) + b by hand.
    dev, levels = kernel_device, 4  # few levels: noise would move most outputs
    x, w, b = _inputs(M, K, N, dtype, dev, gen_seed=M + K + N)
    ranges = _ranges_from_data(x, w, dev)
    kw = dict(levels=levels, lut=0.05, stream=3, index=LinearIndex.whole(M, N), observe=False)
    y, _, _ = klinear.linear_forward(x, w, b, *ranges, _seed(dev, 5), noise=False, **kw)
    y2, _, _ = klinear.linear_forward(x, w, b, *ranges, _seed(dev, 6), noise=False, **kw)
    assert torch.equal(y, y2)
    yr, acc = _ref_linear(x, w, b, ranges, _seed(dev, 5), levels=levels, lut=0.05, stream=3,
                          noise=False)
    _level_mismatches(y.cpu(), yr, ranges[2].cpu(), levels)
    r = [t.cpu() for t in ranges]
    xq = ref.quantize(x.cpu(), r[0], levels).float()
    wq = ref.quantize(w.cpu(), r[1], levels, lut=0.05).float()
    det = (ref.quantize(xq @ wq.t(), r[2], levels) + b.cpu().float()).to(dtype)
    assert torch.equal(yr, det)
    y_noisy, _, _ = klinear.linear_forward(x, w, b, *ranges, _seed(dev, 5), noise=True, **kw)
    assert (y_noisy != y).sum() >= 3  # the switch matters


def test_forward_quantized_operands_exact(kernel_device):
    """quantize_output=False returns the float32 accumulator of the quantized operands."""
    dev = kernel_device
    for dtype in (torch.float32, torch.bfloat16):
        x, w, _ = _inputs(33, 27, 41, dtype, dev, gen_seed=5, bias=False)
        ranges = _ranges_from_data(x, w, dev)
        y, obs, mask = klinear.linear_forward(
            x, w, None, *ranges, _seed(dev), levels=256, lut=0.05, stream=3,
            index=LinearIndex.whole(33, 41), observe=False, quantize_output=False)
        assert y.dtype == torch.float32 and mask is None
        assert torch.isinf(obs).all() and (obs[:, 0] > 0).all() and (obs[:, 1] < 0).all()
        acc, _ = _ref_linear(x, w, None, ranges, _seed(dev), levels=256, lut=0.05, stream=3,
                             quantize_output=False)
        torch.testing.assert_close(y.cpu(), acc, rtol=1e-5, atol=1e-5)


def test_uninitialised_ranges_pass_through(kernel_device):
    dev = kernel_device
    x, w, b = _inputs(19, 35, 23, torch.float32, dev, gen_seed=7)
    ranges = [_rng(*UNSET, dev) for _ in range(3)]
    y, obs, mask = klinear.linear_forward(
        x, w, b, *ranges, _seed(dev), levels=256, lut=0.05, stream=0,
        index=LinearIndex.whole(19, 23), observe=True, save_out_mask=True)
    exact = x.cpu().double() @ w.cpu().double().t() + b.cpu().double()
    torch.testing.assert_close(y.cpu().double(), exact, rtol=1e-5, atol=1e-5)
    assert mask.all()
    yr, _ = _ref_linear(x, w, b, ranges, _seed(dev), levels=256, lut=0.05, stream=0)
    torch.testing.assert_close(y.cpu(), yr, rtol=1e-5, atol=1e-5)


def test_partially_initialised_ranges(kernel_device):
    """Only the output quantizer is set: operands pass, Q_out still quantizes with noise."""
    dev = kernel_device
    x, w, _ = _inputs(24, 31, 28, torch.float32, dev, gen_seed=8, bias=False)
    ranges = _ranges_from_data(x, w, dev)
    ranges[0] = _rng(*UNSET, dev)
    ranges[1] = _rng(*UNSET, dev)
    y, _, _ = klinear.linear_forward(x, w, None, *ranges, _seed(dev, 5), levels=16, lut=0.05,
                                     stream=9, index=LinearIndex.whole(24, 28), observe=False)
    yr, _ = _ref_linear(x, w, None, ranges, _seed(dev, 5), levels=16, lut=0.05, stream=9)
    _level_mismatches(y.cpu(), yr, ranges[2].cpu(), 16)


def test_non_contiguous_input(kernel_device):
    dev = kernel_device
    base = torch.randn(40, 2 * 37, device=dev)
    x = base[:, ::2].t()[:, :29]  # [37, 29], strides (2, 2*37): neither dim unit-stride
    assert not x.is_contiguous()
    _, w, b = _inputs(1, 29, 17, torch.float32, dev, gen_seed=9)
    ranges = _ranges_from_data(x, w, dev)
    y, _, _ = klinear.linear_forward(x, w, b, *ranges, _seed(dev), levels=256, lut=None,
                                     stream=1, index=LinearIndex.whole(37, 17), observe=False)
    yr, _ = _ref_linear(x.contiguous(), w, b, ranges, _seed(dev), levels=256, lut=None, stream=1)
    _level_mismatches(y.cpu(), yr, ranges[2].cpu(), 256)


# A config whose epilogue chunks are 8 columns wide (32 / 4): with RUNS8 set, every aligned run
# of eight columns takes one Philox block (`philox_bits24_runs`). The interpreter's table entry
# (32-column tiles in 8 chunks of 4) never does.
RUNS8_CONFIG = klinear.GemmConfig(32, 32, 32, 4, 4, 1, False, epi_split=4)


@pytest.mark.parametrize("layout", ["2d", "3d", "3d-runs8"])
def test_global_index_maps(kernel_device, layout, monkeypatch):
    """Noise keyed by the global index of a shard: equal to the reference's IndexMap, with
    offsets that push the flat index past 2^32 (past 2^38 in 3-D), on the RUNS8 path too."""
    from torchtitan_ext.optical.kernels import quantizer

    dev = kernel_device
    runs8_blocks = []  # the interpreter runs the jitted functions as Python: a spy sees them
    real_runs = quantizer.philox_bits24_runs

    def spy(*args):
        runs8_blocks.append(args[2].shape)
        return real_runs(*args)

    monkeypatch.setattr(quantizer, "philox_bits24_runs", spy)
    K, levels = 26, 16
    if layout == "2d":
        M, N = 23, 31
        rows_g, n_g, r_off, c_off = 3 * 2**20, 2**12 + 5, 2**20 + 7, 1000
        x, w, b = _inputs(M, K, N, torch.float32, dev, gen_seed=10)
        index = LinearIndex(M, M, r_off, n_g, c_off)  # a 2-D block: s_local = s_global = M
        # a 2-D block at (r_off, c_off) of [rows_g, n_g] is the 3-D view [1, M, N] at (0, r_off)
        imap = ref.IndexMap((0, r_off, c_off), (1, rows_g, n_g))
        x_ref = x[None]
    else:
        B, S, N = 3, 7, 19
        Bg, Sg, Ng = 2**16, 4096, 2**12
        b_off, s_off, n_off = 2**15 + 1, 100, 17
        if layout == "3d-runs8":  # a column shard at a multiple of 8 of a row length % 8 == 0
            N, n_off = 24, 2**11 + 8
        M = B * S
        x, w, b = _inputs(M, K, N, torch.float32, dev, gen_seed=11)
        index = LinearIndex(S, Sg, b_off * Sg + s_off, Ng, n_off)
        imap = ref.IndexMap((b_off, s_off, n_off), (Bg, Sg, Ng))
        x_ref = x.reshape(B, S, K)
    ranges = _ranges_from_data(x, w, dev)
    seed = _seed(dev, 2**40 + 77, shape=(1,))
    with klinear.override_gemm_config(RUNS8_CONFIG if layout == "3d-runs8" else None):
        y, _, _ = klinear.linear_forward(x, w, b, *ranges, seed, levels=levels, lut=None,
                                         stream=2**32 - 3, index=index, observe=False)
        # and the noise really depends on the index: the unsharded map gives another output
        y0, _, _ = klinear.linear_forward(x, w, b, *ranges, seed, levels=levels, lut=None,
                                          stream=2**32 - 3, index=LinearIndex.whole(M, N),
                                          observe=False)
    if klinear._INTERPRET:
        assert bool(runs8_blocks) == (layout == "3d-runs8"), runs8_blocks
    yr, _ = _ref_linear(x_ref, w, b, ranges, seed, levels=levels, lut=None, stream=2**32 - 3,
                        index_map=imap)
    _level_mismatches(y.cpu(), yr.reshape(M, -1), ranges[2].cpu(), levels)
    assert (y0 != y).any()


def test_tma_and_pointer_paths_agree(kernel_device):
    """The TMA-descriptor mainloop (Hopper) and the pointer mainloop compute the same thing;
    under the interpreter both run, so CPU CI covers the path the H200 takes."""
    if klinear.TensorDescriptor is None:
        pytest.skip("Triton without host tensor descriptors")
    if kernel_device.type == "cuda" and not klinear.gpu_has_tma(kernel_device):
        pytest.skip("GPU without TMA")
    dev = kernel_device
    x, w, b = _inputs(45, 50, 39, torch.bfloat16, dev, gen_seed=12)
    ranges = _ranges_from_data(x, w, dev)
    outs = []
    base = klinear.gemm_config(45, 39, 50, torch.bfloat16, dev)
    for use_tma in (False, True):
        cfg = klinear.GemmConfig(64 if dev.type == "cuda" else 32, 32, 16, 4, 4, base.num_stages,
                                 use_tma)
        with klinear.override_gemm_config(cfg):
            assert klinear.gemm_config(45, 39, 50, torch.bfloat16, dev) == cfg
            y, obs, _ = klinear.linear_forward(x, w, b, *ranges, _seed(dev), levels=256, lut=0.05,
                                               stream=4, index=LinearIndex.whole(45, 39),
                                               observe=True)
        outs.append((y, obs))
    assert klinear.gemm_config(45, 39, 50, torch.bfloat16, dev) == base  # the override ended
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("N", [1536, 640])
def test_large_shape_entries_compute_the_same_bits(N):
    """The table's two large-shape entries (128x256 tiles from N = 1024 on, 128x128 below) and
    the other one forced give the same y, observation and mask bits: the table picks by speed
    only, and checkpoints and resumed runs do not depend on it. GPU only: the interpreter's
    table has one small entry."""
    dev = torch.device("cuda")
    if not torch.cuda.is_available() or not klinear.gpu_has_tma(dev):
        pytest.skip("needs a CUDA GPU with TMA (the table's large entries)")
    M, K = 8192, 320  # M * N above 2048^2: a large entry
    x, w, b = _inputs(M, K, N, torch.bfloat16, dev, gen_seed=5)
    ranges = _ranges_from_data(x, w, dev)
    wide = klinear.GemmConfig(128, 256, 64, 8, 8, 3, True, epi_split=4)
    narrow = klinear.GemmConfig(128, 128, 64, 8, 8, 3, True, maxnreg=128)
    shipped = klinear.gemm_config(M, N, K, torch.bfloat16, dev)
    assert shipped == (wide if N >= 1024 else narrow)
    other = narrow if shipped == wide else wide
    outs = []
    for cfg in (None, other):
        with klinear.override_gemm_config(large=cfg):
            assert klinear.gemm_config(M, N, K, torch.bfloat16, dev) == (cfg or shipped)
            outs.append(klinear.linear_forward(
                x, w, b, *ranges, _seed(dev, 77), levels=256, lut=0.05, stream=2,
                index=LinearIndex.whole(M, N), observe=True, save_out_mask=True))
    (y0, obs0, m0), (y1, obs1, m1) = outs
    assert torch.equal(y0, y1) and torch.equal(obs0, obs1) and torch.equal(m0, m1)


@pytest.mark.parametrize("cfg", [klinear.GemmConfig(32, 64, 32, 4, 4, 1, False, 8),
                                 klinear.GemmConfig(32, 32, 32, 4, 4, 1, False, 4)],
                         ids=["bn64-split8", "bn32-split4"])
def test_eight_outputs_per_philox_block_match_reference(kernel_device, cfg):
    """Epilogue chunks of >= 8 columns draw one Philox block per eight outputs (RUNS8, the path
    of every GPU table entry); the interpreter's default tiles (4-column chunks) take the
    per-output path, so these tiles force whole runs. A wrong lane order fails at 16 levels."""
    dev = kernel_device
    M, K, N = 37, 40, 64
    x, w, b = _inputs(M, K, N, torch.float32, dev, gen_seed=77)
    ranges = _ranges_from_data(x, w, dev)
    seed = _seed(dev, 555)
    with klinear.override_gemm_config(cfg):
        y, _, _ = klinear.linear_forward(x, w, b, *ranges, seed, levels=16, lut=None, stream=5,
                                         index=LinearIndex.whole(M, N), observe=False)
    yr, _ = _ref_linear(x, w, b, ranges, seed, levels=16, lut=None, stream=5)
    _level_mismatches(y.cpu(), yr, ranges[2].cpu(), 16)


def test_empty_rows(kernel_device):
    dev = kernel_device
    x = torch.empty(0, 12, device=dev)
    w = torch.randn(5, 12, device=dev)
    y, obs, mask = klinear.linear_forward(x, w, None, *[_rng(*UNSET, dev)] * 3, _seed(dev),
                                          levels=256, lut=None, stream=0,
                                          index=LinearIndex.whole(0, 5), observe=True,
                                          save_out_mask=True)
    assert y.shape == (0, 5) and mask.shape == (0, 5)


# --------------------------------------------------------------------------------------------
# Stand-alone quantizer
# --------------------------------------------------------------------------------------------
def _standalone_quantizer_case(dev):
    """A [21, 77] input, its range and seed, and the index placing it as 3 blocks of 7 rows
    inside [Bg, 11, Ng] at (b_off, s_off, 100): (x, rng, seed, index, imap)."""
    M, N = 21, 77
    x = torch.randn(M, N, device=dev)
    rng = _rng(-1.5, 2.0, dev)
    seed = _seed(dev, 2**35 + 9)
    b_off, s_off, n_g = 190650, 3, 2**11 + 1
    index = LinearIndex(7, 11, b_off * 11 + s_off, n_g, 100)
    imap = ref.IndexMap((b_off, s_off, 100), (b_off + 3, 11, n_g))
    return x, rng, seed, index, imap


def test_quantize_tensor_noise_equals_reference(kernel_device):
    """Noisy Q keyed by (seed, stream, global index): identical u, so identical output."""
    x, rng, seed, index, imap = _standalone_quantizer_case(kernel_device)
    M, N = x.shape
    y = klinear.quantize_tensor(x, rng, seed, levels=256, lut=None, stream=42, noisy=True,
                                index=index)
    u = ref.philox_uniform(seed.cpu(), 42, imap.flat_indices((3, 7, N), "cpu")).reshape(M, N)
    yr = ref.quantize(x.cpu(), rng.cpu(), 256, noise=u)
    assert torch.equal(y.cpu(), yr)


@pytest.mark.parametrize("dtype,lut,levels", [(torch.bfloat16, 0.05, 256),
                                              (torch.float16, None, 16),
                                              (torch.float32, 0.2, 16)])
def test_quantize_tensor_det(kernel_device, dtype, lut, levels):
    dev = kernel_device
    x = torch.randn(33, 47, device=dev).to(dtype)
    rng = _rng(-1.0, 1.5, dev)
    y = klinear.quantize_tensor(x, rng, None, levels=levels, lut=lut, stream=0, noisy=False,
                                index=None)
    assert y.dtype == dtype
    assert torch.equal(y.cpu(), ref.quantize(x.cpu(), rng.cpu(), levels, lut=lut))
    unset = klinear.quantize_tensor(x, _rng(*UNSET, dev), None, levels=levels, lut=lut,
                                    stream=0, noisy=False, index=None)
    assert torch.equal(unset, x)


@triton.jit
def _div_kernel(a_ptr, d_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(a_ptr + offs, mask=m, other=0.0)
    d = tl.load(d_ptr + offs, mask=m, other=1.0)
    tl.store(out_ptr + offs, div_rn_by(a, d, tl.math.div_rn(1.0, d)), mask=m)


def test_division_is_correctly_rounded(kernel_device):
    """The quantizer's reciprocal-plus-correction division equals IEEE division (torch's)."""
    g = torch.Generator().manual_seed(40)
    n = 1 << 18
    d = torch.pow(10.0, torch.rand(n, generator=g) * 12 - 6)  # spans 1e-6 .. 1e6
    a = d * torch.rand(n, generator=g) * 1.001
    a[: n // 4] = torch.randint(0, 1 << 22, (n // 4,), generator=g).float()  # k / (L - 1) cases
    d[: n // 4] = torch.randint(1, 1 << 22, (n // 4,), generator=g).float()
    a[-1000:] = 0.0
    out = torch.empty_like(a, device=kernel_device)
    _div_kernel[(triton.cdiv(n, 1024),)](a.to(kernel_device), d.to(kernel_device), out, n,
                                         BLOCK=1024, enable_fp_fusion=False)
    assert torch.equal(out.cpu(), a / d)


@pytest.mark.parametrize("lo,hi,levels", [(-1.0, 1.0, 256), (-0.37, 2.9, 16), (0.0, 1.0, 256),
                                          (-3e-3, 1.7e-2, 255), (-41.0, 7.5, 4096)])
def test_quantizer_exact_on_grid_and_midpoints(kernel_device, lo, hi, levels):
    """Det Q equals the reference bit for bit on random values, on the level grid itself and on
    the half-way points between levels (where a wrong last bit would change the level)."""
    g = torch.Generator().manual_seed(levels)
    rng = torch.tensor([lo, hi])
    k = torch.arange(levels, dtype=torch.float32)
    grid = k / (levels - 1) * (hi - lo) + lo
    mids = (k[:-1] + 0.5) / (levels - 1) * (hi - lo) + lo
    rand = torch.rand(1 << 15, generator=g) * (hi - lo) * 1.2 + lo - 0.1 * (hi - lo)
    x = torch.cat([grid, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1),
                   rand])
    x = torch.nn.functional.pad(x, (0, (-x.numel()) % 64)).reshape(-1, 64)
    y = klinear.quantize_tensor(x.to(kernel_device), rng.to(kernel_device), None, levels=levels,
                                lut=None, stream=0, noisy=False, index=None)
    assert torch.equal(y.cpu(), ref.quantize(x, rng, levels))


def test_quantize_tensor_noise_statistics(kernel_device):
    """Mean of y - Q_det ~ 0 over uniform data; variance ~ delta^2 / 6 (the stochastic rounding of
    uniformly spread values: E[frac(1-frac)] = 1/6 of delta^2)."""
    dev = kernel_device
    levels = 16
    x = torch.rand(64, 256, device=dev) * 2 - 1
    rng = _rng(-1.0, 1.0, dev)
    y = klinear.quantize_tensor(x, rng, _seed(dev, 31), levels=levels, lut=None, stream=5,
                                noisy=True, index=None)
    delta = 2.0 / (levels - 1)
    err = (y - x).cpu().double() / delta
    assert abs(err.mean().item()) < 0.02
    assert abs(err.var().item() - 1 / 6) < 0.02
    levels_hit = ((y.cpu().double() + 1) / delta)
    assert torch.allclose(levels_hit, levels_hit.round(), atol=1e-4)


def test_observe_minmax(kernel_device):
    x = torch.randn(13, 29, device=kernel_device).to(torch.bfloat16)
    o = klinear.observe_minmax(x)
    assert o.dtype == torch.float32 and o.shape == (2,)
    assert o[0] == x.float().min() and o[1] == x.float().max()
    e = klinear.observe_minmax(torch.empty(0, 3, device=kernel_device))
    assert e[0] == math.inf and e[1] == -math.inf


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clipped", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference(kernel_device, clipped, dtype):
    dev = kernel_device
    M, K, N = 31, 22, 27
    x, w, b = _inputs(M, K, N, dtype, dev, gen_seed=20)
    ranges = _ranges_from_data(x, w, dev, shrink=0.6)
    _, _, mask = klinear.linear_forward(x, w, b, *ranges, _seed(dev), levels=256, lut=None,
                                        stream=0, index=LinearIndex.whole(M, N), observe=False,
                                        save_out_mask=clipped)
    gy = torch.randn(M, N, device=dev).to(dtype)
    gx, gw, gb = klinear.linear_backward(gy, x, w, ranges[0], ranges[1], mask, clipped=clipped,
                                         has_bias=True, needs_grad=(True, True, True))
    _, acc = _ref_linear(x, w, b, ranges, _seed(dev), levels=256, lut=None, stream=0)
    rx, rw, rb = ref.optical_linear_backward(gy.cpu(), x.cpu(), w.cpu(), acc, ranges[0].cpu(),
                                             ranges[1].cpu(), ranges[2].cpu(), clipped=clipped,
                                             has_bias=True)
    assert gx.dtype == dtype and gw.dtype == dtype and gb.dtype == dtype
    for got, want in ((gx, rx), (gw, rw), (gb, rb)):
        got, want = got.cpu().double(), want.double()
        rel = (got - want).norm() / want.norm().clamp_min(1e-12)
        assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel.item()
    if clipped:  # zeros exactly where clamped
        assert (gx.cpu()[~ref.clamp_mask(x.cpu(), ranges[0].cpu())] == 0).all()
        assert (gw.cpu()[~ref.clamp_mask(w.cpu(), ranges[1].cpu())] == 0).all()
        # but the bias comes after Q_out, digitally: its gradient is never masked
        assert not mask.all()
    torch.testing.assert_close(gb.cpu().float(), gy.cpu().float().sum(0), rtol=1e-2 if
                               dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_backward_needs_grad_subsets(kernel_device):
    dev = kernel_device
    x, w, _ = _inputs(9, 14, 6, torch.float32, dev, gen_seed=21, bias=False)
    gy = torch.randn(9, 6, device=dev)
    gx, gw, gb = klinear.linear_backward(gy, x, w, _rng(*UNSET, dev), _rng(*UNSET, dev), None,
                                         clipped=False, has_bias=False,
                                         needs_grad=(False, True, False))
    assert gx is None and gb is None
    torch.testing.assert_close(gw, gy.t() @ x)


# --------------------------------------------------------------------------------------------
# GPU only: realistic shapes and the no-host-sync property
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", [(4096, 4096, 4096), (3000, 1000, 2500)])
def test_gpu_large_bf16(M, K, N):
    dev = torch.device("cuda")
    x, w, b = _inputs(M, K, N, torch.bfloat16, dev, gen_seed=30)
    ranges = _ranges_from_data(x, w, dev)
    seed = _seed(dev, 2**34 + 5)
    y, obs, _ = klinear.linear_forward(x, w, b, *ranges, seed, levels=256, lut=0.02,
                                       stream=3, index=LinearIndex.whole(M, N), observe=True)
    # reference on the GPU (float32 matmul of the exactly quantized operands)
    yr, acc = ref.optical_linear_forward(x, w, b, *ranges, levels=256, lut=0.02, seed=seed,
                                         stream=3)
    # Tensor-core accumulation over K=4096 differs from the float32 GEMM by more than plain
    # reordering would (about 1e-3 of the outputs land on the neighbouring level): still one
    # level at most, and the s.7 bf16 criterion (relative norm error) holds with margin.
    _level_mismatches(y, yr, ranges[2], 256, allowed_fraction=5e-3)
    rel = (y.double() - yr.double()).norm() / yr.double().norm()
    assert rel < 1e-2
    torch.testing.assert_close(obs[2], torch.stack([acc.min(), acc.max()]), rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("clipped", [False, True])
def test_gpu_no_host_sync(clipped):
    dev = torch.device("cuda")
    M, K, N = 1024, 512, 768
    x, w, b = _inputs(M, K, N, torch.bfloat16, dev, gen_seed=31)
    ranges = _ranges_from_data(x, w, dev)
    seed = _seed(dev, 99)
    gy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)

    def step():
        y, obs, mask = klinear.linear_forward(
            x, w, b, *ranges, seed, levels=256, lut=0.02, stream=1,
            index=LinearIndex.whole(M, N), observe=True, save_out_mask=clipped)
        grads = klinear.linear_backward(gy, x, w, ranges[0], ranges[1], mask, clipped=clipped,
                                        has_bias=True, needs_grad=(True, True, True))
        t = klinear.quantize_tensor(y, ranges[2], seed, levels=256, lut=None, stream=1,
                                    noisy=True, index=LinearIndex.whole(M, N))
        return y, obs, grads, t, klinear.observe_minmax(y)

    step()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# Issue 16: per-quantizer levels and the shot read-out
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_quantizer_levels_match_reference(kernel_device, which, dtype):
    """Lowering exactly one of (Q_x, Q_w, Q_out) changes the result vs all-256 and equals the
    reference (noise off: exact up to accumulation order; noise on: identical u)."""
    dev = kernel_device
    M, K, N = 23, 37, 45
    x, w, b = _inputs(M, K, N, dtype, dev, gen_seed=60 + which)
    ranges = _ranges_from_data(x, w, dev)
    lv = [256, 256, 256]
    lv[which] = 5
    lv = tuple(lv)
    kw = dict(lut=0.05, stream=3, index=LinearIndex.whole(M, N), observe=False)
    for noise in (False, True):
        y, _, _ = klinear.linear_forward(x, w, b, *ranges, _seed(dev, 8), levels=lv,
                                         noise=noise, **kw)
        y256, _, _ = klinear.linear_forward(x, w, b, *ranges, _seed(dev, 8), levels=256,
                                            noise=noise, **kw)
        assert (y != y256).sum() >= 5
        yr, _ = _ref_linear(x, w, b, ranges, _seed(dev, 8), levels=lv, lut=0.05, stream=3,
                            noise=noise)
        _level_mismatches(y.cpu(), yr, ranges[2].cpu(), lv[2])
    # (256, 256, 256) as a tuple is the int path bit for bit
    yt, _, _ = klinear.linear_forward(x, w, b, *ranges, _seed(dev, 8), levels=(256,) * 3, **kw)
    yi, _, _ = klinear.linear_forward(x, w, b, *ranges, _seed(dev, 8), levels=256, **kw)
    assert torch.equal(yt, yi)


SHOT_CASES = [
    # (M, K, N, dtype, levels, photons): odd N and N = 44 (one Philox block per element) and
    # N % 8 == 0 (RUNS8: Box-Muller's words in runs of four), fp32/bf16
    (37, 70, 45, torch.float32, 256, 0.5),
    (29, 13, 44, torch.bfloat16, 64, 2.0),
    (1, 19, 33, torch.bfloat16, 16, 0.1),
    (19, 24, 64, torch.float32, (16, 256, 1024), 1.0),
]


@pytest.mark.parametrize("M,K,N,dtype,levels,photons", SHOT_CASES)
def test_shot_readout_matches_reference(kernel_device, M, K, N, dtype, levels, photons):
    dev = kernel_device
    x, w, b = _inputs(M, K, N, dtype, dev, gen_seed=M * 7 + N)
    ranges = _ranges_from_data(x, w, dev)
    seed = _seed(dev, 2**33 + M)
    kw = dict(levels=levels, lut=0.05, stream=5, index=LinearIndex.whole(M, N), observe=False)
    y, _, _ = klinear.linear_forward(x, w, b, *ranges, seed, photons=photons, **kw)
    yr, _ = _ref_linear(x, w, b, ranges, seed, levels=levels, lut=0.05, stream=5,
                        photons=photons)
    lout = levels if isinstance(levels, int) else levels[2]
    _level_mismatches(y.cpu(), yr, ranges[2].cpu(), lout)
    # the shot read-out is not the rounding read-out, and depends on n
    y_round, _, _ = klinear.linear_forward(x, w, b, *ranges, seed, **kw)
    assert (y != y_round).sum() >= 3
    y_more, _, _ = klinear.linear_forward(x, w, b, *ranges, seed, photons=photons * 1e4, **kw)
    assert (y != y_more).sum() >= 3
    # same seed and index, same z: repeatable; another seed moves outputs
    y2, _, _ = klinear.linear_forward(x, w, b, *ranges, seed, photons=photons, **kw)
    assert torch.equal(y, y2)
    y3, _, _ = klinear.linear_forward(x, w, b, *ranges, _seed(dev, 5), photons=photons, **kw)
    assert (y != y3).sum() >= 3
    # q_noise: false turns the shot noise off: det rounding
    yd, _, _ = klinear.linear_forward(x, w, b, *ranges, seed, photons=photons, noise=False, **kw)
    ydr, _ = _ref_linear(x, w, b, ranges, seed, levels=levels, lut=0.05, stream=5, noise=False)
    _level_mismatches(yd.cpu(), ydr, ranges[2].cpu(), lout)


def test_shot_readout_global_index_past_2_32(kernel_device):
    dev = kernel_device
    B, S, K, N = 3, 7, 26, 20
    Bg, Sg, Ng = 2**16, 4096, 2**12
    b_off, s_off, n_off = 2**15 + 1, 100, 2**11 + 4
    x, w, b = _inputs(B * S, K, N, torch.float32, dev, gen_seed=11)
    index = LinearIndex(S, Sg, b_off * Sg + s_off, Ng, n_off)
    imap = ref.IndexMap((b_off, s_off, n_off), (Bg, Sg, Ng))
    ranges = _ranges_from_data(x, w, dev)
    seed = _seed(dev, 2**40 + 77, shape=(1,))
    y, _, _ = klinear.linear_forward(x, w, b, *ranges, seed, levels=64, lut=None, stream=9,
                                     index=index, observe=False, photons=0.3)
    yr, _ = _ref_linear(x.reshape(B, S, K), w, b, ranges, seed, levels=64, lut=None, stream=9,
                        index_map=imap, photons=0.3)
    _level_mismatches(y.cpu(), yr.reshape(B * S, -1), ranges[2].cpu(), 64)


def test_quantize_tensor_shot_equals_reference(kernel_device):
    """The row-wise TP Q_out: the element-wise kernel's shot read-out == the reference."""
    x, rng, seed, index, imap = _standalone_quantizer_case(kernel_device)
    M, N = x.shape
    y = klinear.quantize_tensor(x, rng, seed, levels=32, lut=None, stream=42, noisy=True,
                                index=index, photons=0.7, contraction=96)
    idx = imap.flat_indices((3, 7, N), "cpu").reshape(M, N)
    z = ref.shot_normal(seed.cpu(), 42, idx)
    yr = ref.quantize(x.cpu(), rng.cpu(), 32, shot=(z, ref.shot_nk(0.7, 96, "cpu")))
    _level_mismatches(y.cpu(), yr, rng.cpu(), 32)
    assert (y.cpu() != ref.quantize(x.cpu(), rng.cpu(), 32)).sum() >= 10


@pytest.mark.gpu
def test_gpu_shot_and_levels_large_bf16():
    dev = torch.device("cuda")
    M, K, N = 3000, 1000, 2500
    x, w, b = _inputs(M, K, N, torch.bfloat16, dev, gen_seed=31)
    ranges = _ranges_from_data(x, w, dev)
    seed = _seed(dev, 2**34 + 5)
    lv = (64, 128, 256)
    y, _, _ = klinear.linear_forward(x, w, b, *ranges, seed, levels=lv, lut=0.02, stream=3,
                                     index=LinearIndex.whole(M, N), observe=False, photons=0.05)
    yr, _ = ref.optical_linear_forward(x, w, b, *ranges, levels=lv, lut=0.02, seed=seed,
                                       stream=3, photons=0.05)
    # tensor-core accumulation (as test_gpu_large_bf16) plus GPU log/cos within a few ulp
    _level_mismatches(y, yr, ranges[2], 256, allowed_fraction=5e-3)


def test_override_gemm_config_is_scoped_and_large_applies_to_large_shapes_only():
    """The public way to pick the forward's configuration: `config` forces every problem,
    `large` only the problems the table gives its large-shape entry; both end with the block,
    nested blocks restore the outer one."""
    bf16, cpu = torch.bfloat16, torch.device("cpu")
    small = klinear.gemm_config(64, 64, 64, bf16, cpu)
    forced = klinear.GemmConfig(16, 16, 16, 1, 1, 1, False)
    other = klinear.GemmConfig(32, 16, 16, 1, 1, 1, False)
    with klinear.override_gemm_config(forced):
        assert klinear.gemm_config(64, 64, 64, bf16, cpu) == forced
        with klinear.override_gemm_config(other):
            assert klinear.gemm_config(8, 8, 8, bf16, cpu) == other
        assert klinear.gemm_config(8, 8, 8, bf16, cpu) == forced
    assert klinear.gemm_config(64, 64, 64, bf16, cpu) == small
    with klinear.override_gemm_config(large=forced):  # a small problem keeps the table's entry
        assert klinear.gemm_config(64, 64, 64, bf16, cpu) == small
    if torch.cuda.is_available() and klinear.gpu_has_tma(torch.device("cuda")):
        gpu = torch.device("cuda")
        with klinear.override_gemm_config(large=forced):
            assert klinear.gemm_config(16384, 8192, 2048, bf16, gpu) == forced
            assert klinear.gemm_config(64, 64, 64, bf16, gpu) != forced


_OPERAND_CONFIGS = [klinear.OperandConfig(32, 64, 4, programs_per_sm=1),
                    klinear.OperandConfig(16, 32, 4, programs_per_sm=3),
                    klinear.OperandConfig(16, 32, 4, programs_per_sm=2, num_stages=3),
                    klinear.OperandConfig(64, 128, 8)]


@pytest.mark.parametrize("cfg", _OPERAND_CONFIGS,
                         ids=lambda c: f"{c.BR}x{c.BC}w{c.num_warps}p{c.programs_per_sm}"
                                       f"s{c.num_stages}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_operand_pass_configs_give_the_same_bits(kernel_device, cfg, dtype):
    """Every operand pass configuration -- one program per tile, or a few programs looping over
    the tiles of both operands (on the CPU one 'multiprocessor': 1, 2 or 3 programs), their
    loads software-pipelined or not (GPU only) -- gives the table's outputs and observations bit
    for bit, and observes the operands' true min/max."""
    dev = kernel_device
    x, w, b = _inputs(70, 90, 50, dtype, dev, gen_seed=11, bias=True)
    ranges = _ranges_from_data(x, w, dev)

    def forward():
        return klinear.linear_forward(x, w, b, *ranges, _seed(dev), levels=64, lut=0.05,
                                      stream=2, index=LinearIndex.whole(70, 50), observe=True)

    y0, obs0, _ = forward()
    with klinear.override_gemm_config(operands=cfg):
        y1, obs1, _ = forward()
    assert torch.equal(y0, y1) and torch.equal(obs0, obs1)
    want = torch.tensor([[x.min(), x.max()], [w.min(), w.max()]], dtype=torch.float32)
    assert torch.equal(obs1[:2].cpu(), want)


def test_operand_pass_observes_a_nan_tile_alike_in_every_config(kernel_device):
    """A tile of x that is all NaN: looping programs observe what one program per tile does
    (the max NaN, the min that of the other tiles)."""
    dev = kernel_device
    x, w, b = _inputs(64, 64, 40, torch.float32, dev, gen_seed=3, bias=False)
    ranges = _ranges_from_data(x, w, dev)
    x[:32] = float("nan")  # the first 32x64 tile (the interpreter's table entry)
    obs = {}
    for cfg in (klinear.OperandConfig(32, 64, 4), klinear.OperandConfig(32, 64, 4, 1)):
        with klinear.override_gemm_config(operands=cfg):
            obs[cfg] = klinear.linear_forward(
                x, w, None, *ranges, _seed(dev), levels=64, lut=None, stream=0,
                index=LinearIndex.whole(64, 40), observe=True)[1][:2].cpu()
    one, looping = obs.values()
    assert torch.equal(one.nan_to_num(), looping.nan_to_num()), (one, looping)
    assert torch.isnan(looping[0, 1]) and looping[0, 0] == x[32:].min().cpu()


_DECODE_CANDIDATES = [klinear.DECODE_CONFIG, klinear.GemmConfig(16, 32, 64, 1, 4, 2, False, 2),
                      klinear.GemmConfig(16, 64, 64, 1, 4, 2, False, 4)]


@pytest.mark.parametrize("cfg", _DECODE_CANDIDATES, ids=lambda c: f"{c.BM}x{c.BN}x{c.BK}e{c.epi_split}")
@pytest.mark.parametrize("M,K,N,dtype,photons", [(8, 70, 44, torch.float32, 0.0),
                                                  (3, 40, 33, torch.bfloat16, 0.0),
                                                  (13, 24, 64, torch.float32, 0.5)])
def test_decode_configs_match_reference(kernel_device, cfg, M, K, N, dtype, photons):
    """The narrow tiles the GPU table gives a few rows (decoding with a KV cache) and the ones
    bench/linear_decode.py times compute the reference: rounding and shot read-out."""
    dev = kernel_device
    x, w, b = _inputs(M, K, N, dtype, dev, gen_seed=M * 31 + N)
    ranges = _ranges_from_data(x, w, dev)
    seed = _seed(dev, 2**35 + M)
    with klinear.override_gemm_config(cfg):
        y, _, _ = klinear.linear_forward(x, w, b, *ranges, seed, levels=256, lut=0.05, stream=7,
                                         index=LinearIndex.whole(M, N), observe=False,
                                         photons=photons)
    yr, _ = _ref_linear(x, w, b, ranges, seed, levels=256, lut=0.05, stream=7, photons=photons)
    _level_mismatches(y.cpu(), yr, ranges[2].cpu(), 256)


def test_gpu_table_gives_decoding_rows_the_decode_config():
    if not torch.cuda.is_available():
        pytest.skip("the GPU table (the interpreter uses one small config for every problem)")
    gpu = torch.device("cuda")
    for dtype in (torch.float32, torch.bfloat16):
        assert klinear.gemm_config(8, 384, 384, dtype, gpu) == klinear.DECODE_CONFIG
        assert klinear.gemm_config(16384, 384, 384, dtype, gpu) != klinear.DECODE_CONFIG
