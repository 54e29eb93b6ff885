"""benchmarks/gpu_e2e.py runs end to end at tiny sizes on the CPU and prints one table with every path's rows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_e2e_script_on_cpu():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_e2e.py"), "--device", "cpu", "--dtype", "float32",
           "--shapes", "smollm2-135m", "--layers", "1", "--quick"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    table = [line for line in out.splitlines() if line.startswith("| smollm2-135m |")]
    runs = {(row.split("|")[2].strip().split(" (")[0], row.split("|")[3].strip()) for row in table}
    expected = {(p, r) for p in ("stock", "hf_cb", "turbo_graphs", "turbo_eager")
                for r in ("decode B=1", "decode B=2", "offline 6 req")}
    expected |= {("turbo_graphs_sync", r) for r in ("decode B=1", "decode B=2")}  # async scheduling off
    assert runs == expected, out
    for row in table:
        cells = [c.strip() for c in row.split("|")]
        assert float(cells[4].replace(",", "")) > 0, row  # a measured speed, not n/a
        if cells[3].startswith("decode"):
            assert cells[5].endswith("%"), row  # with its share of the memory roofline
