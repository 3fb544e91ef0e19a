"""Fast checks for torchtitan_ext.titan.cpu_compat (no torchrun, < 10 s)."""

import importlib

import pytest
import torch

from torchtitan_ext.titan import cpu_compat

pytestmark = pytest.mark.skipif(
    cpu_compat.has_accelerator(),
    reason="apply_cpu_compat() is a no-op when an accelerator is present",
)


@pytest.fixture(scope="module")
def applied():
    assert cpu_compat.apply_cpu_compat() is True
    import torchtitan.tools.utils as tt_utils

    return tt_utils.device_module


def test_device_globals_rebound_everywhere(applied):
    import torchtitan.components.metrics as metrics
    import torchtitan.distributed.parallel_dims as parallel_dims
    import torchtitan.distributed.utils as dist_utils
    import torchtitan.tools.profiling as profiling
    import torchtitan.tools.utils as tt_utils

    assert tt_utils.device_type == "cpu"
    assert isinstance(tt_utils.device_module, cpu_compat.CpuDeviceModule)
    assert tt_utils.get_device_info() == ("cpu", tt_utils.device_module)
    for mod in (metrics, dist_utils):
        assert mod.device_type == "cpu"
        assert mod.device_module is tt_utils.device_module
    assert parallel_dims.device_type == "cpu"
    assert profiling.device_module is tt_utils.device_module


def test_idempotent(applied):
    import torchtitan.distributed.utils as dist_utils
    import torchtitan.tools.utils as tt_utils

    assert cpu_compat.apply_cpu_compat() is True
    assert tt_utils.device_module is applied  # no second shim installed
    assert dist_utils.set_pg_timeouts is cpu_compat._set_pg_timeouts_gloo


def test_train_module_sees_patches(applied):
    train = importlib.import_module("torchtitan.train")

    assert train.utils.device_type == "cpu"  # read at train.py:86
    assert train.maybe_enable_profiling is cpu_compat._maybe_enable_profiling_cpu
    assert train.dist_utils.set_pg_timeouts is cpu_compat._set_pg_timeouts_gloo


def test_memory_monitor_on_cpu(applied):
    from torchtitan.components.metrics import DeviceMemoryMonitor

    monitor = DeviceMemoryMonitor("cpu")
    assert monitor.device_capacity > 0
    assert isinstance(monitor.device_name, str) and monitor.device_name
    stats = monitor.get_peak_stats()
    assert stats.max_reserved_gib > 0
    assert 0 < stats.max_reserved_pct < 100
    assert stats.num_ooms == 0 and stats.num_alloc_retries == 0
    monitor.reset_peak_stats()


def test_shim_calls(applied):
    shim = applied
    shim.set_device(torch.device("cpu:0"))
    shim.synchronize()
    shim.empty_cache()
    assert shim.current_device() == 0
    assert shim.device_count() == 1 and shim.is_available()
    shim.memory._record_memory_history(max_entries=10)
    assert shim.memory._snapshot() == {"segments": [], "device_traces": []}


def test_optical_spec_makes_fsdp_gloo_compatible(applied, monkeypatch):
    """The product's path for fix 4: the optical spec's parallelize function (optical runs and
    digital twins) ends with make_fsdp_gloo_compatible on a host without an accelerator."""
    from types import SimpleNamespace

    from torchtitan.protocols.train_spec import get_train_spec

    import torchtitan_ext.titan  # noqa: F401  (registers the spec)
    from torchtitan_ext.titan import spec as optical_spec

    calls = []
    monkeypatch.setattr(optical_spec, "parallelize_llama", lambda model, *args: model)
    monkeypatch.setattr(optical_spec, "make_fsdp_gloo_compatible", calls.append)
    model = torch.nn.Linear(2, 2)
    dims = SimpleNamespace(pp_enabled=False, cp_enabled=False, dp_enabled=False,
                           tp_enabled=False)
    job = SimpleNamespace(optical=SimpleNamespace(ac_save_attention=False))
    parallelize = get_train_spec(optical_spec.SPEC_NAME).parallelize_fn
    assert parallelize is optical_spec.parallelize_optical_llama
    assert parallelize(model, dims, job) is model
    assert calls == [model]


def test_make_fsdp_gloo_compatible(applied, tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        mesh = init_device_mesh("cpu", (1,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.set_gradient_divide_factor(1.0)  # as torchtitan does
        assert cpu_compat.make_fsdp_gloo_compatible(model) == 2
        model(torch.randn(3, 4)).sum().backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()
