"""Test tiers: CPU (Triton interpreted, small shapes; CI) and GPU (``-m gpu``)."""
import os
import shutil

# Must happen before triton is imported anywhere: run kernels on the CPU interpreter unless a
# CUDA machine is present (GPU tier) or the caller decided explicitly.
if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (GPU tier: make test-gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
