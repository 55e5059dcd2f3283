"""The main demonstration: memory that remembers across segments, against a no-memory baseline.

Trains three models on the same data and budget (segmented multi-query recall):

- memory:   a MemGPT model (self-attention within 16-token segments, memory across them);
- baseline: the same architecture with its state dropped at every segment boundary;
- oracle:   full attention over the whole sequence (the ceiling);

then reports held-out accuracy by distance (segments between the pairs and the queries) and by
number of pairs, plus the ablation: the trained memory model with its memory emptied just before
the query segment. Prints a table and writes ``results.json`` and ``recall.png`` to ``--out``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..models.config import MemGPTConfig
from ..models.model import MemGPTModel
from ..tasks import RecallTask
from ..training.trainer import TrainConfig, Trainer, evaluate, resolve_device
from .report import jsonable, pyplot

__all__ = ["DemoConfig", "run_demo", "build_model"]


@dataclass
class DemoConfig:
    segment_len: int = 16
    num_keys: int = 16
    num_values: int = 16
    num_filler: int = 16
    dim: int = 64
    depth: int = 2
    heads: int = 4
    memory_heads: int = 4
    eval_distances: tuple[int, ...] = (1, 2, 4, 8)
    eval_pairs: tuple[int, ...] = (1, 2, 4, 6, 8)
    eval_pairs_distance: int = 4
    eval_batches: int = 4
    eval_batch_size: int = 128
    eval_seed: int = 1234  # held out: training draws from TrainConfig.seed
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=800, batch_size=32, lr=3e-3, num_pairs=(1, 2, 3, 4, 5, 6, 7, 8))
    )

    @property
    def max_distance(self) -> int:
        return max(max(self.train.distances), max(self.eval_distances), self.eval_pairs_distance)

    def task(self, distance: int, num_pairs: int) -> RecallTask:
        return RecallTask(
            num_pairs=num_pairs,
            num_keys=self.num_keys,
            num_values=self.num_values,
            num_filler=self.num_filler,
            segment_len=self.segment_len,
            distance=distance,
        )


def build_model(kind: str, demo: DemoConfig, vocab_size: int) -> MemGPTModel:
    """The memory and baseline models are identical; the oracle's one segment spans everything."""
    span = (demo.max_distance + 1) * demo.segment_len
    config = MemGPTConfig(
        vocab_size=vocab_size,
        dim=demo.dim,
        depth=demo.depth,
        heads=demo.heads,
        segment_len=span if kind == "oracle" else demo.segment_len,
        memory_capacity=span,  # fifo: holds everything from the pairs to the queries
        memory_heads=demo.memory_heads,
    )
    return MemGPTModel(config)


def run_demo(demo: DemoConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(demo.train.device)
    task_kwargs = {k: getattr(demo, k) for k in ("num_keys", "num_values", "num_filler", "segment_len")}
    vocab = demo.task(1, 1).vocab_size
    models, timings = {}, {}
    for kind in ("memory", "baseline", "oracle"):
        torch.manual_seed(demo.train.seed)
        model = build_model(kind, demo, vocab).to(device)
        trainer = Trainer(model, kind, "recall", task_kwargs, demo.train)
        t0 = time.perf_counter()
        trainer.fit(progress=progress)
        timings[kind] = time.perf_counter() - t0
        models[kind] = model

    def acc(kind: str, task: RecallTask, ablate: bool = False) -> float:
        return evaluate(
            models[kind],
            kind,
            task,
            batches=demo.eval_batches,
            batch_size=demo.eval_batch_size,
            seed=demo.eval_seed,
            ablate=ablate,
        )

    pairs_default = max(demo.train.num_pairs)
    rows = {"memory": {}, "baseline": {}, "oracle": {}, "ablation": {}}
    by_pairs = {name: {} for name in rows}
    for d in demo.eval_distances:
        task = demo.task(d, min(4, pairs_default))
        for kind in ("memory", "baseline", "oracle"):
            rows[kind][d] = acc(kind, task)
        rows["ablation"][d] = acc("memory", task, ablate=True)
    for p in demo.eval_pairs:
        task = demo.task(demo.eval_pairs_distance, p)
        for kind in ("memory", "baseline", "oracle"):
            by_pairs[kind][p] = acc(kind, task)
        by_pairs["ablation"][p] = acc("memory", task, ablate=True)

    results = {
        "chance": 1.0 / demo.num_values,
        "accuracy_by_distance": rows,
        "accuracy_by_pairs": by_pairs,
        "eval_pairs_for_distance_table": min(4, pairs_default),
        "eval_distance_for_pairs_table": demo.eval_pairs_distance,
        "train_seconds": timings,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": jsonable(asdict(demo)),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(format_table(results))
    plot = save_plot(results, out / "recall.png")
    note = f" and {plot}" if plot else " (no plot: pip install 'memgpt-layers[plot]' for matplotlib)"
    print(f"\nwrote {out / 'results.json'}{note}")
    return results


def format_table(results: dict) -> str:
    rows, chance = results["accuracy_by_distance"], results["chance"]
    distances = list(next(iter(rows.values())))
    lines = [
        f"Held-out accuracy on segmented recall ({results['eval_pairs_for_distance_table']} pairs; chance {chance:.3f})",
        f"{'distance (segments)':<22}" + "".join(f"{d:>8}" for d in distances),
    ]
    for name, label in (
        ("memory", "memory"),
        ("baseline", "baseline"),
        ("oracle", "oracle (full attn)"),
        ("ablation", "memory, cleared"),
    ):
        lines.append(f"{label:<22}" + "".join(f"{rows[name][d]:>8.3f}" for d in distances))
    pairs = results["accuracy_by_pairs"]
    counts = list(next(iter(pairs.values())))
    lines += [
        "",
        f"By number of pairs (distance {results['eval_distance_for_pairs_table']})",
        f"{'pairs':<22}" + "".join(f"{p:>8}" for p in counts),
    ]
    for name in ("memory", "baseline", "oracle", "ablation"):
        lines.append(f"{name:<22}" + "".join(f"{pairs[name][p]:>8.3f}" for p in counts))
    secs = results["train_seconds"]
    lines += ["", "training time: " + ", ".join(f"{k} {v:.0f}s" for k, v in secs.items())]
    return "\n".join(lines)


def save_plot(results: dict, path: Path) -> Path | None:
    """Accuracy vs distance for the three models and the ablation; None if matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return None
    rows = results["accuracy_by_distance"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, style, size in (("oracle", "s--", 9), ("memory", "o-", 5), ("baseline", "^-", 6), ("ablation", "x:", 7)):
        ds = [int(d) for d in rows[name]]
        label = {"oracle": "oracle (full attention)", "ablation": "memory, cleared before queries"}.get(name, name)
        ax.plot(ds, [rows[name][d] for d in rows[name]], style, label=label, markersize=size)
    ax.axhline(results["chance"], color="gray", lw=0.8, ls="--", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ds, [str(d) for d in ds])
    ax.set_xlabel("distance between pairs and queries (segments)")
    ax.set_ylabel("answer accuracy (held out)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("memgpt: segmented multi-query recall")
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
