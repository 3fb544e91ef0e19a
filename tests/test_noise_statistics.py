"""Statistics of the noisy quantizer (issue 18; semantics 1.3 and 7) on the reference and kernels.

For an element whose level position t = (x - lo) / (hi - lo) * (L - 1) has fractional part f,
stochastic rounding gives k = floor(t) + 1 with probability f, else floor(t): the error e = k - t
(in levels) has mean 0 and variance f (1 - f). Repeated over many seeds we check, per element and
pooled, that
  - every output is one of the two neighbouring levels,
  - e is unbiased (pooled mean, and per element: the standardised per-element means z_i have
    E[z_i^2] = 1),
  - E[e^2] = f (1 - f),
  - standardised errors of element pairs are uncorrelated: the eight elements that read the two
    halves of the four words of one Philox block (idx >> 3, word (idx >> 1) & 3, half idx & 1:
    docs/semantics-notes.md), neighbours across
    block boundaries, neighbours across kernel tile boundaries, and one element across
    consecutive seeds.
Every bound is Z standard errors of the statistic, the standard error derived from the sample
(exact for the pooled mean and second moment, the empirical spread for the correlation products);
inputs and seeds are fixed, so a passing test passes every time. The negative controls show that
the statistics flag a shared Philox word, a biased draw and a seed that is ignored.

Kernels covered: the linear GEMM epilogue (Q_out; the eight-outputs-per-Philox-block path, shared
with attention's S tiles through `philox_bits24_rows`, and the one-block-per-output path) and the
elementwise quantizer (per-element `philox_uniform`, as attention's Q_y). Attention's Q_s and Q_y
draw the same words as the reference bit for bit (tests/test_kernels_attention.py at 4 levels),
so the reference statistics hold for them. On the GPU the `gpu` test repeats the epilogue check
with the GPU's own tiles, bf16 and 128 seeds.
"""

from __future__ import annotations

import math

import pytest
import torch

from torchtitan_ext.optical import reference as R
from torchtitan_ext.optical.kernels import linear as klinear

Z = 5.0  # standard errors: a false alarm has probability ~6e-7 per statistic
F_MIN = 0.02  # elements with f near 0 or 1 carry almost no information and, compared against a
# reference t that may differ from the kernel's by accumulation order, could leave the support


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------
def level_errors(k: torch.Tensor, t: torch.Tensor):
    """e = k - t ([S, N] float64) and f = frac(t) ([N]); asserts the two-level support."""
    t = t.double()
    fl = torch.floor(t)
    assert torch.all((k == fl) | (k == fl + 1)), "an output is not a neighbouring level"
    return k - t, t - fl


def bias_z(e, f):
    """Pooled mean of e in standard errors: Var(mean) = sum_i f_i (1 - f_i) / (S N^2)."""
    s, n = e.shape
    se = math.sqrt((f * (1 - f)).sum().item() / s) / n
    return e.mean().item() / se


def per_element_z2(e, f):
    """Mean of z_i^2 - 1 in standard errors (z_i: per-element mean over seeds, standardised)."""
    s = e.shape[0]
    z2 = (e.mean(0) / torch.sqrt(f * (1 - f) / s)) ** 2
    return (z2.mean().item() - 1.0) / (z2.std().item() / math.sqrt(z2.numel()))


def second_moment_z(e, f):
    """mean(e^2 - f(1-f)) in standard errors: Var(e^2) = f (1-f) (1-2f)^2 per draw."""
    s, n = e.shape
    d = (e * e).mean(0) - f * (1 - f)
    se = math.sqrt((f * (1 - f) * (1 - 2 * f) ** 2).sum().item() / s) / n
    return d.mean().item() / max(se, 1e-300)


def corr_z(e, f, i, j):
    """Mean product of the standardised errors of element pairs (i[p], j[p]), in standard errors
    of that mean (its spread estimated from the products)."""
    zs = e / torch.sqrt(f * (1 - f))
    prod = (zs[:, i] * zs[:, j]).reshape(-1)
    return prod.mean().item() / (prod.std().item() / math.sqrt(prod.numel()))


def seed_corr_z(e, f):
    """Correlation of one element with itself at the next seed."""
    zs = e / torch.sqrt(f * (1 - f))
    prod = (zs[1:] * zs[:-1]).reshape(-1)
    return prod.mean().item() / (prod.std().item() / math.sqrt(prod.numel()))


def check_all(e, f, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    stats = {"bias": bias_z(e, f), "per_element": per_element_z2(e, f),
             "second_moment": second_moment_z(e, f), "across_seeds": seed_corr_z(e, f)}
    for name, (i, j) in pairs.items():
        stats["corr " + name] = corr_z(e, f, i, j)
    bad = {k: round(v, 2) for k, v in stats.items() if abs(v) > Z}
    assert not bad, f"statistics beyond {Z} standard errors: {bad}"
    return stats


def block_pairs(idx: torch.Tensor, cols: torch.Tensor | None = None):
    """Pairs of positions (into the flat element list whose global noise indices are `idx`) by
    relation: every lane pair of one Philox block (eight draws: lanes 2 w and 2 w + 1 share word
    w), and adjacent indices in different blocks."""
    pos = {int(g): p for p, g in enumerate(idx.tolist())}
    out = {}
    for a in range(8):
        for b in range(a + 1, 8):
            ps = [(pos[g], pos[g - a + b]) for g in pos if g % 8 == a and g - a + b in pos]
            out[f"block lanes {a}-{b}"] = ps
    out["across blocks"] = [(pos[g], pos[g + 1]) for g in pos if g % 8 == 7 and g + 1 in pos]
    return {k: (torch.tensor([p for p, _ in v]), torch.tensor([q for _, q in v]))
            for k, v in out.items() if v}


def _select(e, f, t_keep):
    """Restrict to informative elements (F_MIN <= f <= 1 - F_MIN); returns the mapping too."""
    keep = (f >= F_MIN) & (f <= 1 - F_MIN) & t_keep
    where = torch.full(keep.shape, -1, dtype=torch.long)
    where[keep] = torch.arange(int(keep.sum()))
    return e[:, keep], f[keep], where


def _remap(pairs, where):
    out = {}
    for k, (i, j) in pairs.items():
        a, b = where[i], where[j]
        ok = (a >= 0) & (b >= 0)
        if ok.sum() >= 64:
            out[k] = (a[ok], b[ok])
    return out


# --------------------------------------------------------------------------------------------
# the reference
# --------------------------------------------------------------------------------------------
LEVELS = 16
LO, HI = -1.0, 2.0


def _positions(x):
    """t as the quantizer computes it (float32 ops of reference.quantize)."""
    c = x.float().clamp(LO, HI)
    return (c - LO) / torch.clamp(torch.tensor(HI - LO), min=1e-12) * float(LEVELS - 1)


def _levels(y):
    return torch.round((y.double() - LO) / (HI - LO) * (LEVELS - 1))


def _reference_errors(n, seeds, uniform=R.philox_uniform, index_offset=2**33 + 5):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, generator=g) * (HI - LO) + LO
    rng = torch.tensor([LO, HI])
    idx = torch.arange(n, dtype=torch.int64) + index_offset
    ks = torch.stack([_levels(R.quantize(x, rng, LEVELS, noise=uniform(s, 7, idx)))
                      for s in seeds])
    e, f = level_errors(ks, _positions(x))
    e, f, where = _select(e, f, torch.ones(n, dtype=torch.bool))
    return e, f, _remap(block_pairs(idx), where)


def test_reference_noise_statistics():
    e, f, pairs = _reference_errors(8192, range(1000, 1064))
    assert set(pairs) >= {"block lanes 0-1", "block lanes 1-3", "across blocks"}
    check_all(e, f, pairs)


def test_statistics_flag_a_shared_word_and_a_biased_draw():
    # negative controls at the same sample sizes: the tests above can fail
    def shared(seed, stream, idx):  # both halves of a word read its high half
        return R.philox_uniform(seed, stream, idx & ~1)

    e, f, pairs = _reference_errors(8192, range(1000, 1064), uniform=shared)
    assert corr_z(e, f, *pairs["block lanes 0-1"]) > 2 * Z

    def biased(seed, stream, idx):  # u on [0, 0.98): rounds up too rarely
        return R.philox_uniform(seed, stream, idx) * 0.98

    e, f, _ = _reference_errors(8192, range(1000, 1064), uniform=biased)
    assert bias_z(e, f) < -Z

    def reused(seed, stream, idx):  # the seed is ignored
        return R.philox_uniform(0, stream, idx)

    e, f, _ = _reference_errors(2048, range(1000, 1016), uniform=reused)
    assert seed_corr_z(e, f) > 2 * Z


# --------------------------------------------------------------------------------------------
# the kernels
# --------------------------------------------------------------------------------------------
def _grid_pairs(rows, cols, tile_r, tile_c):
    """Neighbour pairs of a row-major [rows, cols] tensor across tile boundaries (columns
    c = tile_c - 1, tile_c and rows likewise) and between vertical neighbours."""
    pos = torch.arange(rows * cols).view(rows, cols)
    out = {}
    bc = [c for c in range(tile_c, cols, tile_c)]
    if bc:
        out["across column tiles"] = (pos[:, [c - 1 for c in bc]].reshape(-1),
                                      pos[:, bc].reshape(-1))
    br = [r for r in range(tile_r, rows, tile_r)]
    if br:
        out["across row tiles"] = (pos[[r - 1 for r in br]].reshape(-1), pos[br].reshape(-1))
    out["vertical neighbours"] = (pos[:-1].reshape(-1), pos[1:].reshape(-1))
    return out


def _kernel_errors(y_of_seed, x, n_seeds, index, tiles, dev):
    """Run `y_of_seed(seed tensor on dev)` for n_seeds seeds; x: the values Q quantizes (any
    device). Errors, f and pairs for check_all."""
    ks = torch.stack([_levels(y_of_seed(torch.tensor(5000 + 7919 * s, device=dev)).cpu())
                      .reshape(-1) for s in range(n_seeds)])
    e, f = level_errors(ks, _positions(x.cpu()).reshape(-1))
    e, f, where = _select(e, f, torch.ones(f.shape, dtype=torch.bool))
    pairs = {**block_pairs(index.reshape(-1)), **_grid_pairs(*x.shape, *tiles)}
    return e, f, _remap(pairs, where)


def _outer_product_case(rows, cols, dtype, dev, gen_seed):
    """x [rows, 1], w [cols, 1] (K = 1, so the GEMM is cheap even in the interpreter): the
    accumulator x_m * w_n is one float32 product, the same on every path, and its level
    positions spread over the whole range with varied fractional parts."""
    g = torch.Generator().manual_seed(gen_seed)
    x = (torch.rand(rows, 1, generator=g) * 2.4 - 1.0).to(dev, dtype)
    w = (torch.rand(cols, 1, generator=g) * 0.5 + 0.5).to(dev, dtype)
    acc = x.cpu().float() @ w.cpu().float().t()
    return x, w, acc


def _linear_epilogue_stats(dev, rows, cols, dtype, n_seeds, tiles_of_cfg):
    x, w, acc = _outer_product_case(rows, cols, dtype, dev, cols)
    unset = torch.tensor([float("inf"), float("-inf")], device=dev)
    out = torch.tensor([LO, HI], device=dev)
    index = klinear.LinearIndex(rows, rows, 5 * rows, cols, 0)  # rows 5*rows.. of a larger tensor

    def y_of(seed):  # Q_x, Q_w pass through (unset ranges): only Q_out quantizes
        return klinear.linear_forward(x, w, None, unset, unset, out, seed, levels=LEVELS,
                                      lut=None, stream=9, index=index, observe=False)[0]

    gidx = (torch.arange(rows)[:, None] + 5 * rows) * cols + torch.arange(cols)[None, :]
    cfg = klinear.gemm_config(rows, cols, 1, dtype, torch.device(dev))
    e, f, pairs = _kernel_errors(y_of, acc, n_seeds, gidx, tiles_of_cfg(cfg), dev)
    return check_all(e, f, pairs)


@pytest.mark.parametrize("cols", [64, 61])
def test_linear_epilogue_noise_statistics(kernel_device, cols):
    """Q_out in the GEMM epilogue: one Philox block per eight outputs when cols % 8 == 0, else one
    per output; pairs across the GEMM tiles' boundaries."""
    # 40 rows: a second row of tiles (the interpreter's are 32 x 32); ~0.5 s a launch there
    _linear_epilogue_stats(kernel_device, 40, cols, torch.float32, 32,
                           lambda cfg: (cfg.BM, cfg.BN))


def test_quantize_tensor_noise_statistics_many_seeds(kernel_device):
    """The elementwise noisy quantizer (Q_out after a tensor-parallel reduction)."""
    dev, rows, cols = kernel_device, 48, 96
    g = torch.Generator().manual_seed(4)
    x = (torch.rand(rows, cols, generator=g) * (HI - LO) + LO).to(dev)
    rng = torch.tensor([LO, HI], device=dev)
    index = klinear.LinearIndex(rows, rows, 0, cols + 4, 2)  # a column shard at offset 2

    def y_of(seed):
        return klinear.quantize_tensor(x, rng, seed, levels=LEVELS, lut=None, stream=1,
                                       noisy=True, index=index)

    gidx = torch.arange(rows)[:, None] * (cols + 4) + 2 + torch.arange(cols)[None, :]
    tile = klinear.elementwise_tile(cols, noisy=True)
    e, f, pairs = _kernel_errors(y_of, x, 48, gidx, tile, dev)
    check_all(e, f, pairs)


@pytest.mark.gpu
@pytest.mark.parametrize("cols", [1024, 1021])
def test_gpu_linear_epilogue_noise_statistics_real_tiles(cols):
    """The GPU's own GEMM tiles and epilogue column chunks, bf16 in and out, many seeds."""
    _linear_epilogue_stats(torch.device("cuda"), 256, cols, torch.bfloat16, 128,
                           lambda cfg: (cfg.BM, cfg.BN // cfg.epi_split))


# --- issue 16: shot read-out statistics -------------------------------------------------------
def shot_stats_z(vp: torch.Tensor, v: float, nk: float):
    """z-scores of mean(v' - v) against 0 and of var(v' - v) against v / (nK), with standard
    errors from the sample (var of the sample variance ~ (m4 - s^4) / n)."""
    d = (vp.double() - v).reshape(-1)
    n = d.numel()
    var_expect = v / nk
    mean_z = d.mean() / math.sqrt(var_expect / n)
    c = d - d.mean()
    s2 = (c * c).mean()
    m4 = (c ** 4).mean()
    var_z = (s2 - var_expect) / torch.sqrt((m4 - s2 * s2) / n)
    return float(mean_z), float(var_z)


def _shot_reference_vprime(v: float, nk_n: float, nk_k: int, n: int, seed: int):
    """v' through the reference quantizer at 2^22 levels (rounding error ~1e-7, negligible next to
    sqrt(v / nK) ~ 1e-2): x = v on the range [0, 1], so Q(x) = v' itself up to that rounding."""
    x = torch.full((n,), v)
    idx = torch.arange(n, dtype=torch.int64) + 2**33 + 17
    return R.quantize_readout(x, torch.tensor([0.0, 1.0]), 1 << 22, seed=seed, stream=3,
                              index=idx, photons=nk_n, contraction=nk_k)


@pytest.mark.parametrize("v, n_ph, k", [(0.3, 10.0, 100), (0.6, 20.0, 64), (0.05, 40.0, 32)])
def test_reference_shot_noise_mean_and_variance(v, n_ph, k):
    vp = _shot_reference_vprime(v, n_ph, k, 200_000, seed=7)
    nk = n_ph * k
    # clamping at 0/1 must be negligible for the formula to hold: keep v >= 6 sigma from both ends
    assert 6 * math.sqrt(v / nk) < min(v, 1 - v)
    mean_z, var_z = shot_stats_z(vp, v, nk)
    assert abs(mean_z) < Z, mean_z
    assert abs(var_z) < Z, var_z


def test_shot_statistics_flag_a_wrong_variance():
    """Negative control: the same samples judged against twice the photon count fail."""
    vp = _shot_reference_vprime(0.3, 10.0, 100, 200_000, seed=7)
    _, var_z = shot_stats_z(vp, 0.3, 2 * 10.0 * 100)
    assert abs(var_z) > Z


def test_kernel_shot_noise_mean_and_variance(kernel_device):
    """The element-wise kernel's shot read-out (the row-wise TP Q_out path; the linear epilogue
    and attention tiles share `quantize_shot`/`box_muller` and equal the reference, tested in the
    kernel tests): mean of v' - v ~ 0 and variance v / (nK), at 2^22 levels (rounding error
    negligible), with z-scores from the sample."""
    n, v, n_ph, k = 65536, 0.3, 10.0, 100
    x = torch.full((256, n // 256), v, device=kernel_device)
    seed = torch.tensor(12345, dtype=torch.int64, device=kernel_device)
    y = klinear.quantize_tensor(x, torch.tensor([0.0, 1.0], device=kernel_device), seed,
                                levels=1 << 22, lut=None, stream=3, noisy=True,
                                index=klinear.LinearIndex(256, 256, 2**20, n // 256, 0),
                                photons=n_ph, contraction=k)
    mean_z, var_z = shot_stats_z(y.cpu(), v, n_ph * k)
    assert abs(mean_z) < Z, mean_z
    assert abs(var_z) < Z, var_z
    _, wrong_z = shot_stats_z(y.cpu(), v, 2 * n_ph * k)  # negative control
    assert abs(wrong_z) > Z
