"""Test-session set-up shared by every test file.

Without a GPU the Triton kernels are exercised by Triton's interpreter, which must be switched on
before triton is first imported (torch may import it), hence here, before anything else.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


@pytest.fixture
def kernel_device():
    """Where kernel tests run: the GPU if present, else CPU tensors under the interpreter."""
    if HAS_GPU:
        return torch.device("cuda")
    if not INTERPRET:
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    return torch.device("cpu")
