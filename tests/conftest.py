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
    # HF_TURBO_BACKEND=reference runs the whole suite on the reference backend; tests of the CPU backend's own
    # machinery (its rows, C++ ops, packed weights) then have nothing to test
    forced = os.environ.get("HF_TURBO_BACKEND")
    if forced and forced != "cpu":
        skip_cpu = pytest.mark.skip(reason=f"tests the CPU backend; HF_TURBO_BACKEND={forced}")
        for item in items:
            if "cpu_backend" in item.keywords:
                item.add_marker(skip_cpu)
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


@pytest.fixture(scope="module")
def fixture_pair():
    """The shipped fixture model (3M, trained on the standard library) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_turbo.testing import fixture_path

    path = fixture_path("target")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
