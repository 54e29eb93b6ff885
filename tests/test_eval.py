"""hf-turbo eval: prompt sets, the turbo_equivalence metric, the runner's verdicts, planted bugs, CLI errors."""

from __future__ import annotations

import json

import pytest

from hf_turbo.cli import main as cli_main
from hf_turbo.eval import METRIC_PATH, EvalOptions, run_eval
from hf_turbo.eval.prompts import build_prompt_dataset, encode_prompts, load_prompt_file

SMALL = {"num_prompts": 3, "max_new_tokens": 6, "progress": False}


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def _rows(results: dict, **match) -> list[dict]:
    return [r for r in results["rows"] if all(r[k] == v for k, v in match.items())]


# -- prompt sets --------------------------------------------------------------------------------------
def test_builtin_prompt_set_is_deterministic_cached_and_mixed(tmp_path):
    import datasets
    from transformers import AutoTokenizer

    from hf_turbo.testing import fixture_path

    ds = build_prompt_dataset(10, 1024, seed=3, cache_dir=tmp_path)
    files = list(tmp_path.glob("prompts-*.jsonl"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = build_prompt_dataset(10, 1024, seed=3, cache_dir=tmp_path)
    assert files[0].stat().st_mtime_ns == mtime, "the cached file must be reused, not rewritten"
    assert ds.to_list() == again.to_list()
    assert ds.to_list() == datasets.load_dataset("json", data_files=str(files[0]), split="train").to_list()
    assert {"source", "random", "shared_prefix", "chat"} <= set(ds["kind"])
    assert len(ds) == 10
    for row in ds:
        assert bool(row["prompt"]) != bool(row["input_ids"])
    assert all(3 <= t < 1024 for row in ds if row["kind"] == "random" for t in row["input_ids"])
    assert all(row["prompt"].startswith("<|") and row["prompt"].endswith("<|assistant|>\n")
               for row in ds if row["kind"] == "chat")
    tok = AutoTokenizer.from_pretrained(fixture_path("target"))
    ids = encode_prompts(ds, tok, 1024, 160)
    family = [p for p, k in zip(ids, ds["kind"]) if k == "shared_prefix"][:2]
    common = next(i for i, (a, b) in enumerate(zip(*family)) if a != b)
    assert common >= 16, "a shared-prefix family must share at least one full KV block"
    assert build_prompt_dataset(10, 1024, seed=4, cache_dir=tmp_path).to_list() != ds.to_list()


def test_prompt_files(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "def f():\\n"}\n\n{"input_ids": [5, 6, 7], "id": "mine"}\n')
    ds = load_prompt_file(good)
    assert ds["id"] == ["line-1", "mine"] and ds["input_ids"][1] == [5, 6, 7]
    txt = tmp_path / "p.txt"
    txt.write_text("import os\n\nclass A:\n")
    assert load_prompt_file(txt)["prompt"] == ["import os", "class A:"]
    for body, line, why in [('{"prompt": "a"}\n{"prompt": 3}\n', 2, "non-empty string"),
                            ('{"prompt": "a"}\n\n{"prompt": "b"\n', 3, "not valid JSON"),
                            ('{"text": "a"}\n', 1, "exactly one of"),
                            ('{"input_ids": [1, -2]}\n', 1, "non-negative"),
                            ('["a"]\n', 1, "JSON object")]:
        good.write_text(body)
        with pytest.raises(ValueError, match=f"line {line}: .*{why}"):
            load_prompt_file(good)
    (tmp_path / "p.csv").write_text("x\n")
    with pytest.raises(ValueError, match=r"\.jsonl or \.txt"):
        load_prompt_file(tmp_path / "p.csv")
    with pytest.raises(ValueError, match="does not exist"):
        load_prompt_file(tmp_path / "missing.jsonl")


# -- the metric -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["package", "repo"])
def test_metric_loads_offline_and_computes_hand_made_example(where, monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    path = METRIC_PATH if where == "package" else "eval/metrics/turbo_equivalence"
    if where == "repo":
        import pathlib

        repo = pathlib.Path(__file__).resolve().parents[1]
        if not (repo / path).is_dir():
            pytest.skip("not a source checkout")
        path = str(repo / path)
    metric = evaluate.load(path, keep_in_memory=True)
    stock = [[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8], [9, 9]]
    turbo = [[1, 2, 3, 4], [1, 2, 7, 7], [5, 1, 7, 8], [9, 9, 9]]
    # stock's ranking per step: ids best first, and top score minus each score
    ids = [[[t, 0, 0] for t in s] for s in stock]
    gaps = [[[0.0, 1.0, 2.0] for _ in s] for s in stock]
    ids[1][2] = [3, 7, 0]
    gaps[1][2] = [0.0, 5e-5, 1.0]  # a genuine near-tie, turbo took stock's second choice
    ids[2][1] = [6, 9, 1]
    gaps[2][1] = [0.0, 5e-5, 5e-5]  # three-way tie: turbo took the third, equally scored
    out = metric.compute(predictions=turbo, references=stock, topk_ids=ids, topk_gaps=gaps)
    assert out["exact_match"] == 0.25
    assert out["token_match"] == pytest.approx((4 + 2 + 1 + 2) / 14)
    assert out["first_divergence"] == [-1, 2, 1, 2]
    assert (out["num_divergences"], out["num_near_ties"], out["num_unexplained"]) == (3, 2, 1)
    assert not out["all_explained"]
    d1, d2, d3 = out["divergences"]
    assert (d1["row"], d1["position"], d1["stock_token"], d1["turbo_token"]) == (1, 2, 3, 7)
    assert d1["top2_gap"] == 5e-5 and d1["turbo_is_second_choice"] and d1["near_tie"]
    assert d2["turbo_is_second_choice"] is False and d2["turbo_token_gap"] == 5e-5 and d2["near_tie"]
    assert (d3["stock_token"], d3["turbo_token"], d3["near_tie"]) == (-1, 9, False)  # stock had stopped
    strict = metric.compute(predictions=turbo, references=stock, topk_ids=ids, topk_gaps=gaps,
                            near_tie_threshold=1e-5)
    assert strict["num_near_ties"] == 0
    bare = metric.compute(predictions=turbo, references=stock)
    assert bare["num_near_ties"] == 0 and bare["divergences"][0]["top2_gap"] is None
    tf = evaluate.load(path, "teacher_forced", keep_in_memory=True)
    res = tf.compute(predictions=[[-1.0, -2.5], [-0.5]], references=[[-1.0, -2.0], [-0.75]])
    assert res == {"num_tokens": 3, "max_abs_diff": 0.5, "mean_abs_diff": pytest.approx(0.25)}


# -- the runner -----------------------------------------------------------------------------------------
def test_small_eval_passes_on_every_axis(cache):
    """Every axis, both dtypes, the fixture and one tiny architecture: the contract holds."""
    results = run_eval(EvalOptions(archs=("fixture", "qwen2"), cache_dir=cache, **SMALL))
    bad = [(r["model"], r["dtype"], r["axis"], r["mode"], r["error"] or r["divergences"])
           for r in results["rows"] if r["status"] in ("FAIL", "ERROR")]
    assert results["passed"], bad
    for model in ("fixture", "qwen2"):
        axes = {r["axis"] for r in _rows(results, model=model, dtype="float32", mode="greedy")}
        assert axes == {"generate", "engine", "async", "chunked", "preemption", "prefix_cold", "prefix_warm",
                        "spec_draft", "spec_ngram"}
        fp32 = _rows(results, model=model, dtype="float32")
        assert all(r["status"] in ("PASS", "REF", "SKIP") for r in fp32)
        assert all(r["exact_match"] == 1.0 for r in fp32 if r["status"] == "PASS" and r["mode"] != "forward")
        (tf,) = _rows(results, model=model, dtype="float32", axis="teacher_forced")
        assert tf["status"] == "PASS" and tf["stats"]["max_abs_diff"] < 1e-3
        (pre,) = _rows(results, model=model, dtype="float32", axis="preemption", mode="greedy")
        assert pre["stats"]["preemptions"] > 0
    sampled = _rows(results, dtype="float32", mode="sampled")
    assert {r["status"] for r in sampled} <= {"PASS", "REF", "SKIP"} and len(sampled) >= 8


def test_planted_chunking_bug_is_caught_on_the_right_axis(cache, monkeypatch):
    """An off-by-one in the query positions of a continued prefill chunk: only chunked prefill breaks."""
    from hf_turbo.backends import torch_kernels as reference

    attend = reference._attend

    def off_by_one(q, k, v, q_pos0, k_pos0, **kw):
        if q_pos0 > 0 and q.shape[0] > 1:  # a chunk after the first: its queries see one key too far
            q_pos0 += 1
        return attend(q, k, v, q_pos0, k_pos0, **kw)

    monkeypatch.setattr(reference, "_attend", off_by_one)
    opts = EvalOptions(archs=("llama",), axes=("engine", "chunked"), dtypes=("float32",), cache_dir=cache,
                       num_prompts=4, max_new_tokens=6, progress=False)
    results = run_eval(opts)
    assert not results["passed"]
    (engine,) = _rows(results, axis="engine", mode="greedy")
    (chunked,) = _rows(results, axis="chunked", mode="greedy")
    assert engine["status"] == "PASS", engine["divergences"]
    assert chunked["status"] == "FAIL" and chunked["num_unexplained"] > 0
    assert results["divergences"] and all(d["axis"] == "chunked" for d in results["divergences"])
    for d in chunked["divergences"]:
        assert 0 <= d["position"] < 6 and d["near_tie"] is False and d["top2_gap"] is not None
        assert chunked["first_divergence"][d["row"]] == d["position"]


@pytest.mark.cpu_backend
def test_planted_softmax_scale_bug_fails_every_axis_after_the_first_token(cache, monkeypatch):
    """A wrong scale in decode attention: every axis diverges, never at position 0 (prefill is right)."""
    from hf_turbo.backends import cpu as cpu_backend
    from hf_turbo.backends.cpu import ext as cpu_ops

    original = cpu_backend.sequence_attention_ref

    def wrong_decode_scale(q, q_starts, context_lens, keys, values, *, scale, **kw):
        decode_only = q.shape[0] == len(context_lens)  # every sequence has one new token
        return original(q, q_starts, context_lens, keys, values, scale=scale * (1.5 if decode_only else 1.0), **kw)

    monkeypatch.setattr(cpu_backend, "sequence_attention_ref", wrong_decode_scale)
    # decode rows go through the batched CPU kernel where it is available: the same bug there
    real_ext = cpu_ops.decode_attention()
    if real_ext is not None:
        wrong = lambda q, k, v, rows, slots, lens, scale, out: real_ext(q, k, v, rows, slots, lens, scale * 1.5, out)  # noqa: E731
        monkeypatch.setattr(cpu_ops, "decode_attention", lambda: wrong)
    opts = EvalOptions(archs=("llama",), axes=("generate", "engine"), dtypes=("float32",), cache_dir=cache,
                       num_prompts=3, max_new_tokens=8, progress=False)
    results = run_eval(opts)
    assert not results["passed"]
    for axis in ("generate", "engine"):
        (row,) = _rows(results, axis=axis, mode="greedy")
        assert row["status"] == "FAIL" and row["num_unexplained"] > 0
        assert all(d["position"] >= 1 for d in row["divergences"])


@pytest.mark.parametrize("bug", ["raises", "leaks"])
def test_an_axis_that_raises_or_leaks_fails_the_contract(bug, cache, monkeypatch, capsys):
    from hf_turbo.engine.scheduler import Scheduler
    from hf_turbo.eval.axes import CHUNK_TOKENS

    if bug == "raises":
        def preempt(self, victim, out):
            raise RuntimeError("preemption exploded")

        monkeypatch.setattr(Scheduler, "_preempt", preempt)
        axis, want = "preemption", "RuntimeError: preemption exploded"
    else:
        finish = Scheduler.finish

        def leaky_finish(self, req, *args, **kwargs):
            finish(self, req, *args, **kwargs)
            if self.max_num_batched_tokens == CHUNK_TOKENS and self.pool.num_free:
                self.pool.allocate(1)  # the chunked axis's engine loses a block per finished request

        monkeypatch.setattr(Scheduler, "finish", leaky_finish)
        axis, want = "chunked", "KV blocks leaked"
    code = cli_main(["eval", "--arch", "llama", "--axes", f"engine,{axis}", "--dtypes", "fp32", "--num-prompts",
                     "4", "--max-new-tokens", "4", "--cache-dir", cache, "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert want in out and f"contract FAILED on 1 row(s): llama float32 {axis}/greedy" in out
    (engine_line,) = [line.split() for line in out.splitlines() if line.split()[:3] == ["llama", "float32", "engine"]]
    assert "PASS" in engine_line


def test_speculative_axes_report_skipped_when_not_built(cache, monkeypatch):
    import hf_turbo.config
    import hf_turbo.engine.spec

    monkeypatch.delattr(hf_turbo.config, "SpeculativeConfig", raising=False)
    monkeypatch.delattr(hf_turbo.engine.spec, "SpeculativeConfig", raising=False)
    results = run_eval(EvalOptions(archs=("fixture",), axes=("speculative",), dtypes=("float32",), cache_dir=cache,
                                   num_prompts=2, max_new_tokens=3, progress=False))
    rows = _rows(results, mode="greedy")
    assert [r["axis"] for r in rows] == ["spec_draft", "spec_ngram"]
    assert all(r["status"] == "SKIP" and r["note"].startswith("skipped: not available") for r in rows)
    assert results["passed"]


def test_options():
    from hf_turbo.testing import TINY_ARCHS

    opts = EvalOptions(archs="fixture,all", dtypes="bf16,fp32,bfloat16", axes="engine,prefix_cache")
    assert opts.archs == ("fixture", *TINY_ARCHS) and opts.dtypes == ("bfloat16", "float32")
    quick = EvalOptions.quick()
    assert quick.archs == ("fixture", "gpt2", "gemma2", "qwen3") and quick.num_prompts == 6
    for kw, msg in [({"dtypes": "fp8"}, "dtype must be one of"), ({"max_new_tokens": 0}, "max_new_tokens"),
                    ({"axes": ""}, "unknown axis"), ({"archs": ()}, "nothing to evaluate"), ({"seed": -1}, "seed")]:
        with pytest.raises(ValueError, match=msg):
            EvalOptions(**kw)


def test_eval_writes_report_json_and_plot(cache, tmp_path):
    out = tmp_path / "out"
    code = cli_main(["eval", "--arch", "fixture", "--axes", "engine,chunked,teacher_forced", "--dtypes", "fp32",
                     "--num-prompts", "2", "--max-new-tokens", "4", "--cache-dir", cache, "--out", str(out),
                     "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["passed"] and {r["axis"] for r in results["rows"]} == {"engine", "chunked", "teacher_forced"}
    report = (out / "report.md").read_text()
    assert "exactness contract" in report and "| fixture | float32 | chunked | greedy |" in report
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_user_model_dir_and_prompt_file(cache, tmp_path, capsys):
    from transformers import AutoTokenizer

    from hf_turbo.testing import fixture_path, tiny_model

    model_dir = tmp_path / "my-model"
    tok = AutoTokenizer.from_pretrained(fixture_path("target"))
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def add(a, b):\\n"}\n{"input_ids": [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]}\n')
    code = cli_main(["eval", "--model", str(model_dir), "--prompts", str(prompts), "--axes",
                     "engine,chunked,speculative,sampling", "--dtypes", "fp32", "--max-new-tokens", "5",
                     "--cache-dir", cache, "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "\nmy-model " in out and "\nfixture " not in out
    assert "skipped: no draft model" in out  # spec_draft without --draft-model
    assert "contract holds" in out


@pytest.mark.parametrize("case", ["missing", "t5", "bad_prompts", "bad_arch", "bad_axis"])
def test_bad_inputs_exit_2_with_a_clear_message(case, tmp_path, capsys):
    args = ["eval", "--dtypes", "fp32", "--no-progress", "--cache-dir", str(tmp_path / "c")]
    if case == "missing":
        args += ["--model", str(tmp_path / "nope")]
        want = "nope' does not exist"
    elif case == "t5":
        from transformers import T5Config

        T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=64).save_pretrained(tmp_path / "t5")
        args += ["--model", str(tmp_path / "t5")]
        want = "encoder-decoder"
    elif case == "bad_prompts":
        p = tmp_path / "p.jsonl"
        p.write_text('{"prompt": "ok"}\n{"prompt": "also ok"}\n{"prompt": \n')
        args += ["--prompts", str(p)]
        want = "line 3: not valid JSON"
    elif case == "bad_arch":
        args += ["--arch", "fixture,t5"]
        want = "'t5' is an encoder-decoder"
    else:
        args += ["--axes", "engine,warp_drive"]
        want = "unknown axis 'warp_drive'"
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert want in err and "Traceback" not in err


def test_quick_eval_cli_passes(tmp_path, capsys):
    """``hf-turbo eval --quick`` (run in CI on purpose): the fixture and three architectures, every axis,
    fp32 and bf16."""
    code = cli_main(["eval", "--quick", "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    for model in ("fixture", "gpt2", "gemma2", "qwen3"):
        assert f"\n{model} " in out


def test_kv_quant_rows_are_informational_and_measure_the_8bit_cache(cache):
    opts = EvalOptions(archs=("llama",), axes=("engine", "kv_quant"), dtypes=("float32",), cache_dir=cache,
                       num_prompts=3, max_new_tokens=6, progress=False)
    results = run_eval(opts)
    assert results["passed"]
    rows = _rows(results, axis="kv_quant")
    assert [r["mode"] for r in rows] == ["int8", "fp8_e4m3", "fp8_e5m2"]
    for r in rows:
        assert r["status"] == "INFO" and r["error"] is None and r["num_sequences"] == 3
        assert 0.0 <= r["exact_match"] <= 1.0 and 0.0 <= r["token_match"] <= 1.0
        s = r["stats"]
        assert s["num_tokens"] > 0 and 0.0 < s["mean_abs_dlogp"] <= s["max_abs_dlogp"]
    # fewer bits, larger deltas: e5m2 (2 mantissa bits) moves the log-likelihoods more than int8
    assert rows[2]["stats"]["mean_abs_dlogp"] > rows[0]["stats"]["mean_abs_dlogp"]
