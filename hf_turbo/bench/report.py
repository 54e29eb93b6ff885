"""Turning measured runs into the stdout table, the JSON document and the bar plot.

A record is one (workload, path) row as a JSON-ready dict. ``add_derived`` fills in the numbers that
need the whole table: the ratio to the baseline path of the same workload, the estimated FLOP/s
and its fraction of the measured matmul ceiling.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

__all__ = ["FLOP_NOTE", "add_derived", "format_table", "plot", "write_json"]

logger = logging.getLogger(__name__)

FLOP_NOTE = (
    "achieved FLOP/s ~= 2 * n_params * tokens_processed / seconds, n_params without the input embedding; "
    "tokens_processed = prompt tokens (padding included for hf_padded) + every decoded token. It ignores "
    "attention-score FLOPs and counts the LM head for prompt positions HF skips, so it is a rough estimate."
)


def add_derived(
    records: list[dict[str, Any]], baseline: str | None, ceiling_gflops: float, n_params: int
) -> None:
    """Set ``ratio_vs_baseline``, ``achieved_gflops`` and ``pct_compute_ceiling`` on each ok record."""
    base_tps = {
        r["workload"]: r["tokens_per_s"] for r in records if r["path"] == baseline and r["status"] == "ok"
    }
    for r in records:
        r.setdefault("ratio_vs_baseline", None)
        r.setdefault("achieved_gflops", None)
        r.setdefault("pct_compute_ceiling", None)
        if r["status"] != "ok":
            continue
        if base_tps.get(r["workload"]):
            r["ratio_vs_baseline"] = r["tokens_per_s"] / base_tps[r["workload"]]
        if r["seconds"] > 0:
            r["achieved_gflops"] = 2 * n_params * r["tokens_processed"] / r["seconds"] / 1e9
            r["pct_compute_ceiling"] = 100 * r["achieved_gflops"] / ceiling_gflops


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(share: float | None) -> float | None:
    return None if share is None else 100 * share


def format_table(records: list[dict[str, Any]], baseline: str | None) -> str:
    """Fixed-width table, one line per record; unavailable/failed paths show their reason."""
    header = (
        f"{'workload':<8} {'path':<16} {'reqs':>5} {'gen tok':>8} {'seconds':>9} {'tok/s':>10} "
        f"{'x ' + (baseline or 'base'):>16} {'% compute':>9} {'sampler %':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in records:
        head = f"{r['workload']:<8} {r['path']:<16} {r['n_requests']:>5} "
        if r["status"] != "ok":
            lines.append(head + f"{r['status']}: {r['reason']}")
            continue
        flag = "" if r["tokens_consistent"] else "  TOKEN COUNT MISMATCH"
        lines.append(
            head
            + f"{r['generated_tokens']:>8} {r['seconds']:>9.3f} {r['tokens_per_s']:>10.1f} "
            + f"{_fmt(r['ratio_vs_baseline'], '.2f'):>16} {_fmt(r['pct_compute_ceiling'], '.2f'):>9}"
            + f" {_fmt(_pct((r.get('extra') or {}).get('sampler_share')), '.1f'):>9}"
            + flag
        )
    return "\n".join(lines)


def write_json(doc: dict[str, Any], target: str) -> None:
    """Write ``doc`` to the file ``target``, or to stdout when ``target`` is ``"-"``."""
    text = json.dumps(doc, indent=2, sort_keys=False)
    if target == "-":
        out: TextIO = sys.stdout
        out.write(text + "\n")
        out.flush()
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    logger.info("wrote %s", path)


def plot(records: list[dict[str, Any]], target: str, title: str) -> None:
    """Grouped bars of tokens/s (log scale): one group per workload, one bar per path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in records))
    paths = list(dict.fromkeys(r["path"] for r in records))
    tps = {(r["workload"], r["path"]): r["tokens_per_s"] for r in records if r["status"] == "ok"}
    width = 0.8 / max(len(paths), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(workloads) * max(len(paths), 1) * 0.6), 4.5))
    for j, path in enumerate(paths):
        xs = [i + (j - (len(paths) - 1) / 2) * width for i in range(len(workloads))]
        ys = [tps.get((w, path), 0.0) for w in workloads]
        bars = ax.bar(xs, ys, width, label=path)
        for bar, y in zip(bars, ys, strict=True):
            label = f"{y:.0f}" if y > 0 else "n/a"
            ax.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, max(y, 1e-9)),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("generated tokens / s")
    if any(v > 0 for v in tps.values()):
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    logger.info("wrote %s", path)
