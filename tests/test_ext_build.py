"""The extension build never hangs a process: keyed by content, guarded by an OS lock that a killed
builder releases, built in a private directory and moved into place atomically."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

from hf_turbo.backends.cpu import build as ext_build


def _source(tmp_path: Path, text: str = "int f() { return 1; }") -> Path:
    src = tmp_path / "op.cpp"
    src.write_text(text)
    return src


def test_build_key_follows_sources_and_flags(tmp_path):
    src = _source(tmp_path)
    key = ext_build.build_key([src], ["-O2"], [])
    assert key == ext_build.build_key([src], ["-O2"], [])
    assert key != ext_build.build_key([src], ["-O3"], [])
    assert key != ext_build.build_key([src], ["-O2"], ["-fopenmp"])
    src.write_text("int f() { return 2; }")
    assert key != ext_build.build_key([src], ["-O2"], [])


def _fake_load(calls: list):
    def load(name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        calls.append(build_directory)
        Path(build_directory, f"{name}.so").write_bytes(b"not really a library")
        return f"module {name}"
    return load


def test_built_once_then_imported_from_its_path(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(cpp_extension, "load", _fake_load(calls))
    imported = []
    monkeypatch.setattr(ext_build, "_import", lambda name, path: imported.append(path) or f"imported {name}")
    src = _source(tmp_path)
    first = ext_build.load_cached("op", [src], ["-O2"], base=tmp_path / "ext")
    key = ext_build.build_key([src], ["-O2"], [])
    final = tmp_path / "ext" / f"op_{key}"
    assert first == f"module op_{key}" and len(calls) == 1
    assert Path(calls[0]).parent == final and not Path(calls[0]).exists()  # private build dir, removed
    assert (final / f"op_{key}.so").exists()
    assert ext_build.load_cached("op", [src], ["-O2"], base=tmp_path / "ext") == f"imported op_{key}"
    assert len(calls) == 1 and imported == [final / f"op_{key}.so"]


def test_a_killed_builder_does_not_delay_the_next(tmp_path, monkeypatch):
    """A process dies (SIGKILL) while it holds the build lock, mid-build: the next one builds at once."""
    src = _source(tmp_path)
    base = tmp_path / "ext"
    script = textwrap.dedent(f"""
        import time, torch.utils.cpp_extension as ce
        from pathlib import Path
        from hf_turbo.backends.cpu import build as ext_build
        def slow(name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
            Path(build_directory, "lock").write_text("torch's own lock file, left behind")
            time.sleep(600)
        ce.load = slow
        ext_build.load_cached("op", [Path({str(src)!r})], ["-O2"], base=Path({str(base)!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    key = ext_build.build_key([src], ["-O2"], [])
    lock_path = base / f"op_{key}" / "build.lock"
    try:
        deadline = time.monotonic() + 60
        while True:  # until the child holds the lock and has started its build
            assert time.monotonic() < deadline and proc.poll() is None, "the builder did not start"
            if lock_path.exists() and list(lock_path.parent.glob("build-*/lock")):
                with open(lock_path) as fh:
                    try:
                        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        fcntl.flock(fh, fcntl.LOCK_UN)
                    except BlockingIOError:
                        break
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    calls: list = []
    monkeypatch.setattr(cpp_extension, "load", _fake_load(calls))
    t0 = time.monotonic()
    assert ext_build.load_cached("op", [src], ["-O2"], base=base) == f"module op_{key}"
    assert time.monotonic() - t0 < 10 and len(calls) == 1
    assert not any(p.name != Path(calls[0]).name for p in lock_path.parent.glob("build-*"))  # leftovers gone


@pytest.mark.slow
def test_real_build_killed_midway_then_an_engine_starts(tmp_path):
    """The real extension: a build killed during compilation, then a new engine is ready within one build
    time plus 10 s (clean builds in their own directories, timed before and after)."""
    code = ("import torch; from hf_turbo import Engine; from hf_turbo.testing import tiny_model; "
            "from hf_turbo.backends.cpu import ext; e = Engine(tiny_model('llama')); "
            "assert ext.decode_attention() is not None; print(e.generate([[5, 6, 7]], use_tqdm=False)[0].token_ids)")

    def run(ext_dir: Path, **kw):
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext_dir)}
        return subprocess.Popen([sys.executable, "-c", code], env=env, **kw)

    t0 = time.monotonic()
    assert run(tmp_path / "clean").wait() == 0
    build_s = time.monotonic() - t0
    victim = run(tmp_path / "shared")
    deadline = time.monotonic() + 120
    while not list((tmp_path / "shared").glob("*/build-*/*.o*")) and not list(
            (tmp_path / "shared").glob("*/build-*/build.ninja")):
        assert time.monotonic() < deadline and victim.poll() is None
        time.sleep(0.1)
    time.sleep(2)  # compiling now
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    t0 = time.monotonic()
    assert run(tmp_path / "shared").wait() == 0
    rebuild_s = time.monotonic() - t0
    t0 = time.monotonic()  # a second clean build: the box's speed may have drifted meanwhile
    assert run(tmp_path / "clean2").wait() == 0
    build_s = max(build_s, time.monotonic() - t0)
    assert rebuild_s < build_s + 10, f"rebuild after a killed build took {rebuild_s:.0f} s, a build {build_s:.0f} s"
