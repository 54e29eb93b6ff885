"""The command line, the fixture pair and model loading errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hf_turbo.cli import main
from hf_turbo.testing import FIXTURE_NAMES, fixture_path


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["bench", "--help"], ["eval", "--help"],
                                  ["serve", "--help"]])
def test_help_for_every_subcommand(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: hf-turbo" in out


def test_console_script_runs():
    exe = os.path.join(os.path.dirname(sys.executable), "hf-turbo")
    res = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "hf-turbo" in res.stdout


def test_demo_one_at_a_time_and_batched_identical(capsys):
    assert main(["demo", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "identical: yes; speed-up" in out
    assert "as one padded batch" in out and "through hf_turbo's Engine" in out
    assert out.count("identical: yes") == 4 + 3  # per prompt, then three summaries


def test_demo_with_missing_model_path_names_it(capsys):
    assert main(["demo", "--model", "/no/such/model-dir"]) == 2
    assert "/no/such/model-dir" in capsys.readouterr().err


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_loads_offline_and_greedy_is_deterministic(name):
    code = f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from hf_turbo.testing import fixture_path
p = fixture_path({name!r})
m = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
t = AutoTokenizer.from_pretrained(p)
ids = t("def main():\\n", return_tensors="pt")["input_ids"]
out = m.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=t.pad_token_id)
print(json.dumps(out[0].tolist()))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert a == b and len(a) > 12


def test_fixture_pair_shares_tokenizer_and_metrics_meet_targets():
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(fixture_path("target"))
    d = AutoTokenizer.from_pretrained(fixture_path("draft"))
    assert t.get_vocab() == d.get_vocab()
    metrics = json.loads((fixture_path("target").parent / "metrics.json").read_text())
    assert metrics["held_out_loss_target"] <= 3.0
    assert metrics["greedy_agreement_draft_vs_target"] >= 0.5
    size = sum(f.stat().st_size for n in FIXTURE_NAMES for f in fixture_path(n).iterdir())
    assert size <= 8 * 1024 * 1024


def test_fixture_path_and_loading_errors(tmp_path):
    from hf_turbo.loading import load_model_and_tokenizer, resolve_model_path
    from hf_turbo.testing import tiny_model

    with pytest.raises(ValueError, match="fixture name"):
        fixture_path("nope")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ValueError, match="unknown|not supported|model_type"):
        tiny_model("definitely_not_a_model")
    from transformers import T5Config

    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=32).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="encoder-decoder"):
        load_model_and_tokenizer(str(tmp_path / "t5"))
    assert torch.get_num_threads() >= 1
