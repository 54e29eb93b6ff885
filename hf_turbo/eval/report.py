"""The eval's outputs: a table for stdout, and with ``--out DIR`` results.json, report.md, eval.png."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["format_table", "format_divergences", "write_outputs", "markdown_report", "plot"]

_COLUMNS = ("model", "dtype", "axis", "mode", "seqs", "exact", "tokens", "div", "ties", "unexpl", "first div",
            "status", "note")


def _g(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _fmt_rate(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _first_divs(row: dict) -> str:
    pos = sorted(p for p in row.get("first_divergence", []) if p >= 0)
    if not pos:
        return "-"
    text = ",".join(map(str, pos[:4]))
    return text + (f",+{len(pos) - 4}" if len(pos) > 4 else "")


def _cells(row: dict) -> list[str]:
    note = row["error"] or row["note"]
    return [row["model"], row["dtype"], row["axis"], row["mode"], str(row["num_sequences"] or "-"),
            _fmt_rate(row["exact_match"]), _fmt_rate(row["token_match"]), str(row["num_divergences"]),
            str(row["num_near_ties"]), str(row["num_unexplained"]), _first_divs(row), row["status"], note]


def format_table(rows: list[dict], max_note: int = 70) -> str:
    """Plain-text table, one line per (model, dtype, axis, mode)."""
    body = [[c if i < len(_COLUMNS) - 1 else c[:max_note] for i, c in enumerate(_cells(r))] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(_COLUMNS)]
    line = "  ".join(h.ljust(w) for h, w in zip(_COLUMNS, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(out)


def format_divergences(divs: list[dict]) -> str:
    """One line per divergence: where, which tokens, stock's gap, near-tie or not."""
    lines = []
    for d in divs:
        second = {True: "yes", False: "no", None: "n/a"}[d["turbo_is_second_choice"]]
        lines.append(f"{d['model']} {d['dtype']} {d['axis']}/{d['mode']} prompt {d['prompt_id']} "
                     f"({d['prompt_kind']}): position {d['position']}, stock {d['stock_token']} vs turbo "
                     f"{d['turbo_token']}, top-2 gap {_g(d['top2_gap'])}, turbo = stock's 2nd choice: {second}, "
                     f"turbo token's gap {_g(d['turbo_token_gap'])} -> "
                     f"{'near-tie' if d['near_tie'] else 'NOT a near-tie'}")
    return "\n".join(lines)


def markdown_report(results: dict, command: str | None = None) -> str:
    rows = results["rows"]
    verdict = "**PASSED**" if results["passed"] else "**FAILED**"
    md = ["# hf_turbo eval report", "", f"Verdict: {verdict} ({results['seconds']} s).", ""]
    if command:
        md += ["Command:", "", f"    {command}", ""]
    v = results["versions"]
    md += [f"Versions: hf_turbo {v['hf_turbo']}, torch {v['torch']}, transformers {v['transformers']}, "
           f"python {v['python']}, device {v['device']}.", "", "## The contract", "", results["contract"], "",
           "## Results", "", "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rows]
    md += ["", "`exact`: fraction of sequences identical to the reference (stock generate() for greedy runs, "
           "the Engine batch's sampled output for sampled runs); `tokens`: fraction of reference tokens "
           "produced before the first divergence; `div`/`ties`/`unexpl`: divergences, of them near-ties, "
           "and the rest.", "", "## Every divergence", ""]
    divs = results["divergences"]
    md += ["None." if not divs else "| model | dtype | axis | mode | prompt | kind | position | stock | turbo | "
           "top-2 gap | 2nd choice | turbo token's gap | near-tie |"]
    if divs:
        md.append("|" + "---|" * 13)
        for d in divs:
            md.append(f"| {d['model']} | {d['dtype']} | {d['axis']} | {d['mode']} | {d['prompt_id']} | "
                      f"{d['prompt_kind']} | {d['position']} | {d['stock_token']} | {d['turbo_token']} | "
                      f"{_g(d['top2_gap'])} | {d['turbo_is_second_choice']} | {_g(d['turbo_token_gap'])} | "
                      f"{'yes' if d['near_tie'] else '**no**'} |")
    return "\n".join(md) + "\n"


def plot(results: dict, path: str | Path) -> None:
    """Exact-match rate per axis and dtype (greedy and sampled), and a histogram of divergence positions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in results["rows"] if r["exact_match"] is not None]
    labels = list(dict.fromkeys(f"{r['axis']}/{r['mode']}" for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / max(1, len(dtypes))
    for j, dtype in enumerate(dtypes):
        rates = []
        for label in labels:
            sel = [r for r in rows if f"{r['axis']}/{r['mode']}" == label and r["dtype"] == dtype]
            seqs = sum(r["num_sequences"] for r in sel)
            rates.append(sum(r["exact_match"] * r["num_sequences"] for r in sel) / seqs if seqs else 0.0)
        ax1.bar([i + j * width for i in range(len(labels))], rates, width, label=dtype, color=f"C{j}")
    ax1.set_xticks([i + width * (len(dtypes) - 1) / 2 for i in range(len(labels))], labels, rotation=45,
                   ha="right", fontsize=8)
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("sequences identical to the reference")
    ax1.set_title("exact-match rate per axis and dtype")
    ax1.legend(fontsize=8)
    divs = results["divergences"]
    if divs:
        top = max(d["position"] for d in divs)
        for j, dtype in enumerate(dtypes):
            pos = [d["position"] for d in divs if d["dtype"] == dtype]
            if pos:  # one bar per token index
                ax2.hist(pos, bins=[b - 0.5 for b in range(top + 2)], alpha=0.6, label=dtype, color=f"C{j}")
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no divergences", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_xlabel("first divergence position (generated token index)")
    ax2.set_ylabel("sequences")
    ax2.set_title("where sequences diverge")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict, out_dir: str | Path, command: str | None = None) -> list[Path]:
    """results.json, report.md and eval.png under ``out_dir`` (created); returns the paths."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "report.md", out / "eval.png"]
    paths[0].write_text(json.dumps(dict(results, command=command), indent=1) + "\n", encoding="utf-8")
    paths[1].write_text(markdown_report(results, command), encoding="utf-8")
    plot(results, paths[2])
    logger.info("wrote %s", ", ".join(map(str, paths)))
    return paths
