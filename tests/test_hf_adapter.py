"""The optical state-dict adapter (torchtitan's HF save and load): `checkpoint.last_save_in_hf`
of an optical run is refused at start-up, the HF load is not."""

from pathlib import Path

import pytest
import torch

from torchtitan_ext.optical.config import OpticalConfigError
from torchtitan_ext.titan.hf_adapter import (
    RANGE_SUFFIX,
    OpticalLlama3StateDictAdapter,
    check_last_save_in_hf,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "train_configs" / "debug_model.toml")
DIGITAL = str(ROOT / "train_configs" / "debug_model_digital.toml")


@pytest.fixture(scope="module")
def optical():
    from torchtitan_ext.hf.checkpoint import load_job_config
    from torchtitan_ext.titan.model import build_titan_model

    built = build_titan_model(load_job_config(CONFIG), device="meta")
    state = {k: torch.zeros(v.shape) for k, v in built.model.state_dict().items()}
    assert any(k.endswith(RANGE_SUFFIX) for k in state)
    return built.args, state


def test_the_hf_load_still_asks_only_for_the_folders_ranges(optical):
    """torchtitan's HF load calls the same to_hf: a folder without ranges loads the weights and
    leaves the ranges to calibrate (no error)."""
    args, state = optical
    hf = OpticalLlama3StateDictAdapter(args, None).to_hf(state)
    assert hf and not any(k.endswith(RANGE_SUFFIX) for k in hf)


def test_check_last_save_in_hf_at_start_up():
    from torchtitan_ext.hf.checkpoint import load_job_config

    check_last_save_in_hf(load_job_config(CONFIG))  # the default: false
    with pytest.raises(OpticalConfigError, match="checkpoint.last_save_in_hf"):
        check_last_save_in_hf(load_job_config(CONFIG, ["--checkpoint.last_save_in_hf"]))
    check_last_save_in_hf(load_job_config(DIGITAL, ["--checkpoint.last_save_in_hf"]))
