"""Optical linears and attention under tensor parallelism (2 gloo processes on the CPU) compute
the single-device function: column-wise shards keep Q_out local, row-wise shards quantize after
the reduction, noise indices are global, and observed ranges reduce to the unsharded ones."""

import io
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchtitan_ext.optical.config import QuantizerConfig
from torchtitan_ext.optical.modules import OpticalAttention, OpticalLinear
from torchtitan_ext.optical.ranges import local, update_ranges

pytestmark = pytest.mark.slow

B, S, D, HID, H, HKV = 2, 8, 16, 24, 4, 2


class Block(torch.nn.Module):
    """x -> colwise w1 -> rowwise w2 (sequence-parallel output), and q/k/v colwise -> attention."""

    def __init__(self, cfg):
        super().__init__()
        self.w1 = OpticalLinear(D, HID, bias=True, config=cfg)
        self.w2 = OpticalLinear(HID, D, bias=True, config=cfg)
        self.wq = OpticalLinear(D, H * 4, bias=False, config=cfg)
        self.wk = OpticalLinear(D, HKV * 4, bias=False, config=cfg)
        self.wv = OpticalLinear(D, HKV * 4, bias=False, config=cfg)
        self.att = OpticalAttention(cfg)

    def forward(self, x):
        h = self.w2(torch.relu(self.w1(x)))
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, -1, 4).transpose(1, 2)
        k = self.wk(x).view(b, s, -1, 4).transpose(1, 2)
        v = self.wv(x).view(b, s, -1, 4).transpose(1, 2)
        a = self.att(q, k, v).transpose(1, 2).reshape(b, s, -1)
        return h, a


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, state, x, steps, out_q, cfg):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        mesh = init_device_mesh("cpu", (world,))
        model = Block(cfg)
        model.load_state_dict(state)
        parallelize_module(model, mesh, {
            "w1": ColwiseParallel(),
            "w2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            "wq": ColwiseParallel(), "wk": ColwiseParallel(), "wv": ColwiseParallel(),
        })
        model.w2.tp_output_placement = Shard(1)
        model.att.shard.tp_rank, model.att.shard.tp_size = rank, world
        outs = []
        for _ in range(steps):
            torch.manual_seed(11)
            h, a = model(x)
            h = h.redistribute(mesh, [Replicate()]).to_local() if hasattr(h, "redistribute") else h
            a_full = [torch.empty_like(a) for _ in range(world)]
            dist.all_gather(a_full, a.contiguous())
            # heads are sharded: local attention output holds this rank's heads
            a = torch.cat([t.view(B, S, -1, 4) for t in a_full], 2).reshape(B, S, -1)
            outs.append((h.detach(), a.detach()))
            update_ranges(model)
        ranges = {n: b.to_local().clone() if hasattr(b, "to_local") else b.clone()
                  for n, b in model.named_buffers() if n.endswith("optical_ranges")}
        if rank == 0:
            buf = io.BytesIO()  # plain bytes: shared-memory tensors die with this process
            torch.save((outs, ranges), buf)
            out_q.put(buf.getvalue())
        dist.barrier()  # tear down together: gloo aborts a rank whose peer vanished mid-exit
    finally:
        dist.destroy_process_group()


def _run_two_ranks(worker, args_of_queue):
    """Run `worker(rank, 2, port, *args_of_queue(queue))` on two spawned processes; return what
    rank 0 put on the queue (torch.save bytes), after both exited cleanly."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(r, 2, port, *args_of_queue(q))) for r in range(2)]
    for p in procs:
        p.start()
    out = torch.load(io.BytesIO(q.get(timeout=300)))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


@pytest.mark.parametrize("noise, extra", [
    (True, {}), (False, {}),
    # issue 16: the row-wise path's Q_out after the reduction takes the shot read-out with
    # K = in_features and Q_out's own levels; Q_x at other levels
    (True, {"q_readout": "shot", "q_photons_per_mac": 0.5, "q_levels_input": 64}),
])
def test_tensor_parallel_equals_single_device(noise, extra):
    # noise=False (q_noise off) also checks that the row-wise path's Q_out after the reduction
    # follows the switch: a noisy Q_out there would move many outputs by a level.
    cfg = QuantizerConfig(q_levels=16, q_noise=noise, **extra)
    torch.manual_seed(0)
    ref = Block(cfg)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    x = torch.randn(B, S, D)
    steps = 3
    expect = []
    for _ in range(steps):
        torch.manual_seed(11)
        expect.append(tuple(t.detach() for t in ref(x)))
        update_ranges(ref)
    outs, ranges = _run_two_ranks(_worker, lambda q: (state, x, steps, q, cfg))
    for i, ((h, a), (he, ae)) in enumerate(zip(outs, expect)):
        # Same quantized function up to float32 accumulation order: a value that lands within
        # rounding of a level boundary may move by one level, nothing else may differ.
        level_h = (ranges["w2.optical_ranges"][2, 1] - ranges["w2.optical_ranges"][2, 0]) / 15
        assert (h - he).abs().max() <= level_h * 1.01 + 1e-6, i
        assert ((h - he).abs() > 1e-5).float().mean() < 0.02, i
        assert torch.allclose(a, ae, atol=1e-5), i
    # The observed ranges reduce to the unsharded ones (row-wise outputs are observed after the
    # reduction, never as partial sums).
    for name, r in ranges.items():
        assert torch.allclose(r, dict(ref.named_buffers())[name], rtol=1e-6, atol=1e-7), name


def _rowwise_worker(rank, world, port, state, gy, out_q, cfg, seq_parallel):
    """One row-wise OpticalLinear: a digital warm-up step, then an optical step with clipped
    gradients; sends rank 0's ranges and the gathered gradients of x, W and b. seq_parallel:
    the output sharded along the sequence, as torchtitan's plan has it (spec.py)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (world,))
        lin = OpticalLinear(HID, D, bias=True, config=cfg)
        lin.load_state_dict(state)
        if seq_parallel:
            parallelize_module(lin, mesh, RowwiseParallel(output_layouts=Shard(1)))
            lin.tp_output_placement = Shard(1)
            gy = gy.chunk(world, 1)[rank]
        else:
            parallelize_module(lin, mesh, RowwiseParallel())
        ranges, grads = _rowwise_steps(lin, lambda t: t.chunk(world, -1)[rank], gy)
        gx = [torch.empty_like(grads[0]) for _ in range(world)]
        dist.all_gather(gx, grads[0])
        grads = [torch.cat(gx, -1)] + [g.full_tensor() for g in grads[1:]]
        if rank == 0:
            buf = io.BytesIO()
            torch.save((ranges, grads), buf)
            out_q.put(buf.getvalue())
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _rowwise_steps(lin, shard, gy):
    """Warm-up (digital) then optical steps of `lin` on this rank's `shard` of x; returns the
    ranges after the warm-up and the (local) gradients of the optical step."""
    torch.manual_seed(0)
    x = torch.randn(B, S, HID)
    lin.optical_enabled = False
    lin(shard(x))
    update_ranges(lin)
    ranges = local(lin.optical_ranges).clone()
    lin.optical_enabled = True
    with torch.no_grad():
        local(lin.optical_ranges)[1] *= 0.5  # W clamps too
    xs = shard(x * 3).clone().requires_grad_()  # beyond the warm-up's x range: Q_x clamps
    torch.manual_seed(11)
    y = lin(xs)
    y.backward(gy)
    return ranges, [xs.grad, lin.weight.grad, lin.bias.grad]


@pytest.mark.parametrize("seq_parallel", [False, True])
def test_row_wise_warmup_ranges_and_clipped_gradients_equal_single_device(seq_parallel):
    """Row-wise TP=2 equals TP=1: the digital warm-up observes the reduced accumulator (no
    partial sums, no bias), and q_grad: clipped masks x's and W's gradients there too (Q_out runs
    after the reduction); the bias gradient is dL/dy summed, unmasked."""
    cfg = QuantizerConfig(q_levels=16, q_grad="clipped")
    torch.manual_seed(1)
    ref = OpticalLinear(HID, D, bias=True, config=cfg)
    with torch.no_grad():
        ref.bias.fill_(4.0)  # a bias far outside the accumulator's range
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    gy = torch.randn(B, S, D)
    ranges, grads = _rowwise_steps(ref, lambda t: t, gy)
    assert (grads[0] == 0).any() and (grads[1] == 0).any()  # the masks matter
    tp_ranges, tp_grads = _run_two_ranks(_rowwise_worker,
                                         lambda q: (state, gy, q, cfg, seq_parallel))
    torch.testing.assert_close(tp_ranges, ranges, rtol=1e-6, atol=1e-6)
    assert ranges[2, 1] < 4.0  # the accumulator's range, not the biased output's
    for name, got, want in zip("xWb", tp_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(grads[2], gy.sum((0, 1)))
