from __future__ import annotations

import os
import shutil

# Triton chooses interpreted or compiled kernels when it is first imported: without a GPU, make every
# Triton launch in the suite run under the interpreter (CPU tensors still use the torch reference
# unless a test asks for backend="triton").
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Results must not depend on the thread count; pin it so a failure reproduces.
    torch.set_num_threads(2)
    yield
