"""The backend seam (hf_turbo/backends): the selector, and the engine's tokens on every CPU-capable backend
equal stock generate(), including with the CPU backend deleted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hf_turbo
from hf_turbo import Engine, SamplingParams, TurboConfig
from hf_turbo.backends import BACKEND_ENV, get_backend, resolve_backend
from hf_turbo.testing import tiny_model

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 9, 2, 33, 7, 1], [11, 4, 8], list(range(3, 40)), [17, 3, 9, 21, 2]]


def _stock(model, max_new: int = 10) -> list[list[int]]:
    return [model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False)[0, len(p):].tolist()
            for p in PROMPTS]


def test_selector(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend("auto", "cpu") == "cpu"
    assert resolve_backend("reference", "cpu") == "reference"
    assert get_backend("auto", "cpu").name == "cpu" and get_backend("reference", "cpu").name == "reference"
    with pytest.raises(ValueError, match="backend 'cpu' runs on the CPU"):
        resolve_backend("cpu", "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", "cpu")
    monkeypatch.setenv(BACKEND_ENV, "reference")  # the documented override of TurboConfig.backend
    assert resolve_backend("auto", "cpu") == "reference" and resolve_backend("cpu", "cpu") == "reference"
    monkeypatch.setenv(BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        resolve_backend("auto", "cpu")


def test_config_names_the_field():
    assert TurboConfig(backend="cpu").backend == "cpu"
    with pytest.raises(ValueError, match="TurboConfig.backend"):
        TurboConfig(backend="mkl")


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_engine_equals_stock_on_each_backend(arch, backend, monkeypatch):
    """Chunked prefill (a 6-token budget), prefix caching and mixed steps, on each backend."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    model = tiny_model(arch, seed=4)
    want = _stock(model)
    engine = Engine(model, config=TurboConfig(backend=backend, max_num_batched_tokens=6, debug_checks=True))
    assert engine.backend.name == backend
    outs = engine.generate(PROMPTS + PROMPTS[:1], SamplingParams(max_new_tokens=10, temperature=0), use_tqdm=False)
    assert [o.token_ids for o in outs] == want + want[:1]
    hf_turbo.restore(model)


def test_engine_without_the_cpu_backend_package(tmp_path):
    """Deleting hf_turbo/backends/cpu leaves a working CPU engine on the reference backend."""
    copy = tmp_path / "hf_turbo"
    shutil.copytree(REPO / "hf_turbo", copy, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.rmtree(copy / "backends" / "cpu")
    code = textwrap.dedent(f"""
        import sys, torch
        from hf_turbo import Engine, SamplingParams
        from hf_turbo.testing import tiny_model
        model = tiny_model("llama", seed=4)
        prompts = {PROMPTS!r}
        want = [model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p):].tolist()
                for p in prompts]
        engine = Engine(model)
        got = [o.token_ids for o in engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0),
                                                    use_tqdm=False)]
        assert engine.backend.name == "reference", engine.backend.name
        assert got == want, (got, want)
        assert not any(m.startswith("hf_turbo.backends.cpu") for m in sys.modules)
        print("ok", sys.modules["hf_turbo"].__file__)
    """)
    env = {k: v for k, v in os.environ.items() if k != BACKEND_ENV}
    env["PYTHONPATH"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok " + str(copy))  # the copy ran, not the checkout


def test_a_cuda_backend_choice_never_imports_the_cpu_backend():
    code = ("import sys; from hf_turbo.backends import resolve_backend; import hf_turbo; "
            "name = resolve_backend('auto', 'cuda'); "
            "assert not any(m.startswith('hf_turbo.backends.cpu') for m in sys.modules), name; print(name)")
    env = {k: v for k, v in os.environ.items() if k != BACKEND_ENV}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() in ("triton", "reference")
