"""Tensor parallelism on the CPU (gloo): ``torchrun --nproc_per_node 2`` over tiny llama, qwen3 and mixtral.

One torchrun launch (``tests/_tp_worker.py``) runs every scenario for the three models: rank 0 drives the
Engine, rank 1 follows its plans. Here the outputs are compared with a single-process Engine on the same
weights, and rank 1's counts show that it sampled rank 0's tokens itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hf_turbo import Engine, SamplingParams
from hf_turbo.engine.distributed import local_kv_layout, model_tp_size
from hf_turbo.eval.exactness import explain_divergence
from hf_turbo.serve.launch import free_port
from hf_turbo.testing.tiny import tiny_model

ARCHS = ("llama", "qwen3", "mixtral")
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _tp_worker as worker  # noqa: E402


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """Save the tiny models, run the worker under torchrun once (hung ranks fail it by the timeout)."""
    root = tmp_path_factory.mktemp("tp")
    paths = []
    for arch in ARCHS:
        path = root / arch
        tiny_model(arch).save_pretrained(path)
        paths.append(str(path))
    out = root / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(HERE / "_tp_worker.py"), str(out), *paths]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    # on failure: every rank's own lines (a rank that aborts may print its reason long before the tail) and the tail
    ranks = "\n".join(line for line in proc.stderr.splitlines() if line.lstrip().startswith("[rank"))
    assert proc.returncode == 0, f"{ranks[-8000:]}\n...\n{proc.stderr[-4000:]}"
    return root, out


def _load(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def _single_process(path: Path, params, prompts_of=worker.prompts) -> tuple:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = Engine(model, None)
    prompts = prompts_of(model.config.vocab_size)
    return model, prompts, [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("arch", ARCHS)
def test_tp_greedy_matches_single_process_engine(tp_run, arch):
    root, out = tp_run
    got = _load(out, f"{arch}.json")
    model, prompts, ref = _single_process(root / arch, SamplingParams(max_new_tokens=worker.NEW))
    exact = sum(a == b for a, b in zip(got["greedy"], ref))
    print(f"{arch}: TP greedy equals the single-process Engine on {exact}/{len(ref)} prompts")
    for prompt, a, b in zip(prompts, ref, got["greedy"]):
        d = explain_divergence(model, prompt, a, b)
        assert d is None or d.near_tie, f"{arch}: TP diverges from one process at {d} (not a near-tie)"
    # the runs that were aborted, interrupted or streamed give the same tokens as the plain run
    assert got["after_abort"] == [got["greedy"][0], got["greedy"][2]]
    assert got["last"] == got["greedy"][-1]
    assert got["async"] == got["greedy"][2]
    assert got["interrupted"] is True


@pytest.mark.parametrize("arch", ARCHS)
def test_tp_seeded_sampling_matches_single_process_and_both_ranks(tp_run, arch):
    root, out = tp_run
    got = _load(out, f"{arch}.json")
    seeded = [SamplingParams(max_new_tokens=worker.NEW, temperature=0.9, top_k=20, seed=100 + i) for i in range(6)]
    _, _, ref = _single_process(root / arch, seeded)
    assert got["seeded"] == ref
    _, _, ref_n2 = _single_process(root / arch, worker.N2, worker.fresh_prompts)
    assert got["n2"] == ref_n2 and got["n2_copies"] > 0  # n = 2 under copy-on-write, replayed by the follower
    follower = _load(out, f"{arch}.rank1.json")
    # rank 1 sampled every row itself (seeded, unseeded with rank 0's broadcast seeds, greedy) and got rank 0's tokens
    assert follower["tokens_checked"] >= 3 * 6 * worker.NEW
    assert follower["tokens_mismatched"] == 0
    assert follower["failed_steps"] == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_tp_pools_hold_this_ranks_kv_heads(tp_run, arch):
    _, out = tp_run
    for rank in (0, 1):
        info = _load(out, f"{arch}.rank{rank}.json")
        assert info["pool_heads"] == info["pool_heads_after"] == 1  # 2 KV heads over 2 ranks, never reallocated
    assert _load(out, f"{arch}.rank0.json")["num_blocks"] == _load(out, f"{arch}.rank1.json")["num_blocks"]


@pytest.mark.parametrize("arch", ARCHS)
def test_tp_ngram_speculation_decided_on_rank_0(tp_run, arch):
    _, out = tp_run
    driver, follower = _load(out, f"{arch}.rank0.json"), _load(out, f"{arch}.rank1.json")
    assert driver["spec_equal"] is True  # speculative greedy under TP == plain greedy under TP
    assert driver["spec_proposed"]["spec_proposed"] > 0  # proposals were verified through the followers too
    assert follower["spec_follower"]["tokens_mismatched"] == 0 and follower["spec_follower"]["steps"] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_tp_same_calls_on_every_rank_return_rank_0s_outputs(tp_run, arch):
    _, out = tp_run
    greedy = _load(out, f"{arch}.json")["greedy"]
    for rank in (0, 1):
        info = _load(out, f"{arch}.rank{rank}.json")
        assert info["symmetric"] == greedy  # Engine.generate on both ranks
        assert info["generate"] == [greedy[2], greedy[2]]  # accelerate()d model.generate() on both ranks


def test_tp_follower_engine_refuses_its_own_steps(tp_run):
    _, out = tp_run
    assert "follows rank 0" in _load(out, "llama.rank1.json")["refused"]


def test_local_kv_layout_without_tensor_parallelism():
    model = tiny_model("llama")
    assert model_tp_size(model) == 1
    assert local_kv_layout(model) == (2, 2, 16)
    sharded = SimpleNamespace(config=model.config, tp_size=2)  # claims to be sharded, but no process group exists
    with pytest.raises(ValueError, match="tp_size 2"):
        local_kv_layout(sharded)
