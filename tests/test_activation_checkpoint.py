"""Per-op selective AC of optical blocks, and `optical.ac_save_attention`
(titan.activation_checkpoint), eager on the CPU.

The compiled, end-to-end count is `test_e2e.py::test_selective_ac_recomputes_...`."""

import collections
import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from torchtitan_ext.optical.config import QuantizerConfig
from torchtitan_ext.optical.modules import OpticalAttention, OpticalLinear
from torchtitan_ext.optical.ranges import update_ranges
from torchtitan_ext.titan.activation_checkpoint import _apply_optical_op_sac, optical_ac


def ac_config(force=()):
    return SimpleNamespace(per_op_sac_force_recompute_mm_shapes_by_fqns=list(force),
                           preserve_rng_state=True, determinism_check="default",
                           early_stop=False, debug=False)


class Block(nn.Module):
    """Three optical linears and a plain one, in this call order: first, plain, b, c. Forced
    recomputation goes by shape, so `first` has a shape of its own."""

    def __init__(self):
        super().__init__()
        cfg = QuantizerConfig(q_levels=16)
        self.first = OpticalLinear(8, 16, config=cfg)
        self.plain = nn.Linear(16, 8, bias=False)
        self.b, self.c = (OpticalLinear(8, 8, config=cfg) for _ in range(2))

    def forward(self, x):
        return self.c(torch.relu(self.b(self.plain(torch.relu(self.first(x))))))


def calibrated_block():
    torch.manual_seed(0)
    block = Block()
    block(torch.randn(6, 8))
    update_ranges(block)
    return block


COUNTED = {torch.ops.optical.linear.default: "linear", torch.ops.aten.mm.default: "mm",
           torch.ops.optical.attention.default: "attention",
           torch.ops.aten.addmm.default: "addmm",  # nn.Linear with a bias (the backward's are mms)
           torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default: "sdpa"}


class CountCalls(TorchDispatchMode):
    """Counts the optical linears and mms that run. Under SAC's modes it sees only what they
    execute: a saved output served again does not reach it."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in COUNTED:
            self.calls[COUNTED[func]] += 1
        return func(*args, **(kwargs or {}))


def run_counted(module, x):
    """(forward calls, backward calls, x's grad): the backward's include the recomputed ones."""
    x = x.clone().requires_grad_(True)
    with CountCalls() as fwd:
        loss = module(x).square().sum()
    with CountCalls() as bwd:
        loss.backward()
    return fwd.calls, bwd.calls, x.grad


@pytest.mark.parametrize("force,recomputed", [((), 1), (("first",), 2)],
                         ids=["alternating", "first-forced"])
def test_every_second_matmul_is_recomputed_counting_optical_linears(force, recomputed):
    """first, plain, b, c alternate save / recompute / save / recompute: of the optical linears
    only c runs again; `plain` (the second matmul) is recomputed too. A forced name (first) is
    recomputed and leaves the alternation: plain, b, c are then save / recompute / save."""
    block = calibrated_block()
    x = torch.randn(6, 8)
    torch.manual_seed(1)  # the noise seeds: the same draws in both runs
    base_fwd, base_bwd, base_grad = run_counted(block, x)
    wrapped = _apply_optical_op_sac(block, ac_config(force),
                                    op_sac_save_list={torch.ops.aten.mm.default})
    torch.manual_seed(1)
    fwd, bwd, grad = run_counted(wrapped, x)
    assert base_fwd == fwd == {"linear": 3, "mm": 1}
    assert base_bwd["linear"] == 0 and bwd["linear"] == recomputed
    assert bwd["mm"] == base_bwd["mm"] + (1 if not force else 0)  # `plain` again or not
    assert torch.equal(grad, base_grad)


def test_forced_recompute_names_must_be_linear_layers():
    """A name that matches a module other than a linear is refused (as torchtitan does)."""
    block = calibrated_block()
    with pytest.raises(ValueError, match="per_op_sac_force_recompute_mm_shapes_by_fqns"):
        _apply_optical_op_sac(nn.Sequential(block, nn.ReLU()), ac_config(["1"]),
                              op_sac_save_list=set())


def test_optical_ac_stands_in_for_torchtitans_op_sac_while_open():
    """torchtitan's block wrapper takes the optical policy inside `optical_ac` only: outside,
    its own policy recomputes every optical linear. The swap is undone after an error too."""
    from torchtitan.distributed import activation_checkpoint as titan_ac

    original = titan_ac._apply_op_sac
    cfg = ac_config()
    cfg.mode, cfg.selective_ac_option = "selective", "op"
    save = {torch.ops.aten.mm.default}
    recomputed = {}
    for name, ctx in (("optical", optical_ac()), ("torchtitan", contextlib.nullcontext())):
        with ctx:
            wrapped = titan_ac._apply_ac_to_transformer_block(
                calibrated_block(), cfg, base_fqn="layers.0", op_sac_save_list=save)
        recomputed[name] = run_counted(wrapped, torch.randn(6, 8))[1]["linear"]
        assert titan_ac._apply_op_sac is original
    assert recomputed == {"optical": 1, "torchtitan": 3}
    swapped = ("_apply_op_sac", "_apply_full_ac", "_apply_layer_sac")
    originals = [getattr(titan_ac, name) for name in swapped]
    with pytest.raises(RuntimeError, match="boom"):
        with optical_ac(save_attention=True):
            assert all(getattr(titan_ac, n) is not o for n, o in zip(swapped, originals))
            raise RuntimeError("boom")
    assert [getattr(titan_ac, name) for name in swapped] == originals


class AttentionBlock(nn.Module):
    """q/k/v projections, attention (optical, or SDPA as in the digital twin) and an output
    projection: what a checkpointed Llama block recomputes, in small."""

    def __init__(self, optical: bool):
        super().__init__()
        cfg = QuantizerConfig(q_levels=16)
        self.qkv = OpticalLinear(8, 24, config=cfg) if optical else nn.Linear(8, 24)
        self.out = OpticalLinear(8, 8, config=cfg) if optical else nn.Linear(8, 8)
        self.attention = OpticalAttention(cfg) if optical else None

    def forward(self, x):
        q, k, v = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        attend = self.attention or nn.functional.scaled_dot_product_attention
        y = attend(q, k, v, is_causal=True)
        return self.out(torch.relu(y.transpose(1, 2).flatten(2)))


@pytest.mark.parametrize("optical", [True, False], ids=["optical", "digital"])
@pytest.mark.parametrize("mode,option", [("full", ""), ("selective", "1"), ("selective", "2")])
def test_save_attention_keeps_the_attention_of_checkpointed_blocks(optical, mode, option):
    """`optical_ac(save_attention=True)`: the blocks torchtitan's full or every-N-th-layer AC
    checkpoints run their attention once (its outputs are saved) and everything else again, and
    the gradients are the bits of plain AC's. A block layer AC leaves alone is left alone."""
    from torchtitan.distributed import activation_checkpoint as titan_ac

    torch.manual_seed(0)
    block = AttentionBlock(optical)
    x = torch.randn(2, 6, 8)
    if optical:
        block(x)
        update_ranges(block)
    cfg = ac_config()
    cfg.mode, cfg.selective_ac_option = mode, option
    blocks = 2 if option == "2" else 1  # "2": the first block is left alone, the second not
    runs = {}
    count = titan_ac._layer_sac_count
    try:
        for save in (False, True):
            titan_ac._layer_sac_count = 0  # torchtitan counts blocks from the first
            with optical_ac(save_attention=save):
                wrapped = [titan_ac._apply_ac_to_transformer_block(block, cfg, base_fqn="layers.0")
                           for _ in range(blocks)]
            runs[save] = []
            for w in wrapped:
                torch.manual_seed(1)
                runs[save].append(run_counted(w, x))
    finally:
        titan_ac._layer_sac_count = count
    attention, matmul = ("attention", "linear") if optical else ("sdpa", "addmm")
    for i in range(blocks):
        checkpointed = i == blocks - 1
        (fwd0, bwd0, grad0), (fwd1, bwd1, grad1) = runs[False][i], runs[True][i]
        assert fwd0 == fwd1 and fwd1[attention] == 1
        assert bwd0[attention] == int(checkpointed) and bwd1[attention] == 0
        assert bwd1[matmul] == bwd0[matmul] == (2 if checkpointed else 0)  # qkv and out again
        assert torch.equal(grad0, grad1)
