"""The op layer (torchtitan_ext.optical.ops): registration, fake implementations, autograd.

The ops are defined with the low-level torch.library API, with autograd registered on the ops
(see ops.py for why). `torch.library.opcheck` checks each op's schema against what its
implementation does, its fake implementation against the real one (shapes, dtypes, strides) and
its autograd registration, on the reference path and, under the interpreter or on a GPU, on the
Triton kernels.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from torchtitan_ext.optical import ops

OPCHECKS = ("test_schema", "test_faketensor")
# For the differentiable ops, with inputs that require grad.
OPCHECKS_AUTOGRAD = OPCHECKS + ("test_autograd_registration",)


@contextlib.contextmanager
def _kernel_mode(mode):
    """Run under kernel mode `mode` on every device (on a GPU "auto" would run the kernels in
    both arms of a kernel == reference comparison, which then could not fail); restore after."""
    old = ops.get_kernel_mode()
    ops.set_kernel_mode(mode)
    try:
        yield
    finally:
        ops.set_kernel_mode(old)


@pytest.fixture(params=["reference", "triton"])
def mode(request, kernel_device):
    with _kernel_mode(request.param):
        yield request.param


def _ranges(n, device, lo=-2.0, hi=2.0):
    return torch.tensor([[lo, hi]] * n, dtype=torch.float32, device=device)


def _seed(device, n=1):
    return torch.arange(7, 7 + n, dtype=torch.int64, device=device)


@pytest.mark.parametrize("clipped, quantize_output, noise", [
    (False, True, True), (True, True, True), (False, False, True), (True, False, True),
    (True, True, False)])
def test_linear_ops_pass_opcheck(mode, kernel_device, clipped, quantize_output, noise):
    # clipped without Q_out (a row-wise partial sum): an empty output mask, the operands'
    # masks still apply in the backward
    dev = kernel_device
    x = torch.randn(2, 5, 12, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(7, 12, device=dev, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(7, device=dev, dtype=torch.bfloat16, requires_grad=True)
    b = b if quantize_output else None  # the bias comes after Q_out
    index = ops.linear_index(x.shape, 7)
    args = (x, w, b, _ranges(3, dev), _seed(dev), 16, 0.02, 3, index, True, quantize_output,
            clipped, None, noise)
    torch.library.opcheck(torch.ops.optical.linear.default, args, test_utils=OPCHECKS_AUTOGRAD)
    with torch.no_grad():
        _, _, mask = torch.ops.optical.linear(*args)
    x, w = x.detach(), w.detach()
    gy = torch.randn(2, 5, 7, device=dev, dtype=torch.bfloat16)
    for needs_x, needs_w in ((True, True), (True, False), (False, True)):
        bargs = (gy, x, w, _ranges(3, dev), mask, clipped, b is not None, needs_x, needs_w)
        torch.library.opcheck(torch.ops.optical.linear_backward.default, bargs,
                              test_utils=OPCHECKS)


@pytest.mark.parametrize("noisy", [False, True])
def test_quantize_op_passes_opcheck(mode, kernel_device, noisy):
    dev = kernel_device
    x = torch.randn(3, 4, 9, device=dev, requires_grad=True)
    args = (x, _ranges(1, dev)[0], _seed(dev), 256, 0.0, 1, noisy, ops.linear_index(x.shape, 9),
            True, True, None)
    torch.library.opcheck(torch.ops.optical.quantize.default, args, test_utils=OPCHECKS_AUTOGRAD)


@pytest.mark.parametrize("cached, noise", [(False, True), (False, False), (True, True)])
def test_attention_ops_pass_opcheck(mode, kernel_device, cached, noise):
    # cached: a padded chunk of 5 query rows at q_start 19 over 24 keys (Tensor? key_mask,
    # int q_start); else the training call (no mask, q_start 0)
    dev = kernel_device
    dt = torch.bfloat16 if (mode == "triton" or dev.type == "cuda") else torch.float32
    lq, lk = (5, 24) if cached else (24, 24)
    q = torch.randn(2, 4, lq, 64, device=dev, dtype=dt, requires_grad=True)
    k, v = (torch.randn(2, 2, lk, 64, device=dev, dtype=dt, requires_grad=True) for _ in "kv")
    mask = torch.arange(lk, device=dev)[None, :] >= torch.tensor([[3], [0]], device=dev)
    key_mask, q_start = (mask, lk - lq) if cached else (None, 0)
    args = (q, k, v, _ranges(5, dev), _seed(dev, 2), 256, 0.02, 0, 0.125, True, [0, 2, 0, 4],
            True, False, noise, key_mask, q_start)
    torch.library.opcheck(torch.ops.optical.attention.default, args,
                          test_utils=OPCHECKS_AUTOGRAD)
    with torch.no_grad():
        y, stats, _ = torch.ops.optical.attention(*args)
    q, k, v = q.detach(), k.detach(), v.detach()
    bargs = (torch.randn_like(y), q, k, v, y, stats, _ranges(5, dev), _seed(dev, 2), 256, 0.02, 0,
             0.125, True, [0, 2, 0, 4], False, noise, key_mask, q_start)
    torch.library.opcheck(torch.ops.optical.attention_backward.default, bargs,
                          test_utils=OPCHECKS)


def test_attention_padding_and_cache_through_the_op(kernel_device):
    """ops.optical_attention with key_padding_mask and q_start: the kernel path (bf16) and the
    reference path agree, forward and backward; hidden keys get zero dk, dv; dead rows are 0."""
    dev = kernel_device
    g = torch.Generator().manual_seed(5)
    q0 = torch.randn(2, 4, 6, 64, generator=g)
    k0, v0 = torch.randn(2, 2, 21, 64, generator=g), torch.randn(2, 2, 21, 64, generator=g)
    mask = (torch.arange(21)[None, :] >= torch.tensor([[17], [2]])).to(dev)
    out = {}
    for mode in ("reference", "triton"):
        q, k, v = (t.to(dev, torch.bfloat16).requires_grad_() for t in (q0, k0, v0))
        with _kernel_mode(mode):
            y, obs = ops.optical_attention(
                q, k, v, _ranges(5, dev), _seed(dev, 2), levels=256, lut=0.02, stream=3,
                scale=0.125, observe=True, key_padding_mask=mask, q_start=15)
            y.float().square().sum().backward()
        out[mode] = (y.detach().float(), obs, q.grad.float(), k.grad.float(), v.grad.float())
    (yr, obs_r, *gr), (yt, obs_t, *gt) = out["reference"], out["triton"]
    assert (yr[0, :, :2] == 0).all() and (yt[0, :, :2] == 0).all()  # rows 15, 16 see nothing
    assert (yt - yr).abs().max() <= 4.0 / 255 * 1.01 + 0.02  # a Q_y level plus bf16 rounding
    torch.testing.assert_close(obs_t, obs_r, rtol=1e-4, atol=1e-4)
    for a, b in zip(gt, gr):
        assert (a - b).norm() <= 2e-2 * b.norm()
    hidden = ~mask[:, None, :].expand(2, 2, 21)
    assert (gt[1][hidden] == 0).all() and (gt[2][hidden] == 0).all()
    assert (gr[1][hidden] == 0).all() and (gr[2][hidden] == 0).all()


@pytest.mark.parametrize("mode", ["reference", "triton"])
def test_attention_q_start_on_the_device_through_the_op(kernel_device, mode):
    """ops.optical_attention with q_start as a 0-d int64 device tensor (static-cache decoding):
    the op (schema, fake, both paths) gives the int q_start's bits; backward is refused."""
    dev = kernel_device
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 1, 64, generator=g).to(dev, torch.bfloat16)
    k, v = (torch.randn(2, 2, 21, 64, generator=g).to(dev, torch.bfloat16) for _ in "kv")
    mask = (torch.arange(21)[None, :] <= 11).expand(2, 21).to(dev)  # a static cache filled to 11
    with _kernel_mode(mode):
        ys = []
        for q_start in (11, torch.tensor(11, device=dev)):
            torch.manual_seed(0)
            ys.append(ops.optical_attention(q, k, v, _ranges(5, dev), _seed(dev, 2), levels=16,
                                            lut=0.02, stream=3, scale=0.125,
                                            key_padding_mask=mask, q_start=q_start)[0])
        assert torch.equal(ys[0], ys[1])
        args = (q, k, v, _ranges(5, dev), _seed(dev, 2), 16, 0.02, 3, 0.125, True,
                [0, 2, 0, 4], False, False, True, mask, 0, None, 0.0,
                torch.tensor(11, device=dev))
        torch.library.opcheck(torch.ops.optical.attention.default, args,
                              test_utils=("test_schema", "test_faketensor"))
        qg = q.clone().requires_grad_()
        y, _ = ops.optical_attention(qg, k, v, _ranges(5, dev), _seed(dev, 2), levels=16,
                                     lut=0.02, stream=3, scale=0.125, key_padding_mask=mask,
                                     q_start=torch.tensor(11, device=dev))
        with pytest.raises(RuntimeError, match="for inference"):
            y.float().sum().backward()


def test_attention_argument_errors():
    q = torch.randn(1, 2, 3, 16)
    k = torch.randn(1, 2, 8, 16)
    kw = dict(levels=16, lut=None, stream=0, scale=0.25)
    r, s = _ranges(5, "cpu"), _seed("cpu", 2)
    with pytest.raises(ValueError, match="q_start"):
        ops.optical_attention(q, k, k, r, s, q_start=6, **kw)
    with pytest.raises(ValueError, match="q_start"):
        ops.optical_attention(q, k, k, r, s, q_start=1.0, **kw)
    with pytest.raises(ValueError, match=r"key_padding_mask.*\[B, Lk\]"):
        ops.optical_attention(q, k, k, r, s, q_start=5,
                              key_padding_mask=torch.ones(1, 3, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match="torch.bool"):
        ops.optical_attention(q, k, k, r, s, q_start=5, key_padding_mask=torch.ones(1, 8), **kw)


# The catalogue of bad op arguments: (id, op, keyword overrides, words the message must hold).
# The kernels would turn each into NaNs, garbage or another read-out silently; the reference
# refused some of them only from inside.
def _linear_call(dev, **kw):
    x, w = torch.randn(4, 8, device=dev), torch.randn(5, 8, device=dev)
    args = dict(levels=256, lut=None, stream=0, index=ops.linear_index(x.shape, 5),
                observe=False)
    bias = kw.pop("bias", None)
    return ops.optical_linear(x, w, bias, _ranges(3, dev), _seed(dev), **{**args, **kw})


def _quantize_call(dev, **kw):
    x = torch.randn(4, 8, device=dev)
    return ops.optical_quantize(x, _ranges(1, dev)[0], _seed(dev), **{"levels": 256, **kw})


def _attention_call(dev, **kw):
    q = torch.randn(1, 2, 8, 64, device=dev, dtype=torch.bfloat16)
    args = dict(levels=256, lut=None, stream=0, scale=0.125)
    return ops.optical_attention(q, q, q, _ranges(5, dev), _seed(dev, 2), **{**args, **kw})


BAD_OP_ARGS = [
    ("linear levels 1", _linear_call, dict(levels=1), ["optical_linear", "levels", "2 <= L"]),
    ("linear levels bool", _linear_call, dict(levels=True), ["levels", "integer"]),
    ("linear levels float", _linear_call, dict(levels=16.0), ["levels", "integer"]),
    ("linear lut 1.5", _linear_call, dict(lut=1.5), ["lut", "0 <= lut < 1"]),
    ("linear lut negative", _linear_call, dict(lut=-0.1), ["lut", "0 <= lut < 1"]),
    ("linear photons -1", _linear_call, dict(photons=-1.0), ["photons", "finite", ">= 0"]),
    ("linear photons inf", _linear_call, dict(photons=float("inf")), ["photons", "finite"]),
    ("linear qlevels with a 1", _linear_call, dict(qlevels=(256, 1, 256)),
     ["qlevels", "level of w", "2 <= L"]),
    ("linear qlevels of two", _linear_call, dict(qlevels=(256, 256)),
     ["qlevels", "3 levels", "x, w, out"]),
    ("linear bias without Q_out", _linear_call,
     dict(bias=torch.zeros(5), quantize_output=False), ["bias", "quantize_output=False"]),
    ("quantize levels 1", _quantize_call, dict(levels=1), ["optical_quantize", "levels"]),
    ("quantize shot with lut", _quantize_call, dict(noisy=True, photons=0.5, lut=0.02),
     ["lut", "shot read-out", "photons > 0"]),
    ("quantize photons nan", _quantize_call, dict(noisy=True, photons=float("nan")),
     ["photons", ">= 0"]),
    ("quantize contraction 0", _quantize_call, dict(noisy=True, photons=0.5, contraction=0),
     ["contraction", ">= 1"]),
    ("attention levels 1", _attention_call, dict(levels=1), ["optical_attention", "levels"]),
    ("attention photons -1", _attention_call, dict(photons=-1.0), ["photons", ">= 0"]),
    ("attention lut 1", _attention_call, dict(lut=1.0), ["lut", "0 <= lut < 1"]),
    ("attention qlevels of five", _attention_call, dict(qlevels=(16,) * 5),
     ["qlevels", "6 levels", "q, k, s, p, v, y"]),
]


@pytest.mark.parametrize("name, call, kw, words", BAD_OP_ARGS, ids=[c[0] for c in BAD_OP_ARGS])
def test_bad_op_arguments_are_refused_by_name_before_any_launch(mode, kernel_device, monkeypatch,
                                                                 name, call, kw, words):
    def launched(*_):  # every op implementation asks this first, on either path
        raise AssertionError("an op implementation ran before the arguments were checked")

    monkeypatch.setattr(ops, "_use_kernels", launched)
    if "bias" in kw:
        kw = {**kw, "bias": kw["bias"].to(kernel_device)}
    with pytest.raises(ValueError) as e:
        call(kernel_device, **kw)
    for word in words:
        assert word in str(e.value), (word, str(e.value))


@pytest.mark.parametrize("fake", [False, True])
def test_the_raw_linear_op_refuses_a_bias_without_q_out(fake):
    """Not only the wrapper: a direct `torch.ops.optical.linear` call (and its fake, which
    torch.compile traces) would otherwise drop the bias and still return its gradient."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def call():
        x, w, b = torch.randn(2, 12), torch.randn(7, 12), torch.randn(7)
        torch.ops.optical.linear(x, w, b, _ranges(3, x.device), _seed(x.device), 16, 0.0, 3,
                                 ops.linear_index(x.shape, 7), True, False, False, None)

    with pytest.raises(ValueError, match="bias must be None with quantize_output=False"):
        if fake:
            with FakeTensorMode():
                call()
        else:
            call()


@pytest.mark.parametrize("call", [_linear_call, _quantize_call, _attention_call])
def test_bad_op_arguments_control_the_spy_sees_a_launch(mode, kernel_device, monkeypatch, call):
    # the negative control of the catalogue's check: good arguments reach the implementation
    def launched(*_):
        raise LookupError("launched")

    monkeypatch.setattr(ops, "_use_kernels", launched)
    with pytest.raises(LookupError):
        call(kernel_device)


def test_straight_through_gradients_through_the_op():
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(5, 6, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    y, obs = ops.optical_linear(x, w, b, _ranges(3, "cpu"), _seed("cpu"), levels=256, lut=None,
                                stream=0, index=ops.linear_index(x.shape, 5), observe=True)
    y.sum().backward()
    # Straight-through: the gradients of the plain linear on the unquantized operands.
    gy = torch.ones(4, 5)
    assert torch.allclose(x.grad, gy @ w.detach(), atol=1e-6)
    assert torch.allclose(w.grad, gy.t() @ x.detach(), atol=1e-6)
    assert torch.allclose(b.grad, gy.sum(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q_noise_off_through_the_ops(mode, kernel_device, dtype):
    # noise=False: the ops (kernel or reference path, fp32 attention takes the reference) give
    # seed-independent results equal to the reference's det computation.
    dev = kernel_device
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 10, generator=g).to(device=dev, dtype=dtype)
    w = torch.randn(6, 10, generator=g).to(device=dev, dtype=dtype)
    ranges = _ranges(3, dev, -3.0, 3.0)
    lin = lambda s: ops.optical_linear(x, w, None, ranges, _seed(dev) + s, levels=4, lut=None,
                                       stream=0, index=ops.linear_index(x.shape, 6),
                                       observe=False, noise=False)[0]
    y = lin(0)
    assert torch.equal(y, lin(99))
    yr, _ = ops.ref.optical_linear_forward(x.cpu().reshape(6, 10), w.cpu(), None,
                                           *ranges.cpu(), levels=4, lut=None, seed=0, stream=0,
                                           noise=False)
    assert (y.cpu().reshape(6, 6) != yr).float().mean() <= 2 / 36  # accumulation-order flips
    q, k, v = (torch.randn(1, h, 20, 32, generator=g).to(device=dev, dtype=dtype)
               for h in (2, 1, 1))
    att = lambda s: ops.optical_attention(q, k, v, _ranges(5, dev), _seed(dev, 2) + s, levels=4,
                                          lut=0.02, stream=0, scale=0.2, noise=False)[0]
    assert torch.equal(att(0), att(7))


def _clipped_linear_grads(dev, quantize_output, bias):
    """Gradients of ops.optical_linear with clipped=True where Q_x, Q_w and Q_out all clamp,
    and the masks each quantizer's clamping gives."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 10, generator=g).to(dev).requires_grad_()
    w = torch.randn(5, 10, generator=g).to(dev).requires_grad_()
    b = (torch.randn(5, generator=g) * 4).to(dev).requires_grad_() if bias else None
    ranges = torch.tensor([[-0.8, 0.8], [-0.6, 0.6], [-1.5, 1.5]], device=dev)
    y, _ = ops.optical_linear(x, w, b, ranges, _seed(dev), levels=16, lut=None, stream=0,
                              index=ops.linear_index(x.shape, 5), observe=False,
                              quantize_output=quantize_output, clipped=True, noise=False)
    gy = torch.randn(6, 5, generator=g).to(dev)
    y.backward(gy)
    xd, wd = x.detach(), w.detach()
    acc = ops.ref.quantize(xd, ranges[0], 16) @ ops.ref.quantize(wd, ranges[1], 16).t()
    masks = [ops.ref.clamp_mask(t, r) for t, r in ((xd, ranges[0]), (wd, ranges[1]),
                                                    (acc, ranges[2]))]
    return (xd, wd, gy), (x.grad, w.grad, b.grad if bias else None), masks


def test_clipped_gradients_without_q_out_mask_x_and_w(mode, kernel_device):
    """quantize_output=False (a row-wise tensor-parallel partial sum, Q_out after the
    reduction): clipped still zeroes x's and W's gradients where Q_x and Q_w clamped."""
    (x, w, gy), (gx, gw, _), (mx, mw, _) = _clipped_linear_grads(kernel_device, False, False)
    assert not mx.all() and not mw.all()
    torch.testing.assert_close(gx, (gy @ w) * mx)
    torch.testing.assert_close(gw, (gy.t() @ x) * mw)


def test_clipped_bias_gradient_is_not_masked_by_q_out(mode, kernel_device):
    """The bias is added after Q_out, digitally (section 2): dL/db = sum of dL/dy even where
    Q_out clamped, while x's and W's gradients take Q_out's mask."""
    (x, w, gy), (gx, gw, gb), (mx, mw, mo) = _clipped_linear_grads(kernel_device, True, True)
    assert not mo.all()
    torch.testing.assert_close(gb, gy.sum(0))
    torch.testing.assert_close(gx, ((gy * mo) @ w) * mx)
    torch.testing.assert_close(gw, ((gy * mo).t() @ x) * mw)


def test_only_the_needed_gradients_are_computed():
    # A frozen input (no requires_grad): the backward op is told so and returns no gradient.
    x = torch.randn(4, 6)
    w = torch.randn(5, 6, requires_grad=True)
    y, _ = ops.optical_linear(x, w, None, _ranges(3, "cpu"), _seed("cpu"), levels=256, lut=None,
                              stream=0, index=ops.linear_index(x.shape, 5), observe=False)
    (gw,) = torch.autograd.grad(y.sum(), [w])
    assert torch.allclose(gw, torch.ones(4, 5).t() @ x, atol=1e-6)
    assert x.grad is None


# --- issue 16: per-quantizer levels and the shot read-out through the ops ----------------------
@pytest.mark.parametrize("qlevels, photons", [([16, 8, 32], 0.0), (None, 0.5), ([16, 8, 32], 0.5)])
def test_linear_and_quantize_ops_new_options_opcheck(mode, kernel_device, qlevels, photons):
    dev = kernel_device
    x = torch.randn(2, 5, 12, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(7, 12, device=dev, dtype=torch.bfloat16, requires_grad=True)
    args = (x, w, None, _ranges(3, dev), _seed(dev), 16, 0.02, 3, ops.linear_index(x.shape, 7),
            True, True, True, None, True, qlevels, photons)
    torch.library.opcheck(torch.ops.optical.linear.default, args, test_utils=OPCHECKS_AUTOGRAD)
    xq = torch.randn(3, 4, 9, device=dev, requires_grad=True)
    qargs = (xq, _ranges(1, dev)[0], _seed(dev), 64, 0.0, 1, True,
             ops.linear_index(xq.shape, 9), True, True, None, photons, 40)
    torch.library.opcheck(torch.ops.optical.quantize.default, qargs,
                          test_utils=OPCHECKS_AUTOGRAD)


@pytest.mark.parametrize("qlevels, photons", [([64, 32, 128, 512, 16, 64], 0.0), (None, 0.1)])
def test_attention_ops_new_options_opcheck(mode, kernel_device, qlevels, photons):
    dev = kernel_device
    dt = torch.bfloat16 if (mode == "triton" or dev.type == "cuda") else torch.float32
    q = torch.randn(2, 4, 24, 64, device=dev, dtype=dt, requires_grad=True)
    k, v = (torch.randn(2, 2, 24, 64, device=dev, dtype=dt, requires_grad=True) for _ in "kv")
    args = (q, k, v, _ranges(5, dev), _seed(dev, 2), 256, 0.02, 0, 0.125, True, [0, 2, 0, 4],
            True, False, True, None, 0, qlevels, photons)
    torch.library.opcheck(torch.ops.optical.attention.default, args,
                          test_utils=OPCHECKS_AUTOGRAD)
    with torch.no_grad():
        y, stats, _ = torch.ops.optical.attention(*args)
    bargs = (torch.randn_like(y), q.detach(), k.detach(), v.detach(), y, stats, _ranges(5, dev),
             _seed(dev, 2), 256, 0.02, 0, 0.125, True, [0, 2, 0, 4], False, True, None, 0,
             qlevels, photons)
    torch.library.opcheck(torch.ops.optical.attention_backward.default, bargs,
                          test_utils=OPCHECKS)


def test_new_options_kernel_path_equals_reference_path(kernel_device):
    """ops.optical_linear / optical_attention with per-quantizer levels and the shot read-out:
    the kernel path and the reference path agree (a read-out level at most, rarely)."""
    dev = kernel_device
    g = torch.Generator().manual_seed(6)
    x0, w0 = torch.randn(3, 7, 40, generator=g), torch.randn(24, 40, generator=g) * 0.2
    q0 = torch.randn(2, 4, 20, 64, generator=g)
    k0, v0 = torch.randn(2, 2, 20, 64, generator=g), torch.randn(2, 2, 20, 64, generator=g)
    lin_r = torch.tensor([[-3.0, 3.0], [-0.5, 0.5], [-4.0, 4.0]], device=dev)
    att_r = torch.tensor([[-3.0, 3.0], [-3.0, 3.0], [-3.0, 3.0], [-40.0, 40.0], [-2.0, 2.0]],
                         device=dev)
    out = {}
    for mode in ("reference", "triton"):
        with _kernel_mode(mode):
            x, w = x0.to(dev, torch.bfloat16), w0.to(dev, torch.bfloat16)
            yl, _ = ops.optical_linear(x, w, None, lin_r, _seed(dev), levels=256, lut=0.02,
                                       stream=1, index=ops.linear_index(x.shape, 24),
                                       observe=False, qlevels=(64, 32, 16), photons=0.3)
            q, k, v = (t.to(dev, torch.bfloat16) for t in (q0, k0, v0))
            ya, _ = ops.optical_attention(q, k, v, att_r, _seed(dev, 2), levels=256, lut=0.02,
                                          stream=3, scale=0.125, qlevels=(64, 64, 32, 256, 64, 16),
                                          photons=0.05)
        out[mode] = (yl.float(), ya.float())
    (lr, ar), (lt, at) = out["reference"], out["triton"]
    assert (lr != lt).float().mean() <= 0.01 and (lr - lt).abs().max() <= 8.0 / 15 * 1.01 + 0.05
    assert (ar != at).float().mean() <= 0.01 and (ar - at).abs().max() <= 4.0 / 15 * 1.01 + 0.02


def _tensors_in(value, depth=2):
    """Tensors held by a module-level value (directly, or in dicts/lists/tuples/sets)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth == 0:
        return []
    if isinstance(value, dict):
        items = list(value.values()) + list(value.keys())
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
    else:
        return []
    return [t for v in items for t in _tensors_in(v, depth - 1)]


def test_ops_leave_no_tensor_in_module_state(mode, kernel_device):
    # Under optical.cuda_graphs a tensor an op caches on first use is made inside a graph's
    # warm-up and outlives it in the graph's memory pool, which Inductor's graph trees refuse
    # (the linear's old observation template did: bench/results/README.md, stop 23).
    import importlib

    dev = kernel_device
    x = torch.randn(2, 8, 16, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(24, 16, device=dev, dtype=torch.bfloat16, requires_grad=True)
    y, _ = ops.optical_linear(x, w, None, _ranges(3, dev), _seed(dev), levels=16, lut=0.02,
                              stream=1, index=ops.linear_index(x.shape, 24), observe=True)
    q = torch.randn(1, 2, 32, 16, device=dev, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(1, 1, 32, 16, device=dev, dtype=torch.bfloat16, requires_grad=True)
    a, _ = ops.optical_attention(q, kv, kv, _ranges(5, dev), _seed(dev, 2), levels=16,
                                 lut=0.02, stream=1, scale=0.25, observe=True)
    (y.float().sum() + a.float().sum()).backward()
    ops.optical_quantize(y.detach(), _ranges(1, dev)[0], _seed(dev), levels=16, noisy=True,
                         observe=True)
    names = ["ops", "reference", "modules", "ranges", "stats", "kernels.linear",
             "kernels.attention", "kernels.quantizer"]
    for name in names:
        module = importlib.import_module(f"torchtitan_ext.optical.{name}")
        held = {k: len(_tensors_in(v)) for k, v in vars(module).items() if _tensors_in(v)}
        assert not held, (name, held)
