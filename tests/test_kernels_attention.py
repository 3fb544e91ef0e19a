"""Fused optical attention kernels vs the plain-torch reference (semantics page, sections 3 and 7).

On a machine without a GPU these run under TRITON_INTERPRET=1 (see conftest.py) and are kept tiny;
the `gpu`-marked tests at the end use realistic shapes on the H200.

Tolerances (semantics page, section 7):
- Quantized outputs (y) may differ from the reference by one level of Q_y where float32
  accumulation order moves a value across a rounding boundary: such elements are counted and
  bounded, and no element may differ by more than one level. Likewise the row log-sum-exp, where
  an S element moved by one Q_s level.
- Matmul-derived values (gradients, y in passthrough) by relative norm error < 1e-2.
- The noise is bit-identical (same Philox index): at 4 levels Q_y is mostly noise and must agree
  exactly, also with global S indices past 2^32.
The oracle runs on the CPU wherever the shapes allow: torch on CUDA divides a tensor by a Python
scalar as a multiply by the reciprocal, so the reference's k / (levels - 1) is not correctly
rounded there (1 ulp off for some k); against a GPU-computed reference, one-ulp differences of
the 16-bit output are therefore not counted.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from torchtitan_ext.optical import reference as R
from torchtitan_ext.optical.kernels import attention as A
from torchtitan_ext.optical.kernels.quantizer import philox_bits24_rows

LEVELS = 256
LUT = 0.05
STREAM = 11
UNSET = (float("inf"), float("-inf"))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _rng(lo, hi, device):
    return torch.tensor([lo, hi], dtype=torch.float32, device=device)


def _observed(t, shrink=1.0):
    t = t.float()
    return torch.stack([t.min() * shrink, t.max() * shrink])


class Case:
    """Random inputs, ranges (initialised to slightly inside the data, so clamping happens),
    seeds and index maps of one attention call; runs the reference and the kernels."""

    def __init__(self, device, *, B=1, H=2, HKV=1, L=32, D=64, dtype=torch.bfloat16, causal=True,
                 bo=1, ho=2, levels=LEVELS, lut=LUT, ranges=True, seed=0, shrink=0.9, Lq=None,
                 q_start=None, kpm=None, noise=True, photons=0.0):
        """L is the key length; Lq query rows (default L) at q_start (default L - Lq); kpm a
        bool [B, L] key padding mask or None."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.noise = noise  # q_noise: false -> Q_s, Q_y deterministic
        self.photons = photons  # > 0: shot read-out of Q_s and Q_y
        Lq = L if Lq is None else Lq
        self.q_start = L - Lq if q_start is None else q_start
        self.Lq = Lq
        mk = lambda h, n: torch.randn(B, h, n, D, generator=g).to(device=device, dtype=dtype)
        self.q, self.k, self.v = mk(H, Lq), mk(HKV, L), mk(HKV, L)
        self.dy = torch.randn(B, H, Lq, D, generator=g).to(device=device, dtype=dtype)
        self.kpm = None if kpm is None else kpm.to(device)
        self.B, self.H, self.HKV, self.L, self.D = B, H, HKV, L, D
        self.causal, self.levels, self.lut = causal, levels, lut
        self.bo, self.ho = bo, ho
        self.Bg, self.Hg = B + bo + 1, H + ho + 3
        self.scale = D ** -0.5
        self.seeds = torch.randint(0, 2**62, (2,), generator=g, dtype=torch.int64).to(device)
        if ranges:
            self.q_range = _observed(self.q, shrink)
            self.k_range = _observed(self.k, shrink)
            self.v_range = _observed(self.v, shrink)
            kf = R._expand_kv(self.k.float(), H)
            self.s_range = _observed(self.q.float() @ kf.transpose(-1, -2), 0.8)
            # y range from a calibration pass (passthrough Q_y), shrunk so some y clamp.
            self.y_range = _rng(*UNSET, device)
            self.y_range = _observed(self.reference()["y_raw"], shrink)
        else:
            self.q_range = self.k_range = self.v_range = self.s_range = _rng(*UNSET, device)
            self.y_range = _rng(*UNSET, device)

    def maps(self):
        L, D = self.L, self.D
        return (R.IndexMap((self.bo, self.ho, self.q_start, 0), (self.Bg, self.Hg, L, L)),
                R.IndexMap((self.bo, self.ho, self.q_start, 0), (self.Bg, self.Hg, L, D)))

    def reference(self):
        """The oracle, on the CPU whenever the shapes allow: torch on CUDA divides by a Python
        scalar as a multiply by its reciprocal, so the reference's k / (levels - 1) is then not
        correctly rounded (1 ulp off for some k), which the semantics (and the kernels) are."""
        smap, ymap = self.maps()
        on_cpu = self.q.is_cuda and self.B * self.H * self.L * self.L <= 2**22
        cpu = (lambda t: t.cpu()) if on_cpu else (lambda t: t)
        out = R.optical_attention_forward(
            cpu(self.q), cpu(self.k), cpu(self.v), cpu(self.q_range), cpu(self.k_range),
            cpu(self.v_range), cpu(self.s_range), cpu(self.y_range), levels=self.levels,
            lut=self.lut, seeds=cpu(self.seeds), stream=STREAM, scale=self.scale,
            causal=self.causal, s_index_map=smap, y_index_map=ymap, noise=self.noise,
            key_padding_mask=None if self.kpm is None else cpu(self.kpm), q_start=self.q_start,
            photons=self.photons)
        self.ref_on_device = not on_cpu
        return {k: v.to(self.q.device) for k, v in out.items()}

    def reference_backward(self, fwd, clipped):
        return R.optical_attention_backward(
            self.dy, self.q, self.k, self.v, fwd, self.q_range, self.k_range, self.s_range,
            self.v_range, scale=self.scale, clipped=clipped)

    def kw(self):
        kw = dict(levels=self.levels, lut=self.lut, stream=STREAM, scale=self.scale,
                  causal=self.causal, batch_offset=self.bo, batch_global=self.Bg,
                  head_offset=self.ho, heads_global=self.Hg, noise=self.noise)
        if self.photons:
            kw.update(photons=self.photons)
        if self.kpm is not None or self.q_start:  # the training call passes neither
            kw.update(key_padding_mask=self.kpm, q_start=self.q_start)
        return kw

    def forward(self, observe=True):
        return A.attention_forward(self.q, self.k, self.v, self.q_range, self.k_range, self.v_range,
                                   self.s_range, self.y_range, self.seeds, observe=observe,
                                   **self.kw())

    def backward(self, y, stats, clipped, deterministic=None):
        return A.attention_backward(self.dy, self.q, self.k, self.v, y, stats, self.q_range,
                                    self.k_range, self.v_range, self.s_range, self.seeds,
                                    clipped=clipped, deterministic=deterministic, **self.kw())

    def y_level(self):
        lo, hi = self.y_range.tolist()
        return (hi - lo) / (self.lv(5) - 1) if lo <= hi else 0.0

    def lv(self, i):
        """Levels of quantizer i of (q, k, s, p, v, y)."""
        return self.levels if isinstance(self.levels, int) else self.levels[i]


def _relerr(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _ulp(x, dtype):
    """One unit in the last place of `dtype` at |x| (float32 tensor)."""
    fi = torch.finfo(dtype)
    e = torch.floor(torch.log2(x.abs().clamp_min(fi.tiny)))
    return torch.exp2(e) * fi.eps


def check_y(case, y, ref_y, max_frac=2e-3, ref=None, stats=None):
    """y equals the reference except for a few elements one Q_y level away (accumulation order
    moved y_raw across a rounding boundary) and, against a reference computed on the GPU, for
    one-ulp differences of the 16-bit output (see Case.reference)."""
    assert y.shape == ref_y.shape and y.dtype == ref_y.dtype
    assert torch.isfinite(y.float()).all()
    yf, rf = y.float(), ref_y.float()
    d = (yf - rf).abs()
    lvl = case.y_level()
    if lvl == 0.0:  # passthrough: y is y_raw cast to the input dtype
        assert _relerr(yf, rf) < 1e-2
        return
    ulp = torch.maximum(_ulp(yf, y.dtype), _ulp(rf, y.dtype))
    flips = d > ulp * 1.001
    ulp_only = (d > 0) & ~flips
    info = ""
    if flips.any():
        i = int(d.argmax())
        idx = [int(t) for t in torch.unravel_index(torch.tensor(i), d.shape)]
        info = (f"worst {idx}: y {yf.flatten()[i].item()} ref {rf.flatten()[i].item()}"
                f" level {lvl}; flips {int(flips.sum())} in rows "
                f"{sorted(set(map(tuple, flips.nonzero()[:, :3].tolist())))[:8]}")
        if ref is not None:
            info += f"; ref y_raw {ref['y_raw'].flatten()[i].item()}"
        if stats is not None and ref is not None:
            lse = _lse2(case, ref)
            b, h, r = idx[:3]
            info += f"; lse kernel {stats[b, h, r].item()} ref {lse[b, h, r].item()}"
    # one level plus the rounding of the dequantized value to the 16-bit output
    assert d.max().item() <= lvl * 1.001 + ulp.max().item(), info
    assert flips.float().mean().item() <= max_frac + 4.0 / d.numel(), info
    if not case.ref_on_device:
        assert ulp_only.float().mean().item() <= max_frac + 4.0 / d.numel(), int(ulp_only.sum())


def check_obs(case, obs, ref):
    t = lambda x: torch.stack([x.float().min(), x.float().max()])
    assert obs.shape == (5, 2) and obs.dtype == torch.float32
    torch.testing.assert_close(obs[0], t(case.q), rtol=0, atol=0)
    torch.testing.assert_close(obs[1], t(case.k), rtol=0, atol=0)
    torch.testing.assert_close(obs[2], t(case.v), rtol=0, atol=0)
    torch.testing.assert_close(obs[3], ref["s_obs"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(obs[4], ref["y_obs"], rtol=1e-4, atol=1e-5)


def _lse2(case, ref):
    """Reference row log-sum-exp (log2 domain); +inf in rows with no visible key (the kernel's
    convention, which makes the backward's P = 0 there)."""
    logits = ref["s"] * case.scale
    vis = R.attention_visibility(case.B, case.Lq, case.L, causal=case.causal,
                                 q_start=case.q_start, key_padding_mask=case.kpm,
                                 device=logits.device)
    if vis is not None:
        logits = logits.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1) / math.log(2.0)
    return torch.where(torch.isneginf(lse), float("inf"), lse)


def check_stats(case, stats, ref, max_frac=2e-3):
    """Row log-sum-exp (log2 domain) as the reference's, except in rows where a Q_s element
    moved by one level (accumulation order of S): there by at most that level's logit."""
    lse2 = _lse2(case, ref)
    dead = torch.isinf(lse2)
    assert torch.equal(torch.isinf(stats), dead)  # exactly the rows with no visible key
    stats, lse2 = stats.masked_fill(dead, 0.0), lse2.masked_fill(dead, 0.0)
    d = (stats - lse2).abs()
    off = d > 1e-4 + 1e-5 * lse2.abs()
    lo, hi = case.s_range.tolist()
    s_level = (hi - lo) / (case.lv(2) - 1) if lo <= hi else 0.0
    assert d.max().item() <= s_level * case.scale / math.log(2.0) + 1e-4, d.max().item()
    assert off.float().mean().item() <= max_frac + 2.0 / d.numel(), int(off.sum())


def check_grads(grads, ref_grads, tol=1e-2):
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert torch.isfinite(g.float()).all(), name
        err = _relerr(g.float(), r.float())
        assert err < tol, (name, err)


def run_full(case, clipped=False, max_frac=2e-3):
    ref = case.reference()
    y, stats, obs = case.forward()
    check_y(case, y, ref["y"], max_frac, ref=ref, stats=stats)
    check_obs(case, obs, ref)
    check_stats(case, stats, ref)
    grads = case.backward(y, stats, clipped)
    check_grads(grads, case.reference_backward(ref, clipped))
    return ref, y, stats, grads


# --------------------------------------------------------------------------------------------
# interpreter-sized tests (also run on the GPU)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("L", [1, 17, 64, 100])
def test_lengths(kernel_device, L):
    H = 2 if L <= 64 else 1
    run_full(Case(kernel_device, H=H, HKV=1, L=L, seed=L))


@pytest.mark.parametrize("group", [1, 2, 4])
def test_gqa(kernel_device, group):
    run_full(Case(kernel_device, H=4, HKV=4 // group, L=40, seed=group))


@pytest.mark.parametrize("clipped", [False, True])
def test_fp16_d128_clipped(kernel_device, clipped):
    run_full(Case(kernel_device, H=2, HKV=1, L=48, D=128, dtype=torch.float16, seed=3),
             clipped=clipped)


def test_clipped_bf16_actually_clips(kernel_device):
    case = Case(kernel_device, H=2, HKV=2, L=33, seed=5, shrink=0.6)
    ref, y, stats, grads = run_full(case, clipped=True)
    # the clamp masks of the reference are non-trivial here, so the test exercises them
    assert not R.clamp_mask(ref["s_raw"], case.s_range).all()
    assert not R.clamp_mask(case.q, case.q_range).all()
    ste = case.backward(y, stats, clipped=False)
    assert (grads[0] == 0).sum() > (ste[0] == 0).sum()


def test_non_causal(kernel_device):
    run_full(Case(kernel_device, H=2, HKV=1, L=40, causal=False, seed=7))


def test_passthrough_uninitialised_ranges(kernel_device):
    case = Case(kernel_device, H=2, HKV=1, L=24, ranges=False, seed=8)
    ref, y, stats, grads = run_full(case)


@pytest.mark.parametrize("levels", [4, 1000])
def test_other_levels(kernel_device, levels):
    # 4 levels: Q_y is mostly noise, so exact agreement proves identical Philox streams;
    # 1000 levels with bf16: the two-byte split of Q_p(P) (P_MODE 1).
    case = Case(kernel_device, H=2, HKV=1, L=24, levels=levels, seed=9)
    ref, y, _, _ = run_full(case)
    if levels == 4:
        assert (y.float() == ref["y"].float()).float().mean() > 0.99


def test_noise_index_past_2_32(kernel_device):
    # global S indices ~ 6e9: the high counter word of Philox is exercised
    case = Case(kernel_device, H=2, HKV=1, L=16, bo=3_000_000, seed=10)
    case.Bg = case.bo + case.B
    assert case.Bg * case.Hg * case.L * case.L > 2**32
    ref, y, _, _ = run_full(case)
    assert (y.float() == ref["y"].float()).float().mean() > 0.99


def test_seeds_and_determinism(kernel_device):
    case = Case(kernel_device, H=2, HKV=1, L=32, seed=12)
    y1, s1, o1 = case.forward()
    y2, s2, o2 = case.forward()
    assert torch.equal(y1, y2) and torch.equal(s1, s2) and torch.equal(o1, o2)
    case.seeds = case.seeds + torch.tensor([0, 1], device=case.seeds.device)
    y3, s3, _ = case.forward()
    assert torch.equal(s1, s3)  # Q_s noise unchanged
    assert not torch.equal(y1, y3)  # Q_y noise changed


@pytest.mark.parametrize("dtype, L, group, causal", [
    (torch.bfloat16, 37, 2, True), (torch.float16, 50, 1, False), (torch.bfloat16, 1, 1, True)])
def test_q_noise_off_matches_reference(kernel_device, dtype, L, group, causal):
    # q_noise: false -- Q_s and Q_y round deterministically in forward and backward.
    case = Case(kernel_device, H=2, HKV=2 // group, L=L, dtype=dtype, causal=causal, seed=40 + L,
                noise=False)
    run_full(case)


def test_q_noise_off_is_det_and_seed_free(kernel_device):
    # 4 levels: with noise on, Q_y is mostly noise; off, kernel and reference agree exactly,
    # differ from the noisy result, and the seeds change nothing.
    case = Case(kernel_device, H=2, HKV=1, L=36, levels=4, seed=41, noise=False)
    ref, y, stats, grads = run_full(case)
    assert (y.float() == ref["y"].float()).float().mean() > 0.99
    case.seeds = case.seeds + 12345
    y2, stats2, _ = case.forward()
    assert torch.equal(y, y2) and torch.equal(stats, stats2)
    assert torch.equal(grads[0], case.backward(y2, stats2, False)[0])
    case.noise = True
    y_noisy, _, _ = case.forward()
    assert (y_noisy.float() != y.float()).float().mean() > 0.2
    # the reference's noise-off forward is the det computation of section 3, step by step
    cpu = lambda t: t.detach().cpu()
    q, k, v = cpu(case.q), cpu(case.k), cpu(case.v)
    s = R.quantize(R.quantize(q, cpu(case.q_range), 4).float()
                   @ R.quantize(k, cpu(case.k_range), 4, lut=LUT).float().transpose(-1, -2),
                   cpu(case.s_range), 4)
    mask = R._causal_mask(case.L, case.L, "cpu")
    p = torch.softmax((s * case.scale).masked_fill(~mask, float("-inf")), -1)
    pq = R.quantize(p, torch.tensor(R.P_RANGE), 4)
    y_det = R.quantize(pq @ R.quantize(v, cpu(case.v_range), 4, lut=LUT).float(),
                       cpu(case.y_range), 4).to(q.dtype)
    assert torch.equal(ref["y"].cpu(), y_det)


@pytest.mark.parametrize("L, H, HKV, causal, clipped, dtype, D, noise", [
    (37, 4, 2, True, False, torch.bfloat16, 64, True),
    (50, 2, 1, False, True, torch.float16, 128, True),
    (1, 2, 2, True, False, torch.bfloat16, 32, True),
    (33, 2, 1, True, True, torch.bfloat16, 64, False),
])
def test_deterministic_backward_matches_reference(kernel_device, L, H, HKV, causal, clipped,
                                                  dtype, D, noise):
    # The dQ pass without atomics (semantics 6b): the reference's gradients within the usual
    # tolerances, dK and dV exactly those of the fast path, bit-identical from call to call.
    case = Case(kernel_device, H=H, HKV=HKV, L=L, D=D, dtype=dtype, causal=causal,
                seed=60 + L, shrink=0.7 if clipped else 0.9, noise=noise)
    ref = case.reference()
    y, stats, _ = case.forward()
    grads = case.backward(y, stats, clipped, deterministic=True)
    check_grads(grads, case.reference_backward(ref, clipped))
    fast = case.backward(y, stats, clipped, deterministic=False)
    assert torch.equal(grads[1], fast[1]) and torch.equal(grads[2], fast[2])
    # the same terms summed in another order (a wrong S tile, e.g. other noise words, gives
    # ~3e-3 here)
    assert _relerr(grads[0].float(), fast[0].float()) < 1e-3
    again = case.backward(y, stats, clipped, deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(grads, again))


def test_deterministic_flag_is_read_at_call_time(kernel_device, monkeypatch):
    # deterministic=None follows torch.are_deterministic_algorithms_enabled() at call time.
    case = Case(kernel_device, H=2, HKV=1, L=24, seed=70)
    y, stats, _ = case.forward()
    calls = []
    real = A._dq_deterministic
    monkeypatch.setattr(A, "_dq_deterministic", lambda *a, **k: calls.append(1) or real(*a, **k))
    case.backward(y, stats, False)
    assert calls == []
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det = case.backward(y, stats, False)
    finally:
        torch.use_deterministic_algorithms(was)
    assert calls == [1]
    assert torch.equal(det[0], case.backward(y, stats, False, deterministic=True)[0])


def test_observe_off(kernel_device):
    case = Case(kernel_device, H=2, HKV=1, L=20, seed=13)
    y, _, obs = case.forward(observe=False)
    y_on, _, _ = case.forward(observe=True)
    assert torch.equal(y, y_on)
    assert torch.equal(obs[:, 0], torch.full((5,), float("inf"), device=obs.device))
    assert torch.equal(obs[:, 1], torch.full((5,), float("-inf"), device=obs.device))


def test_strided_inputs_and_other_tiles(kernel_device):
    # [B, L, H, D] storage viewed as [B, H, L, D]; a second tiling gives the same results
    case = Case(kernel_device, H=2, HKV=2, L=40, seed=14)
    for name in ("q", "k", "v", "dy"):
        t = getattr(case, name)
        setattr(case, name, t.transpose(1, 2).contiguous().transpose(1, 2))
    assert not case.q.is_contiguous()
    ref, y, stats, grads = run_full(case)
    fwd_cfg = (16, 16, 4, 1)
    bwd_cfg = (16, 16, 4, 1)
    with A.override_configs(fwd=fwd_cfg, bwd=bwd_cfg):
        y2, stats2, _ = case.forward()
        grads2 = case.backward(y2, stats2, False)
    check_y(case, y2, y)
    for g, g2 in zip(grads, grads2):
        assert _relerr(g2.float(), g.float()) < 1e-2


@triton.jit
def _draws_kernel(OUT, seed, stream, row0, col0, WIDTH, R: tl.constexpr, W: tl.constexpr,
                  RUNS: tl.constexpr):
    rows = tl.arange(0, R)
    offs = tl.arange(0, W)
    row_index = (row0 + rows).to(tl.int64) * WIDTH
    w = philox_bits24_rows(seed, stream, row_index, col0, col0 + offs, W, RUNS)
    tl.store(OUT + rows[:, None] * W + offs[None, :], w)


@pytest.mark.parametrize("W", [8, 32])
def test_s_tile_draw_layouts_equal_the_reference(kernel_device, W):
    """The S tiles' rounding draws are the reference's whichever way the kernels lay them out:
    one Philox block per element (RUNS 0), runs of eight by joins (1) or by broadcasts (2)."""
    n_rows, width, row0, col0 = 16, 1024, 40, 64 + 2 * W  # rows of a [.., 1024] index space
    rows = torch.arange(row0, row0 + n_rows, dtype=torch.int64)[:, None]
    index = rows * width + torch.arange(col0, col0 + W)[None, :]
    seed = 123456789
    want = R.philox_uniform(seed, 5, index) * 16777216.0
    for runs in (0, 1, 2):
        out = torch.empty((n_rows, W), dtype=torch.float32, device=kernel_device)
        _draws_kernel[(1,)](out, seed, 5, row0, col0, width, R=n_rows, W=W, RUNS=runs)
        assert torch.equal(out.cpu(), want), runs


@pytest.mark.parametrize("L", [48, 47])
def test_draw_layout_override_keeps_the_bits(kernel_device, L):
    """`override_configs(draws=...)` reaches the launches (RUNS8 2 where L % 8 == 0) and changes
    no bit of the forward, of the backward's dK and dV, or of the deterministic backward (the
    other dQ adds with atomics, in no fixed order on a GPU)."""
    case = Case(kernel_device, H=2, HKV=1, L=L, seed=21)
    out = {}
    for draws in ("joins", "broadcasts"):
        with A.override_configs(draws={"fwd": draws, "bwd": draws, "dq": draws}):
            for kind in ("fwd", "bwd", "dq"):
                assert A.runs8(kind, L) == (0 if L % 8 else {"joins": 1, "broadcasts": 2}[draws])
            y, stats, obs = case.forward()
            _, dk, dv = case.backward(y, stats, False, deterministic=False)  # dQ: atomics
            out[draws] = (y, stats, obs, dk, dv,
                          *case.backward(y, stats, False, deterministic=True))
    for a, b in zip(out["joins"], out["broadcasts"]):
        assert torch.equal(a, b)
    for kind in ("fwd", "bwd", "dq"):  # the kernels bench/noise_layouts.py compiles
        assert "RUNS8" in A.triton_kernel(kind).arg_names
    with pytest.raises(ValueError, match="kind"):
        A.triton_kernel("pass2")
    for bad in ({"fwd": "shuffles"}, {"pass2": "joins"}):
        with pytest.raises(ValueError, match="draws"):
            with A.override_configs(draws=bad):
                pass


def test_errors(kernel_device):
    case = Case(kernel_device, H=2, HKV=1, L=8, seed=15)
    with pytest.raises(ValueError, match="head dim"):
        A.attention_forward(case.q[..., :48], case.k[..., :48], case.v[..., :48], case.q_range,
                            case.k_range, case.v_range, case.s_range, case.y_range, case.seeds,
                            observe=True, **case.kw())
    with pytest.raises(ValueError, match="float64"):
        A.attention_forward(case.q.double(), case.k.double(), case.v.double(), case.q_range,
                            case.k_range, case.v_range, case.s_range, case.y_range, case.seeds,
                            observe=True, **case.kw())
    kw = case.kw()
    kw["heads_global"] = case.H + case.ho - 1
    with pytest.raises(ValueError, match="head shard"):
        A.attention_forward(case.q, case.k, case.v, case.q_range, case.k_range, case.v_range,
                            case.s_range, case.y_range, case.seeds, observe=True, **kw)
    with pytest.raises(ValueError, match="multiple"):
        A.attention_forward(case.q, case.k.expand(-1, 3, -1, -1), case.v.expand(-1, 3, -1, -1),
                            case.q_range, case.k_range, case.v_range, case.s_range, case.y_range,
                            case.seeds, observe=True, **case.kw())


@pytest.mark.parametrize("L, Lq, D, group, padded", [
    (40, None, 64, 2, False), (33, None, 128, 1, True), (37, 1, 64, 2, True), (48, 5, 32, 1, False)])
def test_float32(kernel_device, L, Lq, D, group, padded):
    """float32 operands (an HF export loaded as saved): the kernels in IEEE precision equal the
    float32 reference, forward and backward; also decode steps (Lq = 1) and chunks."""
    kpm = _pad_mask(2, L, [3, 0], [0, 2]) if padded else None
    case = Case(kernel_device, B=2, H=2, HKV=2 // group, L=L, Lq=Lq, D=D, dtype=torch.float32,
                seed=70 + L, kpm=kpm)
    ref = case.reference()
    y, stats, obs = case.forward()
    assert y.dtype == torch.float32
    check_y(case, y, ref["y"], ref=ref, stats=stats)
    check_stats(case, stats, ref)
    if Lq is None:  # the reference backward covers whole-sequence attention
        grads = case.backward(y, stats, False)
        check_grads(grads, case.reference_backward(ref, False), tol=1e-3)
        check_padding(case, y, stats, grads)


# --------------------------------------------------------------------------------------------
# key padding mask and cached decoding (issue 15)
# --------------------------------------------------------------------------------------------
def _pad_mask(B, L, left, right):
    """bool [B, L]: sequence b has left[b] pad keys in front, right[b] behind (True = visible)."""
    j = torch.arange(L)[None, :]
    lt = torch.tensor(left)[:, None]
    rt = torch.tensor(right)[:, None]
    return (j >= lt) & (j < L - rt)


def check_padding(case, y, stats, grads):
    """Rows with no visible key output 0 and get zero dq; hidden keys get zero dk, dv."""
    vis = R.attention_visibility(case.B, case.Lq, case.L, causal=case.causal,
                                 q_start=case.q_start, key_padding_mask=case.kpm,
                                 device=y.device)
    dead = ~vis.any(-1).expand(case.B, case.H, case.Lq)
    assert torch.equal(torch.isinf(stats), dead)
    assert (y[dead] == 0).all()
    if grads is not None:
        dq, dk, dv = grads
        assert (dq[dead] == 0).all()
        if case.kpm is not None:
            hidden = ~case.kpm[:, None, :].expand(case.B, case.HKV, case.L)
            assert (dk[hidden] == 0).all() and (dv[hidden] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["left", "right", "both"])
def test_key_padding(kernel_device, kind, dtype):
    B, L = 3, 37
    left = {"left": [5, 0, 20], "right": [0, 0, 0], "both": [3, 0, 37]}[kind]
    right = {"left": [0, 0, 0], "right": [7, 0, 30], "both": [4, 1, 0]}[kind]
    case = Case(kernel_device, B=B, H=2, HKV=1, L=L, dtype=dtype, seed=40,
                kpm=_pad_mask(B, L, left, right))
    ref, y, stats, grads = run_full(case)
    check_padding(case, y, stats, grads)
    if kind == "both":  # sequence 2 is all padding: every row is dead
        assert (y[2] == 0).all() and torch.isinf(stats[2]).all()


def test_key_padding_gqa_random_mask_non_causal(kernel_device):
    g = torch.Generator().manual_seed(3)
    kpm = torch.rand(2, 29, generator=g) < 0.7
    case = Case(kernel_device, B=2, H=4, HKV=2, L=29, seed=41, kpm=kpm, causal=False)
    ref, y, stats, grads = run_full(case)
    check_padding(case, y, stats, grads)


@pytest.mark.parametrize("L", [1, 7, 16, 33, 64])
def test_decode_step(kernel_device, L):
    # one query row at q_start = L - 1: L % 8 != 0 takes the per-element noise path
    kpm = _pad_mask(2, L, [min(2, L - 1), 0], [0, 0])
    case = Case(kernel_device, B=2, H=4, HKV=2, L=L, Lq=1, seed=50 + L, kpm=kpm)
    ref, y, stats, grads = run_full(case)
    check_padding(case, y, stats, grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Lq, L, q_start", [(5, 17, 12), (5, 17, 3), (20, 40, 20), (33, 48, 0)])
def test_chunked_prefill(kernel_device, Lq, L, q_start, dtype):
    case = Case(kernel_device, B=1, H=2, HKV=1, L=L, Lq=Lq, q_start=q_start, dtype=dtype,
                seed=60 + L + q_start)
    run_full(case)


def test_chunked_prefill_padded_noise_bits(kernel_device):
    # 4 levels: Q_y is mostly noise, so agreeing with the reference proves the rows carry the
    # noise indices of rows q_start + r of the full attention
    kpm = _pad_mask(2, 24, [3, 0], [0, 2])
    case = Case(kernel_device, B=2, H=2, HKV=1, L=24, Lq=6, q_start=14, levels=4, seed=70,
                kpm=kpm)
    ref, y, stats, grads = run_full(case)
    assert (y.float() == ref["y"].float()).float().mean() > 0.99


@pytest.mark.parametrize("Lq, q_start, dtype, photons", [
    (1, 9, torch.bfloat16, 0.0), (1, 23, torch.float32, 0.0), (4, 7, torch.float16, 2.0)])
def test_q_start_on_the_device(kernel_device, Lq, q_start, dtype, photons):
    """q_start as a 0-d int64 device tensor (a static-cache step under a CUDA graph) gives the
    bits of the int q_start, with the row noise of its absolute position (decode rows far from
    the key tensor's end, as in a static cache); the backward refuses it."""
    kpm = _pad_mask(2, 24, [3, 0], [0, 0]) & (torch.arange(24) <= q_start + Lq - 1)[None, :]
    case = Case(kernel_device, B=2, H=2, HKV=1, L=24, Lq=Lq, q_start=q_start, dtype=dtype,
                seed=80 + q_start, kpm=kpm, photons=photons)
    torch.manual_seed(0)
    y, stats, obs = case.forward()
    ref = case.reference()
    check_y(case, y, ref["y"], ref=ref, stats=stats)
    on_device = torch.tensor(q_start, dtype=torch.int64, device=kernel_device)
    kw = dict(case.kw(), q_start=on_device)
    y2, stats2, obs2 = A.attention_forward(case.q, case.k, case.v, case.q_range, case.k_range,
                                           case.v_range, case.s_range, case.y_range, case.seeds,
                                           observe=True, **kw)
    assert torch.equal(y, y2) and torch.equal(stats, stats2) and torch.equal(obs, obs2)
    with pytest.raises(ValueError, match="device tensor is for inference"):
        A.attention_backward(case.dy, case.q, case.k, case.v, y, stats, case.q_range,
                             case.k_range, case.v_range, case.s_range, case.seeds, clipped=False,
                             **kw)
    with pytest.raises(ValueError, match="0-d torch.int64"):
        A.attention_forward(case.q, case.k, case.v, case.q_range, case.k_range, case.v_range,
                            case.s_range, case.y_range, case.seeds, observe=True,
                            **dict(kw, q_start=on_device.int()))


@pytest.mark.parametrize("shape", ["left_pad", "decode", "chunk_pad", "chunk_non_causal"])
def test_padding_and_cache_deterministic_dq(kernel_device, shape):
    """The deterministic dQ pass (no atomics) with key mask and q_start: equals the reference
    and the atomic path; dead rows get dq = 0."""
    kpm = _pad_mask(2, 21, [4, 0], [0, 3])
    kw = {"left_pad": dict(L=21, kpm=kpm), "decode": dict(L=21, Lq=1, kpm=kpm),
          "chunk_pad": dict(L=21, Lq=5, q_start=13, kpm=kpm),
          "chunk_non_causal": dict(L=21, Lq=6, q_start=2, kpm=kpm, causal=False)}[shape]
    case = Case(kernel_device, B=2, H=4, HKV=2, seed=80, **kw)
    ref = case.reference()
    y, stats, _ = case.forward()
    grads = case.backward(y, stats, False, deterministic=True)
    check_grads(grads, case.reference_backward(ref, False))
    check_padding(case, y, stats, grads)
    fast = case.backward(y, stats, False, deterministic=False)
    assert torch.equal(grads[1], fast[1]) and torch.equal(grads[2], fast[2])
    assert _relerr(grads[0].float(), fast[0].float()) < 1e-2


def _step(case, t0, t1):
    """The kernel on query rows [t0, t1) over keys [0, t1) (a cached step at q_start = t0)."""
    kw = case.kw()
    kw.update(q_start=t0, key_padding_mask=None if case.kpm is None else case.kpm[:, :t1])
    return A.attention_forward(case.q[:, :, t0:t1], case.k[:, :, :t1], case.v[:, :, :t1],
                               case.q_range, case.k_range, case.v_range, case.s_range,
                               case.y_range, case.seeds, observe=False, **kw)


def test_kernel_cached_decoding_equals_full_forward_noise_off(kernel_device):
    """Prefix, a chunk and single decode steps (q_start = t) reproduce the full forward's rows
    with the read-out noise off (up to accumulation order: one Q_y level at most)."""
    kpm = _pad_mask(2, 23, [5, 0], [0, 0])
    case = Case(kernel_device, B=2, H=4, HKV=2, L=23, seed=90, kpm=kpm, noise=False)
    y_full, s_full, _ = case.forward(observe=False)
    parts = [_step(case, 0, 8), _step(case, 8, 13)] + [_step(case, t, t + 1) for t in range(13, 23)]
    y = torch.cat([p[0] for p in parts], 2)
    stats = torch.cat([p[1] for p in parts], 2)
    check_y(case, y, y_full)
    assert torch.equal(torch.isinf(stats), torch.isinf(s_full))
    fin = torch.isfinite(s_full)
    assert (stats[fin] - s_full[fin]).abs().max() < 1e-3


def test_training_path_unchanged_by_defaults(kernel_device):
    # explicit mask=None, q_start=0 is the training call, bit for bit
    case = Case(kernel_device, H=2, HKV=1, L=40, seed=71)
    y, s, o = case.forward()
    y2, s2, o2 = A.attention_forward(case.q, case.k, case.v, case.q_range, case.k_range,
                                     case.v_range, case.s_range, case.y_range, case.seeds,
                                     observe=True, key_padding_mask=None, q_start=0, **case.kw())
    assert torch.equal(y, y2) and torch.equal(s, s2) and torch.equal(o, o2)
    all_visible = torch.ones(1, 40, dtype=torch.bool, device=kernel_device)
    y3, s3, _ = A.attention_forward(case.q, case.k, case.v, case.q_range, case.k_range,
                                    case.v_range, case.s_range, case.y_range, case.seeds,
                                    observe=True, key_padding_mask=all_visible, **case.kw())
    check_y(case, y3, y)  # the masked path computes the same up to accumulation order


def test_padding_errors(kernel_device):
    case = Case(kernel_device, H=2, HKV=1, L=8, Lq=3, seed=72)
    args = (case.q, case.k, case.v, case.q_range, case.k_range, case.v_range, case.s_range,
            case.y_range, case.seeds)
    kw = case.kw()
    kw.pop("q_start", None)
    kw.pop("key_padding_mask", None)
    with pytest.raises(ValueError, match="q_start"):
        A.attention_forward(*args, observe=True, q_start=6, **kw)
    with pytest.raises(ValueError, match="q_start"):
        A.attention_forward(*args, observe=True, q_start=-1, **kw)
    bad = torch.ones(1, 7, dtype=torch.bool, device=kernel_device)
    with pytest.raises(ValueError, match="key_padding_mask"):
        A.attention_forward(*args, observe=True, q_start=5, key_padding_mask=bad, **kw)
    with pytest.raises(ValueError, match="key_padding_mask"):
        A.attention_forward(*args, observe=True, q_start=5,
                            key_padding_mask=torch.ones(1, 8, device=kernel_device), **kw)


# --------------------------------------------------------------------------------------------
# GPU tests at realistic shapes
# --------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("hkv", [16, 4])
def test_gpu_realistic(hkv):
    case = Case(torch.device("cuda"), B=2, H=16, HKV=hkv, L=2048, D=128, seed=21)
    run_full(case, clipped=False)


@gpu
def test_gpu_realistic_clipped_d64_fp16():
    case = Case(torch.device("cuda"), B=2, H=16, HKV=8, L=1000, D=64, dtype=torch.float16,
                seed=22)
    run_full(case, clipped=True)


def _random_left_padding(B, L, seed):
    g = torch.Generator().manual_seed(seed)
    left = torch.randint(0, L // 2, (B,), generator=g).tolist()
    left[0] = 0  # one full sequence
    return _pad_mask(B, L, left, [0] * B)


@gpu
@pytest.mark.parametrize("hkv", [8, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_key_padding_realistic(hkv, dtype):
    kpm = _random_left_padding(4, 1024, 31)
    case = Case(torch.device("cuda"), B=4, H=8, HKV=hkv, L=1024, D=64, dtype=dtype, seed=31,
                kpm=kpm)
    ref, y, stats, grads = run_full(case)
    check_padding(case, y, stats, grads)
    det = case.backward(y, stats, False, deterministic=True)
    check_grads(det, case.reference_backward(ref, False))


@gpu
@pytest.mark.parametrize("L", [1023, 1024, 4096])
def test_gpu_decode_realistic(L):
    kpm = _random_left_padding(4, L, 32)
    case = Case(torch.device("cuda"), B=4, H=8, HKV=2, L=L, Lq=1, D=128, seed=32, kpm=kpm)
    ref, y, stats, grads = run_full(case)
    check_padding(case, y, stats, grads)


@gpu
def test_gpu_chunked_prefill_realistic():
    kpm = _pad_mask(4, 1000, [0, 17, 300, 999], [0, 0, 0, 0])
    case = Case(torch.device("cuda"), B=4, H=8, HKV=4, L=1000, Lq=100, q_start=900, D=64,
                dtype=torch.float16, seed=33, kpm=kpm)
    ref, y, stats, grads = run_full(case)
    check_padding(case, y, stats, grads)


@gpu
def test_gpu_cached_decoding_equals_full_forward_noise_off():
    kpm = _random_left_padding(4, 1024, 34)
    case = Case(torch.device("cuda"), B=4, H=8, HKV=2, L=1024, D=64, seed=34, kpm=kpm,
                noise=False)
    y_full, _, _ = case.forward(observe=False)
    parts = [_step(case, 0, 1000)] + [_step(case, t, t + 1) for t in range(1000, 1024)]
    check_y(case, torch.cat([p[0] for p in parts], 2), y_full)


@gpu
def test_gpu_padding_and_decode_no_host_sync():
    kpm = _random_left_padding(2, 2048, 35)
    case = Case(torch.device("cuda"), B=2, H=16, HKV=4, L=2048, Lq=1, D=128, seed=35, kpm=kpm)
    full = Case(torch.device("cuda"), B=2, H=16, HKV=4, L=2048, D=128, seed=35, kpm=kpm)
    for c in (case, full):  # compile outside the checked region
        y, s, _ = c.forward()
        c.backward(y, s, True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for c in (case, full):
            y, s, _ = c.forward(observe=True)
            dq, dk, dv = c.backward(y, s, True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(dq.float()).all()


@gpu
def test_gpu_recompute_bit_identical():
    case = Case(torch.device("cuda"), B=2, H=16, HKV=16, L=2048, D=128, seed=23)
    y1, s1, o1 = case.forward()
    torch.cuda.synchronize()
    y2, s2, o2 = case.forward()
    assert torch.equal(y1, y2) and torch.equal(s1, s2) and torch.equal(o1, o2)
    g1 = case.backward(y1, s1, False)
    g2 = case.backward(y2, s2, False)
    # dK, dV are accumulated in registers: identical. dQ uses float32 atomics: order may vary.
    assert torch.equal(g1[1], g2[1]) and torch.equal(g1[2], g2[2])
    assert _relerr(g1[0].float(), g2[0].float()) < 1e-3


@gpu
@pytest.mark.parametrize("hkv, clipped", [(16, False), (4, True)])
def test_gpu_deterministic_backward_bit_identical(hkv, clipped):
    # Semantics 6b on the GPU: two backward calls of the deterministic path give the same bits
    # (the fast path's dQ atomics need not), and match the reference within tolerance.
    case = Case(torch.device("cuda"), B=2, H=16, HKV=hkv, L=2048, D=128, seed=25)
    ref = case.reference()
    y, s, _ = case.forward()
    g1 = case.backward(y, s, clipped, deterministic=True)
    torch.cuda.synchronize()
    g2 = case.backward(y, s, clipped, deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    check_grads(g1, case.reference_backward(ref, clipped))
    fast = case.backward(y, s, clipped, deterministic=False)
    assert torch.equal(g1[1], fast[1]) and torch.equal(g1[2], fast[2])
    assert _relerr(g1[0].float(), fast[0].float()) < 1e-3
    torch.cuda.set_sync_debug_mode("error")  # the deterministic path syncs no more than the fast
    try:
        case.backward(y, s, clipped, deterministic=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@gpu
def test_gpu_no_host_sync():
    case = Case(torch.device("cuda"), B=2, H=16, HKV=4, L=2048, D=128, seed=24)
    y, s, _ = case.forward()  # compile outside the checked region
    case.backward(y, s, True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, s, obs = case.forward(observe=True)
        case.forward(observe=False)
        dq, dk, dv = case.backward(y, s, True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(dq.float()).all()


# --------------------------------------------------------------------------------------------
# Issue 16: per-quantizer levels and the shot read-out
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", range(6))
def test_per_quantizer_levels(kernel_device, which):
    """Lowering exactly one of (Q_q, Q_k, Q_s, Q_p, Q_v, Q_y) changes y vs all-256 and equals
    the reference (forward, statistics, gradients)."""
    lv = [256] * 6
    lv[which] = 6 if which != 3 else 3000  # Q_p: also exercises P_MODE 1 (two-byte levels)
    lv = tuple(lv)
    case = Case(kernel_device, H=2, HKV=1, L=33, levels=lv, seed=90 + which, noise=False)
    ref, y, stats, grads = run_full(case)
    base = Case(kernel_device, H=2, HKV=1, L=33, levels=256, seed=90 + which, noise=False)
    y256, _, _ = base.forward()
    assert (y != y256).sum() >= 5
    # (256,) * 6 is the int path bit for bit, noise on
    c1 = Case(kernel_device, H=2, HKV=1, L=33, levels=(256,) * 6, seed=99)
    c2 = Case(kernel_device, H=2, HKV=1, L=33, levels=256, seed=99)
    assert torch.equal(c1.forward()[0], c2.forward()[0])


@pytest.mark.parametrize("seed", [3, 4])
def test_exact_softmax_ties_round_as_the_reference(kernel_device, seed):
    """Every key of a head equal, read-out noise off: each row's S values are equal, so row i
    has P = 1 / (i + 1) exactly, and row 1 meets Q_p's exact tie P * 255 = 127.5 (rounds to 128).
    The kernels' softmax runs on level indices (`_logit_step`): the row maximum's exponent must
    be exactly 0 there, as the reference's, or row 1 rounds to 127 in some heads."""
    case = Case(kernel_device, B=2, H=4, HKV=2, L=16, seed=seed, noise=False)
    case.k = case.k[:, :, :1].expand_as(case.k).contiguous()
    case.k_range = _observed(case.k, 0.9)
    kf = R._expand_kv(case.k.float(), case.H)
    case.s_range = _observed(case.q.float() @ kf.transpose(-1, -2), 0.8)
    case.y_range = _observed(case.reference()["y_raw"], 0.9)
    ref = case.reference()
    y, _, _ = case.forward()
    assert torch.equal(y[:, :, :2].float(), ref["y"][:, :, :2].float())
    check_y(case, y, ref["y"], ref=ref)
    with A.override_configs(code_scratch_bytes=0):  # pass 2 regenerating S: the same P
        assert torch.equal(case.forward()[0], y)


def test_per_quantizer_levels_noise_on_gqa_bf16(kernel_device):
    case = Case(kernel_device, H=4, HKV=2, L=40, levels=(64, 32, 128, 512, 16, 64), seed=97)
    run_full(case)


SHOT_CASES = [
    # (B, H, HKV, L, Lq, D, dtype, causal, kpm, levels, photons)
    (1, 2, 1, 32, None, 64, torch.bfloat16, True, None, 256, 0.05),  # L % 8 == 0: RUNS8
    (1, 2, 2, 29, None, 32, torch.float16, False, None, 64, 0.5),  # odd L: per-element Philox
    (2, 4, 2, 24, None, 64, torch.bfloat16, True, "pad", (128, 256, 64, 256, 128, 32), 0.2),
    (2, 2, 1, 24, 6, 64, torch.bfloat16, True, "pad", 256, 0.1),  # chunked prefill, q_start
]


def _shot_case(dev, B, H, HKV, L, Lq, D, dtype, causal, kpm, levels, photons, **kw):
    mask = None
    if kpm == "pad":
        mask = _pad_mask(B, L, [0, 5][:B], [3, 0][:B])
    return Case(dev, B=B, H=H, HKV=HKV, L=L, Lq=Lq, D=D, dtype=dtype, causal=causal, kpm=mask,
                levels=levels, photons=photons, seed=L + H, **kw)


@pytest.mark.parametrize("B,H,HKV,L,Lq,D,dtype,causal,kpm,levels,photons", SHOT_CASES)
def test_shot_readout_matches_reference(kernel_device, B, H, HKV, L, Lq, D, dtype, causal, kpm,
                                        levels, photons):
    """Shot read-out of Q_s (K = D) and Q_y (K = keys seen): kernel == reference (same z up to
    the platform's log/cos), forward, row statistics, observed ranges and gradients (the
    backward regenerates the forward's S); the deterministic dQ path too."""
    case = _shot_case(kernel_device, B, H, HKV, L, Lq, D, dtype, causal, kpm, levels, photons)
    ref, y, stats, grads = run_full(case)
    # not the rounding read-out, and it depends on n
    rounding = _shot_case(kernel_device, B, H, HKV, L, Lq, D, dtype, causal, kpm, levels, 0.0)
    assert (rounding.forward()[0] != y).sum() >= 3
    more = _shot_case(kernel_device, B, H, HKV, L, Lq, D, dtype, causal, kpm, levels,
                      photons * 1e4)
    assert (more.forward()[0] != y).sum() >= 3
    # repeatable for the same seeds
    assert torch.equal(case.forward()[0], y)
    g_det = case.backward(y, stats, False, deterministic=True)
    check_grads(g_det, case.reference_backward(ref, False))
    assert torch.equal(g_det[1], grads[1]) and torch.equal(g_det[2], grads[2])


def test_shot_readout_noise_off_is_det(kernel_device):
    """q_noise: false turns the shot noise off: the result equals the det-rounding call."""
    a = Case(kernel_device, H=2, HKV=1, L=28, photons=0.05, noise=False, seed=5)
    b = Case(kernel_device, H=2, HKV=1, L=28, noise=False, seed=5)
    assert torch.equal(a.forward()[0], b.forward()[0])
    run_full(a)


@pytest.mark.gpu
@pytest.mark.parametrize("L,D", [(1024, 64), (2048, 128)])
def test_gpu_shot_and_levels_realistic(L, D):
    dev = torch.device("cuda")
    case = Case(dev, B=2, H=8, HKV=2, L=L, D=D, levels=(256, 256, 128, 256, 256, 64),
                photons=0.02, seed=L + D)
    run_full(case)
    kpm = _pad_mask(2, L, [0, 100], [37, 0])
    case = Case(dev, B=2, H=8, HKV=2, L=L, D=D, photons=0.02, kpm=kpm, seed=L + D + 1)
    run_full(case)


def test_kernel_config_reports_overrides_within_their_block_only():
    """`kernel_config` is what a launch takes: the table, or what `override_configs` forces
    inside its block, and the table again after it."""
    base = {k: A.kernel_config(k, 64) for k in ("fwd", "bwd", "dq")}
    with A.override_configs(fwd=(16, 16, 1, 1), dq=(32, 16, 1, 1), code_scratch_bytes=0):
        assert A.kernel_config("fwd", 64) == (16, 16, 1, 1)
        assert A.kernel_config("dq", 64, lq=1) == (32, 16, 1, 1)
        assert A.kernel_config("bwd", 64) == base["bwd"]
    assert {k: A.kernel_config(k, 64) for k in base} == base
    with pytest.raises(ValueError, match="kind: must be one of fwd, bwd, dq"):
        A.kernel_config("forward", 64)


@pytest.mark.parametrize("kw, words", [
    ({"maxnreg": {"backward": 128}}, "maxnreg: keys must be among fwd, bwd, dq"),
    ({"fwd_programs_per_sm": 0}, "fwd_programs_per_sm: must be >= 1, got 0"),
])
def test_override_configs_refuses_unknown_experiment_knobs(kw, words):
    """A register cap for a kernel kind that does not exist would be silently ignored."""
    with pytest.raises(ValueError, match=words):
        with A.override_configs(**kw):
            pass


def test_register_cap_reaches_the_compile_options_of_its_kind_only(monkeypatch):
    """`maxnreg` is passed to the launches of the kind it names (never in the interpreter)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    base = A.compile_options("bwd")
    assert base == {"enable_fp_fusion": False} and base == A.compile_options("fwd")
    with A.override_configs(maxnreg={"bwd": 168}):
        assert A.compile_options("bwd") == {**base, "maxnreg": 168}
        assert A.compile_options("fwd") == base
    assert A.compile_options("bwd") == base
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with A.override_configs(maxnreg={"bwd": 168}):
        assert A.compile_options("bwd") == base
