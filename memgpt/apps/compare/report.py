"""The tables and the plot of ``memgpt compare``, from the results :func:`run_compare` returns."""

from __future__ import annotations

import math
from pathlib import Path

from ..report import pyplot

__all__ = ["format_tables", "plot_results"]


def _x(x: int | str, task: str) -> str:
    if task == "passkey" and isinstance(x, int) and x >= 1024:
        return f"{x // 1024}k" if x < 1 << 20 else f"{x >> 20}M"
    return str(x)


def _val(run: dict, metric: str) -> str:
    """A run's validation score: accuracy, or bits per character from its loss in nats."""
    if run["failure"] is not None:
        return f"{run['lr']:g}: failed"
    return f"{run['lr']:g}: " + (f"{run['val_loss'] / math.log(2):.3f}" if metric == "bpc" else f"{run['val_acc']:.2f}")


def format_tables(results: dict) -> str:
    """One markdown table per task: the best learning rate's score (accuracy, or bits per
    character) at every evaluation point, the validation score of every learning rate tried,
    parameters, ms per step, peak RSS."""
    out = []
    for task, res in results["tasks"].items():
        xs = res["eval_x"]
        metric = res.get("metric", "acc")
        about = (
            f"chance {res['chance']:.3f}" if res.get("chance") is not None else "bits per character, lower is better"
        )
        out.append(f"### {task} (x = {res['x_label']}; {about})\n")
        head = ["contender", "params", "ms/step", f"val {metric} by lr", *(_x(x, task) for x in xs), "peak RSS MB"]
        out.append("| " + " | ".join(head) + " |")
        out.append("| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |")
        by_name: dict[str, list[dict]] = {}
        for run in res["runs"]:
            by_name.setdefault(run["contender"], []).append(run)
        for name, runs in by_name.items():
            best = next((r for r in runs if r["best"]), None)
            sweep = ", ".join(_val(r, metric) for r in runs)
            points = {p["x"]: p for p in res["evals"].get(name, [])}
            cells = []
            for x in xs:
                p = points.get(x)
                if p is None or p.get(metric, 0) is None:
                    cells.append("—")
                else:
                    cells.append("skip" if "skipped" in p else f"{p[metric]:.3f}")
            rss = [p["peak_rss_mb"] for p in points.values() if p.get("peak_rss_mb") is not None]
            ms = best["ms_per_step"] if best and best["ms_per_step"] else runs[0]["ms_per_step"]
            row = [name, f"{runs[0]['params']:,}", f"{ms:.0f}" if ms else "—", sweep, *cells]
            row.append(f"{max(rss):.0f}" if rss else "—")
            out.append("| " + " | ".join(row) + " |")
        for name, reason in res["unavailable"].items():
            out.append(f"| {name} | not run: {reason} |" + " |" * (len(head) - 2))
        skipped = [
            f"- {name} at {_x(p['x'], task)}: {p['skipped']}"
            for name, pts in res["evals"].items()
            for p in pts
            if "skipped" in p
        ]
        if skipped:
            out.append("\nskipped points:\n" + "\n".join(skipped))
        out.append("")
    return "\n".join(out)


def plot_results(results: dict, path: str | Path) -> bool:
    """Accuracy against distance / length (log x), one line per contender, one panel per task
    scored by accuracy; False when matplotlib is missing or no task is."""
    tasks = [(t, res) for t, res in results["tasks"].items() if res.get("metric", "acc") == "acc"]
    plt = pyplot() if tasks else None  # bits per character are a table only
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, (task, res) in zip(axes[0], tasks):
        for name, pts in res["evals"].items():
            done = [p for p in pts if "acc" in p]
            if done:
                ax.plot([p["x"] for p in done], [p["acc"] for p in done], marker="o", label=name)
        ax.axhline(res["chance"], color="grey", linestyle=":", label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(res["x_label"])
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(task)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
