"""The custom ops on the GPU: kernels behind the same modules, compiled, without host syncs.

Everything here needs CUDA (skipped on the CPU). The kernels themselves are compared with the
reference in tests/test_kernels_*.py; this file checks the layers above them.
"""

import copy

import pytest
import torch

from torchtitan_ext.optical import ops
from torchtitan_ext.optical.config import DEFAULT_TRANSFORM_CONFIG, QuantizerConfig, TransformConfig
from torchtitan_ext.optical.modules import OpticalAttention, OpticalLinear
from torchtitan_ext.optical.ranges import update_ranges
from torchtitan_ext.optical.transform import transform_model

pytestmark = pytest.mark.gpu


def _block(dtype=torch.bfloat16):
    from torchtitan.models.llama3 import Transformer

    from torchtitan_ext.titan.spec import optical_llama3_args

    args = copy.deepcopy(optical_llama3_args["60M"])
    args.n_layers = 2
    args.max_seq_len = 512
    torch.manual_seed(0)
    with torch.device("cuda"), torch.no_grad():
        model = Transformer(args)
        model.init_weights()
    transform_model(model, TransformConfig.from_dict(DEFAULT_TRANSFORM_CONFIG))
    for p in model.parameters():  # not model.to(dtype): that would drop RoPE's complex buffer
        p.data = p.data.to(dtype)
    return model


def _fresh_compile_state():
    """A calibrated 2-layer model and its tokens, with Dynamo's caches and counters reset."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _block()
    tokens = torch.randint(0, 8192, (2, 256), device="cuda")
    _calibrate(model, tokens)
    return model, tokens


def _calibrate(model, tokens):
    model(tokens).float().sum().backward()
    update_ranges(model)
    model.zero_grad(set_to_none=True)


def test_kernels_match_reference_through_the_modules():
    torch.manual_seed(1)
    lin = OpticalLinear(384, 1024, bias=False, config=QuantizerConfig()).cuda().bfloat16()
    att = OpticalAttention(QuantizerConfig()).cuda()
    x = torch.randn(2, 256, 384, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(2, 6, 256, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(2, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
    lin(x), att(q, kv, kv)
    update_ranges([lin, att])
    lin.eval(), att.eval()
    outs = {}
    for mode in ("auto", "reference"):
        ops.set_kernel_mode(mode)
        torch.manual_seed(5)
        outs[mode] = (lin(x).float(), att(q, kv, kv).float())
    ops.set_kernel_mode("auto")
    for a, b in zip(outs["auto"], outs["reference"]):
        rel = (a - b).norm() / b.norm()
        assert rel < 1e-2, rel


def test_compiled_block_has_no_graph_breaks_and_trains():
    model = _block()
    tokens = torch.randint(0, 8192, (2, 256), device="cuda")
    _calibrate(model, tokens)
    block = model.layers["0"]
    freqs = model.freqs_cis
    h = model.tok_embeddings(tokens).detach().requires_grad_(True)
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(h, freqs, None)
    out.float().sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


def _compiled_steps(block, freqs, h0, *, cuda_graphs: bool, steps: int = 4):
    """(output, input grad, weight grads) of `steps` compiled forward+backward calls of `block`,
    the ranges updated after each, with the framework RNG (fallback_random) so that both arms
    draw the same noise seeds. cuda_graphs: Inductor's setting that `optical.cuda_graphs`
    switches on (titan/cuda_graphs.py)."""
    import torch._inductor.config as inductor_config

    results = []
    with inductor_config.patch({"fallback_random": True, "triton.cudagraphs": cuda_graphs}):
        compiled = torch.compile(block, fullgraph=True)
        for step in range(steps):
            out, h_grad = _train_step([compiled], freqs, h0, seed=100 + step)
            results.append((out, h_grad, [p.grad.clone() for p in block.parameters()]))
            block.zero_grad(set_to_none=True)
            update_ranges(block)
    return results


def _train_step(compiled_blocks, freqs, h0, *, seed):
    """One forward+backward of the chained compiled blocks from h0: (output, input grad)."""
    torch.compiler.cudagraph_mark_step_begin()
    torch.manual_seed(seed)
    h = h0.clone().requires_grad_(True)
    out = _chain(compiled_blocks, freqs, h)
    out.float().square().mean().backward()
    return out.detach().clone(), h.grad.clone()


def _chain(blocks, freqs, h):
    for block in blocks:
        h = block(h, freqs, None)
    return h


def test_compiled_block_replays_as_cuda_graphs_bit_for_bit():
    # optical.cuda_graphs: the blocks are recorded and replayed (no skip), and the replayed steps
    # give the bits of the compiled steps without graphs. (A device tensor the ops cached on
    # first use broke the graphs in training, "tensor(s) in the cudagraph pool not tracked as
    # outputs"; in this process earlier calls may have made such a cache already, so the train
    # runs of bench/results/README.md, stop 23, are the check for that class.)
    from torch._dynamo.utils import counters

    model, tokens = _fresh_compile_state()
    h0 = model.tok_embeddings(tokens).detach()
    graphs = _compiled_steps(copy.deepcopy(model.layers["0"]), model.freqs_cis, h0,
                             cuda_graphs=True)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    torch._dynamo.reset()
    plain = _compiled_steps(copy.deepcopy(model.layers["0"]), model.freqs_cis, h0,
                            cuda_graphs=False)
    for (y_a, gh_a, gw_a), (y_b, gh_b, gw_b) in zip(plain, graphs):
        assert torch.equal(y_a, y_b)
        assert torch.equal(gh_a, gh_b)
        assert all(torch.equal(a, b) for a, b in zip(gw_a, gw_b))


def test_training_step_has_no_host_sync():
    model = _block()
    tokens = torch.randint(0, 8192, (2, 256), device="cuda")
    _calibrate(model, tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = model(tokens).float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        update_ranges(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(loss)


def test_no_grad_forwards_beside_recorded_blocks():
    # Validation under optical.cuda_graphs (H200, stop 27): the training blocks are recorded as
    # CUDA graphs; a no-grad chain of the same compiled blocks inside graphs_off() must run
    # (with graphs, block i + 1's replay overwrote block i's output) and give the bits of the
    # same chain compiled with no graphs at all, and the training graphs must still replay.
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    from torchtitan_ext.titan.cuda_graphs import graphs_off

    model, tokens = _fresh_compile_state()
    h0, freqs = model.tok_embeddings(tokens).detach(), model.freqs_cis
    blocks = [model.layers["0"], model.layers["1"]]

    def evaluate(compiled):
        for block in blocks:
            block.eval()
        torch.manual_seed(7)
        with torch.no_grad():
            out = _chain(compiled, freqs, h0).clone()
        for block in blocks:
            block.train()
        return out

    with inductor_config.patch({"fallback_random": True, "triton.cudagraphs": True}):
        compiled = [torch.compile(b, fullgraph=True) for b in blocks]
        for step in range(4):  # warm-up, record, replay; after the evaluations, replay again
            if step == 3:
                with graphs_off():
                    evals = [evaluate(compiled) for _ in range(3)]
            _train_step(compiled, freqs, h0, seed=step)
            model.zero_grad(set_to_none=True)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    torch._dynamo.reset()
    with inductor_config.patch({"fallback_random": True, "triton.cudagraphs": False}):
        plain = evaluate([torch.compile(b, fullgraph=True) for b in blocks])
    assert torch.isfinite(plain).all()
    for out in evals:
        assert torch.equal(out, plain)


def test_validator_leaves_the_cuda_generator_as_it_found_it(monkeypatch):
    # The optical layers draw noise seeds from the CUDA generator; a validation after a checkpoint
    # that advanced it would make a resumed run differ from the uninterrupted one (stop 27).
    from torchtitan.components.validate import Validator

    from torchtitan_ext.titan.validate import FixedWindowValidator

    drawn = []
    monkeypatch.setattr(Validator, "validate",
                        lambda self, model_parts, step: drawn.append(torch.rand(4, device="cuda")))
    validator = object.__new__(FixedWindowValidator)
    validator.validation_dataloader = None
    before = torch.cuda.get_rng_state()
    validator.validate([], step=1)
    assert len(drawn) == 1
    assert torch.equal(torch.cuda.get_rng_state(), before)
    torch.rand(4, device="cuda")  # the check can fail: a draw outside the validator moves it
    assert not torch.equal(torch.cuda.get_rng_state(), before)
