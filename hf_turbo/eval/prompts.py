"""Prompt sets for ``hf-turbo eval``: ``datasets.Dataset``s built locally, nothing downloaded.

Every row has the columns of :data:`FEATURES`: ``id``, ``kind``, and exactly one non-empty of
``prompt`` (text, tokenized with the model's tokenizer at run time) and ``input_ids`` (token ids).
The built-in set mixes four kinds:

- ``source``: held-out Python source snippets, deterministic line slices of the standard-library
  files the fixture model never trained on (``train_fixture.split_files``);
- ``random``: random token ids of chosen lengths (:data:`RANDOM_LENGTHS`, cycled);
- ``shared_prefix``: families of prompts sharing one long source prefix (prefix-cache hits);
- ``chat``: message lists rendered with :data:`CHAT_TEMPLATE`, a minimal chat template.

The set is written as JSON lines to a cache directory (``~/.cache/hf_turbo/eval`` unless told
otherwise), read back with ``datasets.load_dataset("json", ...)``, and reused when present. A user's
own file (``.jsonl`` rows with ``"prompt"`` or ``"input_ids"``, or ``.txt`` with one prompt a line)
is validated line by line: a bad line is a ValueError naming the file and the line number.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
from pathlib import Path

import datasets

logger = logging.getLogger(__name__)

__all__ = ["FEATURES", "CHAT_TEMPLATE", "RANDOM_LENGTHS", "build_prompt_dataset", "load_prompt_file",
           "render_chat", "default_cache_dir", "encode_prompts"]

FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "kind": datasets.Value("string"),
    "prompt": datasets.Value("string"),
    "input_ids": datasets.Sequence(datasets.Value("int64")),
})
_VERSION = 1  # bump when the built-in set's construction changes (invalidates cached files)
KIND_WEIGHTS = {"source": 3, "random": 2, "shared_prefix": 3, "chat": 2}
RANDOM_LENGTHS = (5, 17, 33, 64)
FAMILY_SIZE = 3
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CHATS = [
    [{"role": "system", "content": "You write short, correct Python."},
     {"role": "user", "content": "Write a function that reverses a string."}],
    [{"role": "user", "content": "How do I read a file line by line?"}],
    [{"role": "system", "content": "Answer with code only."},
     {"role": "user", "content": "Sort a list of dicts by the key 'age'."}],
    [{"role": "user", "content": "What does `yield` do?"},
     {"role": "assistant", "content": "It makes the function a generator."},
     {"role": "user", "content": "Show an example."}],
    [{"role": "user", "content": "Parse a date like 2024-01-31 into a datetime."}],
    [{"role": "system", "content": "You are a careful reviewer."},
     {"role": "user", "content": "def add(a, b): return a - b\nWhat is wrong?"}],
]


def default_cache_dir() -> Path:
    """``$HF_TURBO_CACHE/eval``, else ``~/.cache/hf_turbo/eval``."""
    root = os.environ.get("HF_TURBO_CACHE") or Path.home() / ".cache" / "hf_turbo"
    return Path(root).expanduser() / "eval"


def render_chat(messages: list[dict], template: str = CHAT_TEMPLATE) -> str:
    """Render a message list with a chat template string (sandboxed jinja, like transformers)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


def _split_counts(n: int) -> dict[str, int]:
    """``n`` prompts over the kinds by KIND_WEIGHTS (largest remainder); shared families get >= 2."""
    total = sum(KIND_WEIGHTS.values())
    raw = {k: n * w / total for k, w in KIND_WEIGHTS.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    if counts["shared_prefix"] == 1:  # a family of one shares nothing: give it to source
        counts["shared_prefix"], counts["source"] = 0, counts["source"] + 1
    return counts


def _held_out_texts() -> list[str]:
    from hf_turbo.testing.train_fixture import read_text, split_files, stdlib_files

    texts = [read_text(p) for p in split_files(stdlib_files())[1]]
    texts = [t for t in texts if t.count("\n") >= 40]
    if not texts:
        raise ValueError("no held-out standard-library source files found to build source prompts from")
    return texts


def _snippet(rng: random.Random, texts: list[str], min_lines: int, max_lines: int, max_chars: int) -> str:
    """A slice of whole, non-blank-started lines of one held-out file, ending with a newline."""
    lines = rng.choice(texts).splitlines(keepends=True)
    k = rng.randint(min_lines, max_lines)
    start = rng.randrange(0, max(1, len(lines) - k))
    while start < len(lines) - 1 and not lines[start].strip():
        start += 1
    text = "".join(lines[start:start + k])[:max_chars]
    if not text.endswith("\n"):  # cut at the last whole line (keep a lone partial line)
        head, sep, _ = text.rpartition("\n")
        text = head + sep if sep else text + "\n"
    return text


def _build_rows(num_prompts: int, vocab_size: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    counts = _split_counts(num_prompts)
    texts = _held_out_texts() if counts["source"] or counts["shared_prefix"] else []
    rows: list[dict] = []

    def add(kind: str, prompt: str = "", ids: list[int] | None = None) -> None:
        rows.append({"id": f"{kind}-{sum(r['kind'] == kind for r in rows)}", "kind": kind, "prompt": prompt,
                     "input_ids": ids or []})

    for _ in range(counts["source"]):
        add("source", _snippet(rng, texts, 2, 10, 320))
    for i in range(counts["random"]):
        n = RANDOM_LENGTHS[i % len(RANDOM_LENGTHS)]
        add("random", ids=[rng.randrange(3, vocab_size) for _ in range(n)])
    left = counts["shared_prefix"]
    while left:
        size = FAMILY_SIZE if left != FAMILY_SIZE + 1 else 2  # never leave a family of one
        size = min(size, left)
        prefix = _snippet(rng, texts, 6, 12, 200)
        for _ in range(size):
            add("shared_prefix", prefix + _snippet(rng, texts, 1, 3, 120))
        left -= size
    for i in range(counts["chat"]):
        add("chat", render_chat(_CHATS[(i + seed) % len(_CHATS)]))
    return rows


def build_prompt_dataset(num_prompts: int, vocab_size: int, seed: int = 0,
                         cache_dir: str | Path | None = None) -> datasets.Dataset:
    """The built-in mixed prompt set (see the module docstring), cached as JSON lines.

    ``vocab_size`` bounds the random-token prompts. The cache file's name holds every input of
    the construction (and the Python version, whose stdlib the snippets come from).
    """
    if not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"num_prompts must be an integer >= 1, got {num_prompts!r}")
    if not isinstance(vocab_size, int) or vocab_size < 4:
        raise ValueError(f"vocab_size must be an integer >= 4, got {vocab_size!r}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    path = cache / f"prompts-v{_VERSION}-n{num_prompts}-vocab{vocab_size}-seed{seed}-py{py}.jsonl"
    if not path.is_file():
        rows = _build_rows(num_prompts, vocab_size, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(path)
        logger.info("wrote %d prompts to %s", len(rows), path)
    return datasets.load_dataset("json", data_files=str(path), split="train", features=FEATURES,
                                 cache_dir=str(cache / "datasets"))


def _parse_jsonl_line(path: Path, lineno: int, line: str) -> dict:
    where = f"prompts file {str(path)!r} line {lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with \"prompt\" or \"input_ids\", "
                         f"got {type(obj).__name__}")
    prompt, ids = obj.get("prompt"), obj.get("input_ids")
    if (prompt is None) == (ids is None):
        raise ValueError(f"{where}: needs exactly one of \"prompt\" (text) or \"input_ids\" (token ids), "
                         f"got keys {sorted(obj)}")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise ValueError(f"{where}: \"prompt\" must be a non-empty string, got {prompt!r}")
    if ids is not None and (not isinstance(ids, list) or not ids
                            or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids)):
        raise ValueError(f"{where}: \"input_ids\" must be a non-empty list of non-negative integers, "
                         f"got {str(ids)[:80]}")
    return {"id": str(obj.get("id", f"line-{lineno}")), "kind": "file", "prompt": prompt or "",
            "input_ids": ids or []}


def load_prompt_file(path: str | Path) -> datasets.Dataset:
    """A user's prompts: ``.jsonl`` (``{"prompt": text}`` or ``{"input_ids": [ids]}`` a line) or
    ``.txt`` (one prompt a line; blank lines skipped). ValueError naming the file and line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"prompts file {str(path)!r} does not exist")
    if p.suffix not in (".jsonl", ".txt"):
        raise ValueError(f"prompts file {str(path)!r} must end in .jsonl or .txt, got {p.suffix or 'no suffix'!r}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"prompts file {str(path)!r} is not UTF-8 text ({exc.reason})") from None
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            rows.append(_parse_jsonl_line(p, lineno, line))
        else:
            rows.append({"id": f"line-{lineno}", "kind": "file", "prompt": line, "input_ids": []})
    if not rows:
        raise ValueError(f"prompts file {str(path)!r} holds no prompts")
    return datasets.Dataset.from_list(rows, features=FEATURES)


def encode_prompts(ds: datasets.Dataset, tokenizer, vocab_size: int, max_prompt_tokens: int) -> list[list[int]]:
    """Token ids per row: text through ``tokenizer`` (first ``max_prompt_tokens`` kept), ids checked
    against ``vocab_size``. ValueError naming the row."""
    out = []
    for row in ds:
        if row["input_ids"]:
            ids = list(row["input_ids"])
        else:
            if tokenizer is None:
                raise ValueError(f"prompt {row['id']!r} is text but the model has no tokenizer")
            ids = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
        ids = ids[:max_prompt_tokens]
        if not ids:
            raise ValueError(f"prompt {row['id']!r} encodes to no tokens")
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise ValueError(f"prompt {row['id']!r} has token id {bad[0]} outside the model's vocabulary "
                             f"[0, {vocab_size})")
        out.append(ids)
    return out
