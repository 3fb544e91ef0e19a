"""Padding masks and the KV cache through the "optical" attention function (CPU, reference path,
tiny model). Semantics page, section 3: masked keys get probability 0 and change no other index;
a cached step takes the noise indices of its absolute row, and with `q_noise: false` equals the
uncached row."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from hf_tiny import calibrate, tiny_config  # noqa: E402

from torchtitan_ext.hf.transform import key_padding_mask_of, query_start_of  # noqa: E402
from torchtitan_ext.optical.config import OpticalConfigError, TransformConfig  # noqa: E402

LENGTHS = (11, 6, 9)
PAD = 2


def _has_q_noise() -> bool:
    try:
        TransformConfig.from_dict({"layer_name_to_config": {"default": {"q_noise": False}}})
        return True
    except OpticalConfigError:
        return False


# Deterministic optical modules: read-out noise off (q_noise: false, branch det), or the bypass
# (digital compute through the same attention function, masks and cache: the plumbing alone).
NOISE_OFF = [pytest.param({"q_noise": False}, id="q_noise_false", marks=pytest.mark.skipif(
    not _has_q_noise(), reason="no q_noise key (branch det)")),
    pytest.param({"q_bypass": True}, id="bypass")]


def _model(noise: bool, default: dict | None = None):
    from transformers import LlamaForCausalLM

    from torchtitan_ext.hf.transform import transform_hf_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    default = {} if noise else default
    transform_hf_model(model, {"use_regex": True,
                               "layer_name_to_config": {"default": default, "lm_head": None}})
    calibrate(model)
    assert model.config.use_cache  # the cache stays on: the attention function takes it
    return model


def _seqs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 8192, (n,), generator=g) for n in LENGTHS]


def _batch(seqs, side: str, junk_seed=None):
    """Padded ids, attention mask, position ids (0 at each sequence's first real token)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD)
    if junk_seed is not None:  # other tokens in the padded places: they must not matter
        ids = torch.randint(3, 8192, ids.shape, generator=torch.Generator().manual_seed(junk_seed))
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def _real(logits, mask, i):
    return logits[i][mask[i].bool()]


@pytest.mark.parametrize("default", NOISE_OFF)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded_without_noise(side, default):
    model, seqs = _model(noise=False, default=default), _seqs()
    ids, mask, pos = _batch(seqs, side)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, position_ids=pos).logits
        for i, s in enumerate(seqs):
            alone = model(s[None]).logits[0]
            torch.testing.assert_close(_real(padded, mask, i), alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_positions_do_not_touch_the_noise_of_real_ones(side):
    model, seqs = _model(noise=True), _seqs()
    outs = []
    for junk in (None, 7):
        ids, mask, pos = _batch(seqs, side, junk_seed=junk)
        torch.manual_seed(1234)
        with torch.no_grad():
            outs.append(model(ids, attention_mask=mask, position_ids=pos).logits)
    for i in range(len(seqs)):
        assert torch.equal(_real(outs[0], mask, i), _real(outs[1], mask, i)), i
    torch.manual_seed(99)
    with torch.no_grad():
        other = model(ids, attention_mask=mask, position_ids=pos).logits
    assert not torch.equal(_real(other, mask, 0), _real(outs[1], mask, 0))  # the noise is live


def _generate(model, use_cache: bool, n=8, **kw):
    ids, mask, _ = _batch(_seqs(seed=3), "left")
    torch.manual_seed(5)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                              use_cache=use_cache, pad_token_id=PAD, **kw)


@pytest.mark.parametrize("default", NOISE_OFF)
def test_greedy_generate_with_a_static_cache_equals_without(default):
    """A static cache (the CUDA-graph path of `generate`): keys span the cache's capacity, so
    the queries' position comes from the mask, on the device; without noise the tokens equal
    the uncached ones."""
    model = _model(noise=False, default=default)
    a = _generate(model, True, cache_implementation="static")
    assert torch.equal(a, _generate(model, False))


@pytest.mark.parametrize("default", NOISE_OFF)
def test_static_cache_decoding_step_compiles_whole(default):
    """What `generate` compiles on a GPU (static cache: the decoding step, then CUDA graphs):
    here traced on the CPU as one graph (fullgraph: no break, no host read of the position)
    through AOT autograd, and the tokens equal the eager ones."""
    from transformers.generation.configuration_utils import CompileConfig

    torch._dynamo.reset()
    model = _model(noise=False, default=default)
    cc = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    cc._compile_all_devices = True  # transformers compiles on accelerators only by default
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = _generate(model, True, cache_implementation="static", compile_config=cc)
    assert counters["stats"]["unique_graphs"] >= 1  # the step was compiled, as one graph
    assert not counters["graph_break"]
    assert torch.equal(compiled, _generate(model, True, cache_implementation="static",
                                           disable_compile=True))


def test_static_cache_steps_take_their_absolute_position():
    """With noise on, a static-cache step hands OpticalAttention the absolute position of its
    query (a device tensor: prompt length + step), not the cache's last row."""
    model = _model(noise=True)
    seen = []

    def record(mod, args, kwargs):
        seen.append((args[0].shape[2], args[1].shape[2], kwargs["q_start"]))

    hook = model.model.layers[0].self_attn.optical_attention.register_forward_pre_hook(
        record, with_kwargs=True)
    _generate(model, True, n=4, cache_implementation="static")
    hook.remove()
    width, capacity = max(LENGTHS), seen[0][1]
    assert seen[0][0] == width and int(seen[0][2]) == 0  # the prefill, at the cache's start
    assert len(seen) == 4
    for t, (lq, lk, q_start) in enumerate(seen[1:]):
        assert (lq, lk) == (1, capacity)
        assert isinstance(q_start, torch.Tensor) and q_start.dtype == torch.int64
        assert int(q_start) == width + t
    assert width < capacity - 1  # the first steps are not the cache's last row


def test_query_start_of_a_4d_mask():
    """The position of query row 0 read from transformers' 4-D mask: the newest key the last
    query row sees, maximised over the batch (an element padded on the right still counts)."""
    lk, lq = 10, 2
    causal = torch.arange(lk)[None, :] <= (torch.arange(lq)[:, None] + 5)  # rows at 5 and 6
    pad = torch.ones(2, lk, dtype=torch.bool)
    pad[0, :2] = False  # left padding
    pad[1, 6] = False  # the other element's newest key is padding
    mask = (causal[None] & pad[:, None, :])[:, None]
    assert int(query_start_of(key_padding_mask_of(mask, 2, lk), lq)) == 5
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert int(query_start_of(key_padding_mask_of(additive, 2, lk), lq)) == 5


@pytest.mark.parametrize("mask, lq, expected", [
    ("none", 7, 0), ("none", 1, 6), ("none", 3, 0), ("2d", 3, 4), ("4d", 3, 4), ("4d", 7, 0)])
def test_the_queries_position_follows_the_mask(mask, lq, expected):
    """No mask means what SDPA's `is_causal` computes (one row sees every key; several rows align
    at the top left, as in the unpadded prefill of an empty static cache); a 2-D mask covers
    every key (the last Lq positions); a 4-D mask of a cached step gives the device position."""
    from types import SimpleNamespace

    from torchtitan_ext.hf.transform import HF_OPTICAL_ATTENTION, optical_attention_forward

    seen = {}

    def opt(q, k, v, **kw):
        seen.update(kw)
        return q

    lk = 7
    q, k = torch.zeros(2, 4, lq, 16), torch.zeros(2, 2, lk, 16)
    visible = torch.ones(2, lk, dtype=torch.bool)
    causal = torch.arange(lk)[None, :] <= (torch.arange(lq)[:, None] + lk - lq)
    am = {"none": None, "2d": visible.long(), "4d": (causal[None] & visible[:, None])[:, None]}
    optical_attention_forward(SimpleNamespace(**{HF_OPTICAL_ATTENTION: opt}), q, k, k, am[mask])
    assert int(seen["q_start"]) == expected
    assert isinstance(seen["q_start"], torch.Tensor) == (mask == "4d" and lq < lk)


@pytest.mark.parametrize("default", NOISE_OFF)
def test_static_cache_without_padding_equals_the_uncached_forward(default):
    """An unpadded prompt in an empty static cache (transformers' SDPA path gives no mask there):
    the prompt's rows see keys 0..r, not the cache's empty slots; logits and greedy tokens equal
    the uncached ones (and the dynamic cache's, whose unpadded steps now get a mask too)."""
    from transformers import StaticCache

    model = _model(noise=False, default=default)
    ids = torch.randint(3, 8192, (2, 10), generator=torch.Generator().manual_seed(3))
    seen = []
    hook = model.model.layers[0].self_attn.optical_attention.register_forward_pre_hook(
        lambda mod, args, kw: seen.append((kw["key_padding_mask"], kw["q_start"])),
        with_kwargs=True)
    with torch.no_grad():
        cached = model(ids, past_key_values=StaticCache(config=model.config, max_cache_len=32),
                       use_cache=True).logits
        torch.testing.assert_close(cached, model(ids, use_cache=False).logits,
                                   rtol=1e-4, atol=1e-4)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD)
        static = model.generate(ids, use_cache=True, cache_implementation="static", **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
        assert torch.equal(static, uncached)
        assert torch.equal(model.generate(ids, use_cache=True, **kw), uncached)  # dynamic
    hook.remove()
    kpm, q_start = seen[0]  # the mask function gives the prefill a mask: the position is explicit
    assert kpm is not None and kpm.shape == (2, 32) and int(q_start) == 0


def _packed(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 8192, (1, 11), generator=g)
    return ids, torch.cat([torch.arange(6), torch.arange(5)])[None]


def test_packed_sequences_raise_a_clear_error():
    """Packed documents (position_ids that restart: transformers builds a block-diagonal mask)
    cannot be computed by optical attention, which would read them as one sequence."""
    model = _model(noise=True)
    ids, pos = _packed()
    with torch.no_grad(), pytest.raises(ValueError, match="attention_mask: optical attention "
                                        "computes causal attention with key padding only"):
        model(ids, position_ids=pos, use_cache=False)
    block = torch.zeros(1, 1, 11, 11, dtype=torch.bool)
    block[..., :6, :6] = torch.ones(6, 6, dtype=torch.bool).tril()
    block[..., 6:, 6:] = torch.ones(5, 5, dtype=torch.bool).tril()
    with torch.no_grad(), pytest.raises(ValueError, match="packed sequences"):
        model(ids, attention_mask=block, position_ids=pos, use_cache=False)
    with torch.no_grad(), pytest.raises(ValueError, match="cu_seq_lens_q"):
        model(ids, position_ids=pos, use_cache=False, cu_seq_lens_q=torch.tensor([0, 6, 11]))
    with torch.no_grad():  # the same tokens, one sequence: fine
        assert torch.isfinite(model(ids, use_cache=False).logits).all()


def test_a_causal_padding_4d_mask_is_accepted_and_checked_once_per_forward(monkeypatch):
    """transformers' own 4-D mask of a padded batch passes; the host check runs once per mask
    (every layer gets the same object), not once per layer."""
    from torchtitan_ext.hf import transform as hf_transform

    model, seqs = _model(noise=False, default={"q_bypass": True}), _seqs()
    ids, mask, pos = _batch(seqs, "right")
    calls = []
    real = hf_transform._is_causal_padding

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(hf_transform, "_is_causal_padding", counting)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=pos, use_cache=False)
    assert len(calls) == 1 < model.config.num_hidden_layers


@pytest.mark.parametrize("default", NOISE_OFF)
def test_greedy_generate_with_cache_equals_without(default):
    model = _model(noise=False, default=default)
    a, b = _generate(model, True), _generate(model, False)
    assert a.shape == (3, max(LENGTHS) + 8)
    assert torch.equal(a, b)


def test_generate_with_cache_and_noise_runs():
    model = _model(noise=True)
    calls = []
    hook = model.model.layers[0].self_attn.optical_attention.register_forward_pre_hook(
        lambda mod, args: calls.append(args[0].shape[2]))
    out = _generate(model, True, n=5)
    hook.remove()
    assert out.shape == (3, max(LENGTHS) + 5)
    assert calls[0] == max(LENGTHS) and calls[1:] == [1] * 4  # prefill, then one row per step


def test_key_padding_mask_of_a_4d_mask():
    """The 4-D boolean mask transformers' SDPA mask function hands over -> the 2-D key mask."""
    pad = torch.tensor([[False, True, True, True], [True, True, True, False]])
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    four_d = (causal[None] & pad[:, None, :])[:, None]
    assert torch.equal(key_padding_mask_of(four_d, 2, 4), pad)
    assert key_padding_mask_of(causal[None, None].expand(2, 1, 4, 4), 2, 4).all()
    assert key_padding_mask_of(None, 2, 4) is None


def test_an_all_visible_key_mask_computes_what_no_mask_computes():
    """key_padding_mask_of hands over all-visible masks too (no device read to drop them)."""
    opt = _model(noise=True).model.layers[0].self_attn.optical_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 9, 16, generator=g) for h in (4, 2, 2))
    outs = []
    for kpm in (None, torch.ones(2, 9, dtype=torch.bool)):
        torch.manual_seed(1234)
        with torch.no_grad():
            outs.append(opt(q, k, v, enable_gqa=True, key_padding_mask=kpm))
    assert torch.equal(outs[0], outs[1])
