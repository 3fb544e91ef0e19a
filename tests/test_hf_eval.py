"""lm-evaluation-harness on a tiny optical export: its `hf` model type with trust_remote_code,
batch size 4 (padded batches), a log-likelihood and a generation task shipped in
tests/lm_eval_tasks (local data, no hub). CPU, offline."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")

from hf_tiny import tiny_optical_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["optical_code_ll", "optical_code_gen"]


def test_lm_eval_hf_model_type_runs_on_the_optical_export(tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from torchtitan_ext.hf.auto import OpticalLlamaForCausalLM

    monkeypatch.chdir(ROOT)  # the tasks name their data files relative to the repository root
    folder = tiny_optical_folder(tmp_path / "tiny")
    lm = HFLM(pretrained=str(folder), trust_remote_code=True, dtype="float32", batch_size=4,
              device="cpu")
    assert isinstance(lm.model, OpticalLlamaForCausalLM) and lm.model.optical_report.count == 16
    seen = []
    attn = lm.model.model.layers[0].self_attn.optical_attention
    attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0].shape[0], args[0].shape[2], args[1].shape[2],
                                               kwargs.get("key_padding_mask") is not None)),
        with_kwargs=True)
    out = lm_eval.simple_evaluate(model=lm, tasks=TASKS, batch_size=4,
                                  task_manager=TaskManager(include_path=str(ROOT / "tests" / "lm_eval_tasks")))
    res = out["results"]
    assert 0.0 <= res["optical_code_ll"]["acc,none"] <= 1.0
    assert 0.0 <= res["optical_code_gen"]["exact_match,none"] <= 1.0
    assert any(b > 1 for b, *_ in seen)  # batched
    assert any(lq == 1 and lk > 1 for _, lq, lk, _ in seen)  # cached decoding steps
    assert any(padded for *_, padded in seen)  # padded batches reached the optical attention
