"""``hf-turbo bench``: token accounting, ratios, ceilings, unavailable paths and bad input.

One quick run on the fixture model (W3, the three HF paths plus a stub path that is never available)
is shared by the tests that read its JSON; the rest call smaller pieces directly, with fake paths
where no model is needed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from hf_turbo import bench
from hf_turbo.bench import PATHS, BenchContext, PathUnavailable, Workload, register_path
from hf_turbo.bench.paths import hf_cb, hf_padded
from hf_turbo.testing import fixture_path

_STUB = "stub_unavailable"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def _never_available(ctx: BenchContext, workload: Workload) -> bench.PathResult:
    raise PathUnavailable("stub path: not on this machine")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench")
    register_path(_STUB, _never_available)
    try:
        paths = f"hf_sequential,hf_padded,hf_cb,{_STUB}"
        args = _args(
            "--quick", "--device", "cpu", "--threads", "1", "--workloads", "W3", "--paths", paths,
            "--json", str(out / "bench.json"), "--plot", str(out / "bench.png"),
        )  # fmt: skip
        rc = bench.run(args)
    finally:
        PATHS.pop(_STUB, None)
    return rc, json.loads((out / "bench.json").read_text()), out


def test_quick_run_succeeds_and_writes_plot(quick_run: tuple[int, dict[str, Any], Path]) -> None:
    rc, doc, out = quick_run
    assert rc == 0
    assert (out / "bench.png").stat().st_size > 0
    assert doc["config"]["baseline"] == "hf_sequential"
    assert doc["machine"]["device"] == "cpu" and doc["machine"]["torch"] == torch.__version__
    assert doc["machine"]["torch_threads"] == 1
    pairs = {(r["workload"], r["path"]) for r in doc["results"]}
    assert pairs == {("W3", p) for p in ("hf_sequential", "hf_padded", "hf_cb", _STUB)}


def test_tokens_counted_equal_generated_equal_requested(quick_run: tuple[int, dict[str, Any], Path]) -> None:
    _, doc, _ = quick_run
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert {r["path"] for r in ok} >= {"hf_sequential", "hf_padded"}
    for r in ok:
        requested = sum(doc["workloads"][r["workload"]]["output_lens"])
        assert r["counted_tokens"] == r["generated_tokens"] == r["requested_tokens"] == requested, r
        assert r["tokens_consistent"] is True
        assert r["tokens_per_s"] == pytest.approx(r["counted_tokens"] / r["seconds"])


def test_ratios_are_tps_over_baseline_tps(quick_run: tuple[int, dict[str, Any], Path]) -> None:
    _, doc, _ = quick_run
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    base = {r["workload"]: r["tokens_per_s"] for r in ok if r["path"] == "hf_sequential"}
    for r in ok:
        assert r["ratio_vs_baseline"] == pytest.approx(r["tokens_per_s"] / base[r["workload"]])
        assert 0 < r["pct_compute_ceiling"] < 100
    assert all(r["ratio_vs_baseline"] == 1.0 for r in ok if r["path"] == "hf_sequential")


def test_ceilings_positive(quick_run: tuple[int, dict[str, Any], Path]) -> None:
    _, doc, _ = quick_run
    ceilings = doc["ceilings"]
    assert ceilings["matmul_gflops"]["float32"] > 0 and math.isfinite(ceilings["matmul_gflops"]["float32"])
    assert ceilings["memcpy_gbps"] > 0


def test_unavailable_path_is_reported_not_fatal(quick_run: tuple[int, dict[str, Any], Path]) -> None:
    _, doc, _ = quick_run
    stub = [r for r in doc["results"] if r["path"] == _STUB]
    assert stub and all(r["status"] == "unavailable" and "stub path" in r["reason"] for r in stub)
    cb = [r for r in doc["results"] if r["path"] == "hf_cb"]
    # transformers' continuous batching runs on CPU with sdpa; if a version breaks it, it must say why.
    assert all(r["status"] == "ok" or (r["status"] == "unavailable" and r["reason"]) for r in cb)


def _stub_ctx(model: Any) -> BenchContext:
    tokenizer = SimpleNamespace(pad_token_id=1)
    return BenchContext(model, tokenizer, torch.device("cpu"), torch.float32, progress=False)


def test_hf_cb_unavailable_without_continuous_batching() -> None:
    workload = Workload("T", "t", ((5, 6, 7),), (2,))
    with pytest.raises(PathUnavailable, match="no continuous batching"):
        hf_cb(_stub_ctx(SimpleNamespace()), workload)


def test_hf_cb_failure_becomes_unavailable_with_reason() -> None:
    def broken(**kwargs: Any) -> Any:
        raise RuntimeError("paged cache exploded")

    model = SimpleNamespace(
        generate_batch=None,
        continuous_batching_context_manager=broken,
        config=SimpleNamespace(_attn_implementation="sdpa", pad_token_id=1, eos_token_id=0),
        generation_config=SimpleNamespace(pad_token_id=1, eos_token_id=0),
    )
    with pytest.raises(PathUnavailable, match="paged cache exploded"):
        hf_cb(_stub_ctx(model), Workload("T", "t", ((5, 6, 7),), (2,)))


def test_padded_counts_only_each_requests_own_length() -> None:
    model, tokenizer = bench.load_model(fixture_path("target"), torch.float32, torch.device("cpu"))
    ctx = BenchContext(model, tokenizer, torch.device("cpu"), torch.float32, max_batch=2, progress=False)
    workload = Workload("T", "t", ((5, 6, 7, 8), (9, 10), (11, 12, 13)), (2, 5, 3))
    result = hf_padded(ctx, workload)
    assert [len(o) for o in result.outputs] == [2, 5, 3]
    # batches [0, 1] (decode 5 each) and [2] (decode 3): wasted = 3 + 0 + 0
    assert result.wasted_tokens == 3
    assert result.extra["n_batches"] == 2
    assert result.tokens_processed == 2 * (4 + 5) + 1 * (3 + 3)


@pytest.mark.parametrize("bad", ["/nonexistent/model-dir", "{tmp}"])
def test_bad_model_path_names_the_path(bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = bad.format(tmp=tmp_path)  # an existing directory without config.json
    rc = bench.run(_args("--quick", "--device", "cpu", "--model", bad))
    assert rc == 2
    assert bad in capsys.readouterr().err


def test_bad_names_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.run(_args("--quick", "--workloads", "W9")) == 2
    assert "W9" in capsys.readouterr().err
    assert bench.run(_args("--quick", "--paths", "nope")) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(ValueError, match="without commas"):
        register_path("a,b", _never_available)


def _fake_path(seconds: list[float], lengths: list[int]) -> bench.BenchPath:
    """A path that returns ``lengths[i]`` dummy tokens for request i and the next time from ``seconds``."""
    times = iter(seconds)

    def fn(ctx: BenchContext, workload: Workload) -> bench.PathResult:
        if workload.name.endswith("-warmup"):
            return bench.PathResult([[0] * n for n in workload.output_lens], 0.0, 0)
        return bench.PathResult(
            [[0] * n for n in lengths], next(times), workload.prompt_tokens + sum(lengths)
        )

    return bench.BenchPath("fake", fn)


def test_measure_takes_median_of_repeats() -> None:
    workload = Workload("R", "r", ((5, 6, 7),), (4,), repeats=3)
    record = bench.measure_path(_stub_ctx(None), _fake_path([3.0, 1.0, 2.0], [4]), workload)
    assert record["status"] == "ok" and record["tokens_consistent"] is True
    assert record["seconds_runs"] == [3.0, 1.0, 2.0]
    assert record["seconds"] == 2.0 and record["tokens_per_s"] == 2.0


def test_round_robin_interleaves_paths_and_reports_the_fastest() -> None:
    workload = Workload("R", "r", ((5, 6, 7),), (4,))
    order: list[str] = []

    def tracked(name: str, seconds: list[float]) -> bench.BenchPath:
        inner = _fake_path(seconds, [4])

        def fn(ctx: BenchContext, w: Workload) -> bench.PathResult:
            order.append(name + ("-warmup" if w.name.endswith("-warmup") else ""))
            return inner.fn(ctx, w)

        return bench.BenchPath(name, fn)

    def broken(ctx: BenchContext, w: Workload) -> bench.PathResult:
        raise RuntimeError("boom")

    paths = [tracked("a", [3.0, 1.0, 2.0]), tracked("b", [5.0, 6.0, 4.0]), bench.BenchPath("c", broken)]
    records = bench.measure_round_robin(_stub_ctx(None), paths, workload, repeats=3)
    assert order == ["a-warmup", "b-warmup"] + ["a", "b"] * 3
    a, b, c = records
    assert a["seconds"] == 1.0 and a["seconds_runs"] == [3.0, 1.0, 2.0] and a["tokens_consistent"] is True
    assert b["seconds"] == 4.0
    assert c["status"] == "error" and "boom" in c["reason"]
    assert bench.run(_args("--quick", "--repeats", "0")) == 2


def test_measure_flags_wrong_token_counts() -> None:
    workload = Workload("R", "r", ((5, 6, 7), (8, 9)), (4, 2))
    record = bench.measure_path(_stub_ctx(None), _fake_path([1.0], [3, 2]), workload)
    assert record["tokens_consistent"] is False
    assert (record["generated_tokens"], record["requested_tokens"]) == (5, 6)


# -- shipped shapes and --sampling --------------------------------------------------------------
def test_sampling_option_parses_modes_and_names_itself_on_bad_input() -> None:
    assert bench.parse_sampling("greedy") is None
    assert bench.parse_sampling("default") == {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    assert bench.parse_sampling("0.8,0.95,50") == {"temperature": 0.8, "top_p": 0.95, "top_k": 50}
    for bad in ("0.8,0.95", "hot", "0,0.9,0", "1,1.5,0", "1,0.9,-1", "1,0.9,2.5"):
        with pytest.raises(ValueError, match="--sampling"):
            bench.parse_sampling(bad)
    assert bench.run(_args("--quick", "--sampling", "warm")) == 2
    assert bench.run(_args("--quick", "--shape", "smollm2-135m", "--model", "x")) == 2


def test_shipped_shapes_have_the_published_vocabularies() -> None:
    from hf_turbo.bench.shapes import SHAPES, shape_config

    vocab = {name: shape_config(name).vocab_size for name in SHAPES}
    assert vocab == {"smollm2-135m": 49_152, "qwen3-0.6b": 151_936, "llama3.2-1b": 128_256, "llama3.1-8b": 128_256}
    assert shape_config("qwen3-0.6b", num_layers=2).num_hidden_layers == 2
    with pytest.raises(ValueError, match="--shape"):
        shape_config("gpt5")


def test_shape_model_has_a_trained_logit_spread_and_paths_sample() -> None:
    from hf_turbo.bench.shapes import LOGIT_STD, build

    model, ids = build("smollm2-135m", torch.float32, torch.device("cpu"), num_layers=1)
    prompt = torch.tensor([ids("def main ( ) : return None if x else y")["input_ids"]])
    std = float(model(prompt).logits.std(dim=-1).mean())
    assert abs(std - LOGIT_STD) < 0.15 * LOGIT_STD
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    gen = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=2, pad_token_id=None),
                          config=SimpleNamespace(eos_token_id=2, pad_token_id=None))
    ctx = BenchContext(gen, SimpleNamespace(pad_token_id=1), torch.device("cpu"), torch.float32,
                       sampling={"temperature": 0.7, "top_p": 0.9, "top_k": 0})
    config = ctx.decode_config(5)
    assert config.do_sample and (config.temperature, config.top_p, config.top_k) == (0.7, 0.9, 0)
    assert config.min_new_tokens == config.max_new_tokens == 5
    assert not BenchContext(gen, ctx.tokenizer, ctx.device, ctx.dtype).decode_config(5).do_sample


@pytest.mark.slow
def test_shape_run_samples_and_reports_the_sampler_share(tmp_path: Path) -> None:
    """A random-weight shape with a trained logit spread, sampled by every path; the engine's sampler share."""
    args = _args("--quick", "--device", "cpu", "--threads", "1", "--workloads", "W2", "--shape", "smollm2-135m",
                 "--shape-layers", "1", "--sampling", "0.8,0.95,0", "--paths", "hf_sequential,turbo_engine",
                 "--json", str(tmp_path / "b.json"))
    assert bench.run(args) == 0
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["config"]["shape"] == "smollm2-135m" and doc["config"]["vocab_size"] == 49_152
    assert doc["config"]["sampling"] == {"temperature": 0.8, "top_p": 0.95, "top_k": 0}
    engine = next(r for r in doc["results"] if r["path"] == "turbo_engine")
    assert engine["tokens_consistent"] and engine["exact_match_vs_baseline"] is None
    assert 0 < engine["extra"]["sampler_share"] < 1
