"""The energy table at training start (converter) and for a job: logged once, never fatal."""

import logging

import torch


CONFIG = "train_configs/debug_model.toml"


def _job(*overrides):
    from torchtitan.config import ConfigManager

    from torchtitan_ext.titan.launch import with_custom_config

    return ConfigManager().parse_args(with_custom_config(["--job.config_file", CONFIG, *overrides]))


def test_energy_table_for_job_counts_the_debug_model():
    from torchtitan_ext.titan.energy import energy_report_for_job, energy_table_for_job

    job = _job()
    report = energy_report_for_job(job)
    kinds = {(r.kind, r.mode) for r in report.rows}
    assert ("feed-forward", "optical") in kinds and ("output head", "digital") in kinds
    assert report.dims.seq_len == job.training.seq_len and report.dims.dim == 256
    assert "| **total** |" in energy_table_for_job(job)
    digital = energy_report_for_job(_job("--model.converters", ""))
    assert {r.mode for r in digital.rows} == {"digital"}


def test_converter_logs_the_table_once_and_survives_a_failure(caplog, monkeypatch):
    import torchtitan_ext.titan.energy as energy_hooks
    from torchtitan_ext.titan.converter import OpticalTransformerConverter
    from torchtitan_ext.titan.model import spec_and_args

    job = _job()
    conv = OpticalTransformerConverter(job, None)
    spec, _, args = spec_and_args(job)
    with torch.device("meta"):
        models = [spec.model_cls(args) for _ in range(2)]
    caplog.set_level(logging.INFO)
    root = logging.getLogger()
    root.addHandler(caplog.handler)  # torchtitan's logger may not propagate to caplog's
    try:
        conv.convert(models[0])
        conv.convert(models[1])  # a second build logs no second table
        assert sum("optical energy estimate" in r.getMessage() for r in caplog.records) == 1
        _check_failure_is_logged(job, caplog, monkeypatch, energy_hooks)
    finally:
        root.removeHandler(caplog.handler)


def _check_failure_is_logged(job, caplog, monkeypatch, energy_hooks):
    def boom(*a, **k):
        raise RuntimeError("no flavor")

    monkeypatch.setattr(energy_hooks, "energy_table_for_job", boom)
    caplog.clear()
    assert energy_hooks.log_energy_table(job) is False
    assert any("not made: RuntimeError: no flavor" in r.getMessage() for r in caplog.records)
