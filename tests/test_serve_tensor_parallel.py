"""``hf-turbo serve --tensor-parallel-size 2`` on the CPU: the command starts both ranks itself (gloo), rank 0
answers the official ``openai`` client with the single-process Engine's tokens, and the ranks stop together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hf_turbo import Engine, SamplingParams
from hf_turbo.loading import load_model_and_tokenizer
from hf_turbo.serve.launch import free_port
from hf_turbo.testing import fixture_path
from hf_turbo.testing.tiny import tiny_model

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

PROMPTS = ("def main(", "import os\n", "class Foo:")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny llama with 2 KV heads (shardable over 2 ranks) and the fixture's tokenizer."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tp_serve")
    tok = AutoTokenizer.from_pretrained(fixture_path("target"))
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_serve_tensor_parallel_answers_openai_client(model_dir):
    port = free_port()
    cmd = [sys.executable, "-m", "hf_turbo.cli", "serve", "--model", str(model_dir), "--tensor-parallel-size", "2",
           "--device", "cpu", "--dtype", "float32", "--port", str(port), "--api-key", "k3y"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the TP server did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0, timeout=60)
        got = [client.completions.create(model=str(model_dir), prompt=p, max_tokens=8, temperature=0).choices[0].text
               for p in PROMPTS]
        sampled = client.completions.create(model=str(model_dir), prompt=PROMPTS[0], max_tokens=8, temperature=0.8,
                                            seed=3).choices[0].text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)  # rank 0's server stops, closes its engine; rank 1 leaves its loop
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"the TP server did not stop within 60 s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    model, tok = load_model_and_tokenizer(str(model_dir), dtype=torch.float32, device="cpu")
    ref = Engine(model, tok).generate(list(PROMPTS), SamplingParams(max_new_tokens=8), use_tqdm=False)
    assert got == [o.text for o in ref]
    seeded = Engine(model, tok).generate(PROMPTS[0], SamplingParams(max_new_tokens=8, temperature=0.8, seed=3),
                                         use_tqdm=False)
    assert sampled == seeded[0].text
