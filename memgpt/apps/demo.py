"""The main demonstration: memory that remembers across segments, far beyond its capacity.

Trains four models on the same data and budget (segmented multi-query recall, the queries 1-8
segments after the pairs):

- memory:   a MemGPT model (self-attention within 16-token segments, memory across them) with a
            small store (32 slots per layer by default) under the ``strength`` eviction policy;
- contrast: the same model under ``fifo`` (a ring buffer: the pairs leave it after 2 segments);
- baseline: the same architecture with its state dropped at every segment boundary;
- oracle:   full attention over the whole training sequence (the ceiling, where it fits);

then reports held-out accuracy by distance (segments between the pairs and the queries, up to
128 segments = 2,048 tokens = 64x the store) and by number of pairs, plus the ablation: the
trained memory model with its memory emptied just before the query segment. The memory models
are then traced (:func:`memgpt.trace_memory`) on one held-out batch: write gates, what the
stores keep, read weights (:mod:`memgpt.apps.demo_probe`). Prints the tables and writes
``results.json``, ``recall.png``, ``write_gate.png`` and ``memory_slots.png`` to ``--out``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..memory.checks import check_eviction
from ..models.config import MemGPTConfig
from ..models.model import MemGPTModel
from ..tasks import RecallTask
from ..training.trainer import TrainConfig, Trainer, evaluate, resolve_device
from .demo_probe import plot_slots, plot_write_gate, probe_memory
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
    memory_capacity: int | None = 32  # slots per layer and head; None: room for the longest sequence
    eviction: str = "strength"  # the memory model's policy; the contrast model uses `contrast_eviction`
    top_k: int | None = None  # memory reads over the k best slots (None: all)
    eval_distances: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    eval_pairs: tuple[int, ...] = (1, 2, 4, 6, 8)
    eval_pairs_distance: int = 4
    eval_batches: int = 4
    eval_batches_beyond: int = 1  # at distances beyond training (long sequences: a 128-row batch each)
    eval_batch_size: int = 128
    eval_seed: int = 1234  # held out: training draws from TrainConfig.seed
    probe_distance: int = 16  # the traced batch (introspection plots): 8x the default store
    probe_batch_size: int = 32
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=800, batch_size=32, lr=3e-3, num_pairs=(1, 2, 3, 4, 5, 6, 7, 8))
    )

    def __post_init__(self) -> None:
        check_eviction(self.eviction)
        if self.memory_capacity is not None and (isinstance(self.memory_capacity, bool) or self.memory_capacity < 1):
            raise ValueError(f"DemoConfig.memory_capacity must be an int >= 1 or None, got {self.memory_capacity!r}")
        if not self.eval_distances or min(self.eval_distances) < 1:
            raise ValueError(f"DemoConfig.eval_distances must be ints >= 1, got {self.eval_distances!r}")

    @property
    def table_pairs(self) -> int:
        """Pairs per sequence in the accuracy-by-distance table."""
        return min(4, max(self.train.num_pairs))

    @property
    def contrast_eviction(self) -> str:
        """The policy of the contrast model: ``fifo``, or ``strength`` when the memory model is fifo."""
        return "fifo" if self.eviction != "fifo" else "strength"

    @property
    def max_distance(self) -> int:
        return max(max(self.train.distances), max(self.eval_distances), self.eval_pairs_distance, self.probe_distance)

    @property
    def oracle_distance(self) -> int:
        """The longest distance the oracle's one segment holds: as far as training (and the pairs table) go."""
        return max(max(self.train.distances), self.eval_pairs_distance)

    @property
    def capacity(self) -> int:
        """Memory slots per layer and head (``memory_capacity``, or room for the longest sequence)."""
        if self.memory_capacity is not None:
            return self.memory_capacity
        return (self.max_distance + 1) * self.segment_len

    def task(self, distance: int, num_pairs: int) -> RecallTask:
        return RecallTask(
            num_pairs=num_pairs,
            num_keys=self.num_keys,
            num_values=self.num_values,
            num_filler=self.num_filler,
            segment_len=self.segment_len,
            distance=distance,
        )


def build_model(kind: str, demo: DemoConfig, vocab_size: int, *, eviction: str | None = None) -> MemGPTModel:
    """The memory and baseline models are identical (``demo.capacity`` slots under ``eviction``,
    default ``demo.eviction``); the oracle's one segment spans its longest sequence."""
    span = (demo.oracle_distance + 1) * demo.segment_len
    config = MemGPTConfig(
        vocab_size=vocab_size,
        dim=demo.dim,
        depth=demo.depth,
        heads=demo.heads,
        segment_len=span if kind == "oracle" else demo.segment_len,
        memory_capacity=demo.capacity,
        memory_heads=demo.memory_heads,
        eviction=demo.eviction if eviction is None else eviction,
        top_k=demo.top_k,
    )
    return MemGPTModel(config)


def _train_models(demo: DemoConfig, device: torch.device, progress: bool) -> tuple[dict, dict]:
    """The four models of the demo (name -> model) and their training seconds, same seed and data."""
    task_kwargs = {k: getattr(demo, k) for k in ("num_keys", "num_values", "num_filler", "segment_len")}
    vocab = demo.task(1, 1).vocab_size
    plans = {
        "memory": ("memory", demo.eviction),
        contrast_name(demo): ("memory", demo.contrast_eviction),
        "baseline": ("baseline", None),
        "oracle": ("oracle", None),
    }
    models, timings = {}, {}
    for name, (kind, eviction) in plans.items():
        torch.manual_seed(demo.train.seed)
        model = build_model(kind, demo, vocab, eviction=eviction).to(device)
        trainer = Trainer(model, kind, "recall", task_kwargs, demo.train)
        if progress:
            print(f"training {name}", file=sys.stderr)
        t0 = time.perf_counter()
        trainer.fit(progress=progress)
        timings[name] = time.perf_counter() - t0
        models[name] = model
    return models, timings


def contrast_name(demo: DemoConfig) -> str:
    """The contrast model's name in results.json: ``memory_fifo`` (or ``memory_strength``)."""
    return f"memory_{demo.contrast_eviction}"


def eval_batches(demo: DemoConfig, distance: int) -> int:
    """Held-out batches at ``distance``: fewer beyond the training distances (long sequences)."""
    return demo.eval_batches if distance <= max(demo.train.distances) else demo.eval_batches_beyond


def _accuracy_tables(demo: DemoConfig, models: dict) -> tuple[dict, dict]:
    """Accuracy by distance and by number of pairs: model name (and "ablation") -> {key: acc or None}."""
    contrast = contrast_name(demo)

    def acc(name: str, task: RecallTask, batches: int, ablate: bool = False) -> float | None:
        if name == "oracle" and task.distance > demo.oracle_distance:
            return None  # longer than the oracle's one segment: it does not fit
        kind = "memory" if name.startswith("memory") else name
        return evaluate(
            models[name],
            kind,
            task,
            batches=batches,
            batch_size=demo.eval_batch_size,
            seed=demo.eval_seed,
            ablate=ablate,
        )

    names = ("memory", contrast, "baseline", "oracle")
    by_distance: dict[str, dict[int, float | None]] = {name: {} for name in (*names, "ablation")}
    by_pairs: dict[str, dict[int, float | None]] = {name: {} for name in (*names, "ablation")}
    for d in demo.eval_distances:
        task, batches = demo.task(d, demo.table_pairs), eval_batches(demo, d)
        for name in names:
            by_distance[name][d] = acc(name, task, batches)
        by_distance["ablation"][d] = acc("memory", task, batches, ablate=True)
    for p in demo.eval_pairs:
        task, batches = demo.task(demo.eval_pairs_distance, p), eval_batches(demo, demo.eval_pairs_distance)
        for name in names:
            by_pairs[name][p] = acc(name, task, batches)
        by_pairs["ablation"][p] = acc("memory", task, batches, ablate=True)
    return by_distance, by_pairs


def run_demo(demo: DemoConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(demo.train.device)
    models, timings = _train_models(demo, device, progress)
    contrast = contrast_name(demo)

    t0 = time.perf_counter()
    by_distance, by_pairs = _accuracy_tables(demo, models)
    eval_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    probe_task = demo.task(demo.probe_distance, demo.table_pairs)
    probe = probe_memory(
        {demo.eviction: models["memory"], demo.contrast_eviction: models[contrast]},
        probe_task,
        batch_size=demo.probe_batch_size,
        seed=demo.eval_seed + 1,
    )
    probe_seconds = time.perf_counter() - t0

    results = {
        "chance": 1.0 / demo.num_values,
        "memory_capacity": demo.capacity,
        "eviction": demo.eviction,
        # the four rows of the original demo; "memory" is the model under `eviction`
        "accuracy_by_distance": {k: by_distance[k] for k in ("memory", "baseline", "oracle", "ablation")},
        "accuracy_by_pairs": {k: by_pairs[k] for k in ("memory", "baseline", "oracle", "ablation")},
        "contrast": {
            "name": contrast,
            "eviction": demo.contrast_eviction,
            "accuracy_by_distance": by_distance[contrast],
            "accuracy_by_pairs": by_pairs[contrast],
        },
        "eval_pairs_for_distance_table": demo.table_pairs,
        "eval_distance_for_pairs_table": demo.eval_pairs_distance,
        "eval_answers_by_distance": {
            d: eval_batches(demo, d) * demo.eval_batch_size * demo.table_pairs for d in demo.eval_distances
        },
        "introspection": {
            "distance": demo.probe_distance,
            "pairs": demo.table_pairs,
            "batch_size": demo.probe_batch_size,
            "seed": demo.eval_seed + 1,
            "models": probe["report"],
        },
        "train_seconds": timings,
        "eval_seconds": eval_seconds,
        "probe_seconds": probe_seconds,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": jsonable(asdict(demo)),
    }
    plots = [
        save_plot(results, out / "recall.png"),
        plot_write_gate(probe, probe_task, out / "write_gate.png"),
        plot_slots(probe, probe_task, out / "memory_slots.png"),
    ]
    results["written"] = [str(out / "results.json")] + [str(p) for p in plots if p is not None]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(format_table(results))
    note = "" if plots[0] else " (no plots: pip install 'memgpt-layers[plot]' for matplotlib)"
    print(f"\nwrote {', '.join(results['written'])}{note}")
    return results


def _cell(value: float | None) -> str:
    return f"{'-':>8}" if value is None else f"{value:>8.3f}"


def format_table(results: dict) -> str:
    rows, chance, contrast = results["accuracy_by_distance"], results["chance"], results["contrast"]
    rows = {**rows, contrast["name"]: contrast["accuracy_by_distance"]}
    distances = list(rows["memory"])
    labels = (
        ("memory", f"memory ({results['eviction']})"),
        (contrast["name"], f"memory ({contrast['eviction']})"),
        ("baseline", "baseline"),
        ("oracle", "oracle (full attn)"),
        ("ablation", "memory, cleared"),
    )
    T = results["config"]["segment_len"]
    lines = [
        f"Held-out accuracy on segmented recall ({results['eval_pairs_for_distance_table']} pairs; chance "
        f"{chance:.3f}); memory: {results['memory_capacity']} slots per layer and head",
        f"{'distance (segments)':<22}" + "".join(f"{d:>8}" for d in distances),
        f"{'  tokens / capacity':<22}"
        + "".join(f"{int(d) * T / results['memory_capacity']:>7.3g}x" for d in distances),
    ]
    for name, label in labels:
        lines.append(f"{label:<22}" + "".join(_cell(rows[name][d]) for d in distances))
    pairs = {**results["accuracy_by_pairs"], contrast["name"]: contrast["accuracy_by_pairs"]}
    counts = list(pairs["memory"])
    lines += [
        "",
        f"By number of pairs (distance {results['eval_distance_for_pairs_table']})",
        f"{'pairs':<22}" + "".join(f"{p:>8}" for p in counts),
    ]
    for name, label in labels:
        lines.append(f"{label:<22}" + "".join(_cell(pairs[name][p]) for p in counts))
    lines += ["", *format_introspection(results["introspection"])]
    secs = results["train_seconds"]
    lines += [
        "",
        "training time: " + ", ".join(f"{k} {v:.0f}s" for k, v in secs.items()),
        f"evaluation {results['eval_seconds']:.0f}s, introspection {results['probe_seconds']:.0f}s",
    ]
    return "\n".join(lines)


def format_introspection(intro: dict) -> list[str]:
    """The probe's numbers per model and layer, means over memory heads (and the best head)."""

    def avg(values: list[float]) -> str:
        return f"{sum(values) / len(values):.3f}"

    def best(values: list[float]) -> str:
        return f"{avg(values)} [{max(values):.2f}]"

    lines = [
        f"Inside the memory (trace_memory on {intro['batch_size']} held-out sequences at distance "
        f"{intro['distance']}; means over memory heads, [best head])",
        f"{'model, layer':<18}{'g pairs':>9}{'g filler':>9}{'g query':>9}{'pairs kept':>17}{'read on pairs':>17}"
        f"{'mem share q':>12}{'age mean':>10}",
    ]
    for label, model in intro["models"].items():
        for i, layer in enumerate(model["layers"]):
            kept, read = layer["pair_tokens_stored_at_query"], layer.get("read_weight_on_pair_slots_at_query", [0.0])
            lines.append(
                f"{label + ', ' + str(i):<18}{avg(layer['write_gate_pairs']):>9}{avg(layer['write_gate_filler']):>9}"
                f"{avg(layer['write_gate_queries']):>9}{best(kept):>17}{best(read):>17}"
                f"{layer['memory_share_queries']:>12.3f}{avg(layer['final_store']['age_mean']):>10}"
            )
    return lines


def save_plot(results: dict, path: Path) -> Path | None:
    """Accuracy vs distance for the four models and the ablation; None if matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return None
    contrast = results["contrast"]
    rows = {**results["accuracy_by_distance"], "contrast": contrast["accuracy_by_distance"]}
    labels = {
        "oracle": "oracle (full attention)",
        "memory": f"memory ({results['eviction']}, {results['memory_capacity']} slots)",
        "contrast": f"memory ({contrast['eviction']}, {results['memory_capacity']} slots)",
        "ablation": "memory, cleared before queries",
    }
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = (
        ("oracle", "s--", 9),
        ("memory", "o-", 5),
        ("contrast", "v-", 6),
        ("baseline", "^-", 6),
        ("ablation", "x:", 7),
    )
    for name, style, size in styles:
        points = [(int(d), a) for d, a in rows[name].items() if a is not None]
        ax.plot(*zip(*points), style, label=labels.get(name, name), markersize=size)
    ds = [int(d) for d in rows["memory"]]
    ax.axhline(results["chance"], color="gray", lw=0.8, ls="--", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ds, [str(d) for d in ds])
    ax.set_xlabel("distance between pairs and queries (segments)")
    ax.set_ylabel("answer accuracy (held out)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("memgpt: segmented multi-query recall, far beyond the memory's capacity")
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
