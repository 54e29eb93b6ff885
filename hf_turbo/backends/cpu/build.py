"""Build a C++ extension once per machine, and never let a dead build hang the next process.

``torch.utils.cpp_extension.load`` guards a build directory with a lock *file*: a process killed
mid-build leaves it behind, and every later process waits on it forever. Here:

* the build is keyed by a hash of the sources, the flags, torch's and Python's versions, so two
  checkouts sharing one virtualenv share one build instead of evicting each other's;
* builders take an OS lock (``fcntl.flock``) on ``<key>/build.lock``, which the kernel releases when
  the holder dies, however it dies; a process waits only while a *live* process builds;
* each build runs in a private directory (``build-<pid>``: torch's lock file there is never shared)
  and the finished library is moved into place with one atomic rename; leftovers of dead builders are
  removed by the next builder;
* a finished library is imported straight from its path, with no lock and no ninja run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["build_key", "extensions_dir", "load_cached"]

logger = logging.getLogger(__name__)


def extensions_dir() -> Path:
    """``TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions`` (torch's own default)."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "torch_extensions")
    return Path(base)


def build_key(sources: Sequence[Path], cflags: Sequence[str], ldflags: Sequence[str]) -> str:
    """12 hex digits naming one build: the sources' bytes, the flags, torch's and Python's versions."""
    digest = hashlib.sha256()
    for src in sources:
        digest.update(Path(src).read_bytes())
    for part in (*cflags, "|", *ldflags, "|", torch.__version__, sys.version, sys.platform):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:12]


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_cached(name: str, sources: Sequence[Path], cflags: Sequence[str], ldflags: Sequence[str] = (),
                base: Path | None = None):
    """The extension module ``<name>_<key>``: imported if built, else built under an OS lock (see above).

    Raises what the build raises (no compiler, no ninja); the caller decides the fallback.
    """
    import fcntl  # POSIX only, like the extension's own flags

    from torch.utils.cpp_extension import load as load_extension

    key = build_key(sources, cflags, ldflags)
    module_name = f"{name}_{key}"
    final_dir = (base or extensions_dir()) / module_name
    library = final_dir / f"{module_name}.so"
    if library.exists():
        return _import(module_name, library)
    final_dir.mkdir(parents=True, exist_ok=True)
    with open(final_dir / "build.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("hf_turbo: waiting for another process that is compiling %s", module_name)
            fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if that process dies
        if library.exists():  # the other process finished it
            return _import(module_name, library)
        for stale in final_dir.glob("build-*"):  # what builders killed midway left behind
            shutil.rmtree(stale, ignore_errors=True)
        private = final_dir / f"build-{os.getpid()}"
        private.mkdir()
        logger.warning("hf_turbo: compiling %s (once per machine, about a minute)", module_name)
        module = load_extension(name=module_name, sources=[str(s) for s in sources], extra_cflags=list(cflags),
                                extra_ldflags=list(ldflags), build_directory=str(private), verbose=False)
        built = private / f"{module_name}.so"
        if built.exists():
            os.replace(built, library)
        shutil.rmtree(private, ignore_errors=True)
        return module
