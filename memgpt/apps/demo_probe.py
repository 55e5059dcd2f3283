"""The demo's look inside the memory: one held-out batch traced with :func:`memgpt.trace_memory`.

For each trained memory model (the demo's eviction policy and its contrast) the probe runs one
batch of recall at ``probe_distance`` segments and reports, per layer and memory head:

- the write gate ``g`` at the pair tokens, the filler and the query tokens (batch means);
- which pair tokens are still stored when the query segment reads (fraction of the 2P), and the
  share of the query tokens' read weight that lands on those slots;
- the fusion gate's memory share ``mean_d (1 - lambda)`` at the query tokens and elsewhere;
- the final store: fill level, evictions, age and strength of the stored slots.

and plots, for the batch's first example, the write gate over positions (``write_gate.png``)
and what every slot holds at every segment (``memory_slots.png``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..models.introspect import LayerTrace, memory_stats, trace_memory
from ..models.model import MemGPTModel
from ..tasks import RecallTask
from .report import pyplot

__all__ = ["probe_memory", "plot_write_gate", "plot_slots", "token_kinds", "KINDS"]

# What a position of a recall sequence holds (the slot plot's colours follow this order).
KINDS = ("empty", "filler", "pair key", "pair value", "query")


def token_kinds(task: RecallTask) -> Tensor:
    """(n,) int64 kind of each position (index into KINDS, 1..4) of a sequence of ``task``."""
    kinds = torch.ones(task.seq_len, dtype=torch.long)
    P, q0 = task.num_pairs, task.distance * task.segment_len
    kinds[0 : 2 * P : 2], kinds[1 : 2 * P : 2], kinds[q0 : q0 + P] = 2, 3, 4
    return kinds


def _slot_kinds(trace: LayerTrace, kinds: Tensor) -> Tensor:
    """(c b h m) kind of the token each slot holds as each call read it (0 = empty).

    A slot's write step is ``writes - 1 - age``; for a batch fed from position 0 without padding
    it is the position of the token stored there."""
    out = []
    lookup = torch.cat([kinds.new_zeros(1), kinds.to(trace.write_gate.device)])  # step -1 (empty) -> 0
    for s in trace.stores:
        step = torch.where(s.age >= 0, (s.writes - 1)[:, None, None] - s.age, torch.full_like(s.age, -1))
        out.append(lookup[step + 1])
    return torch.stack(out)


def _mean(x: Tensor, where: Tensor) -> list[float]:
    """Per head: mean of x (b h n) over the positions ``where`` (n,) bool."""
    return [round(v, 4) for v in x[..., where].mean(dim=(0, 2)).tolist()]


def _layer_report(trace: LayerTrace, kinds: Tensor, query_call: int, pairs: int) -> dict:
    g, share = trace.write_gate, trace.memory_share  # (b h n), (b n)
    k = kinds.to(g.device)
    is_pair, is_query = (k == 2) | (k == 3), k == 4
    slot_kind = _slot_kinds(trace, kinds)[query_call]  # (b h m) what the query segment could read
    holds_pair = (slot_kind == 2) | (slot_kind == 3)
    report = {
        "write_gate_pairs": _mean(g, is_pair),
        "write_gate_filler": _mean(g, k == 1),
        "write_gate_queries": _mean(g, is_query),
        "pair_tokens_stored_at_query": [
            round(v, 4) for v in (holds_pair.sum(-1).float() / (2 * pairs)).mean(0).tolist()
        ],
        "memory_share_queries": round(float(share[:, is_query].mean()), 4),
        "memory_share_elsewhere": round(float(share[:, ~is_query].mean()), 4),
    }
    if trace.slot_weight is not None:
        on_pairs = (trace.slot_weight[query_call] * holds_pair).sum(-1)  # (b h)
        report["read_weight_on_pair_slots_at_query"] = [round(v, 4) for v in on_pairs.mean(0).tolist()]
    return report


def _store_report(stats) -> dict:
    def heads(t: Tensor) -> list[float]:
        return [round(v, 4) for v in t.double().mean(0).tolist()]

    return {
        "fill": heads(stats.fill),
        "evictions": heads(stats.evictions),
        "age_mean": heads(stats.age_mean),
        "age_min": heads(stats.age_min),
        "age_max": heads(stats.age_max),
        "strength_mean": heads(stats.strength_mean),
        "strength_min": heads(stats.strength_min),
    }


@torch.no_grad()
def probe_memory(models: dict[str, MemGPTModel], task: RecallTask, *, batch_size: int, seed: int) -> dict:
    """Trace every model in ``models`` (label -> memory model) on one batch of ``task``.

    Returns ``{"report": {label: {...}}, "traces": {label: (LayerTrace, ...)}, "input_ids": (b n)}``;
    the report is JSON-ready (per layer, lists over memory heads; batch means), the traces feed
    the plots.
    """
    batch = task.sample(batch_size, torch.Generator().manual_seed(seed))
    kinds = token_kinds(task)
    report, traces = {}, {}
    for label, model in models.items():
        model.eval()
        ids = batch.input_ids.to(next(model.parameters()).device)
        with trace_memory(model) as trace:
            state = model(ids).state
        layers = trace.layers
        traces[label] = layers
        report[label] = {
            "eviction": model.config.eviction,
            "capacity": model.config.memory_capacity,
            "layers": [
                {
                    **_layer_report(layer, kinds, task.distance, task.num_pairs),
                    "final_store": _store_report(stats),
                }
                for layer, stats in zip(layers, memory_stats(state))
            ],
        }
    return {"report": report, "traces": traces, "input_ids": batch.input_ids, "kinds": kinds}


def _best_head(trace: tuple[LayerTrace, ...], kinds: Tensor, query_call: int) -> tuple[int, int]:
    """(layer, head) whose store holds the most pair tokens of example 0 when the queries read."""
    best, where = -1, (0, 0)
    for i, layer in enumerate(trace):
        slot_kind = _slot_kinds(layer, kinds)[query_call, 0]  # (h m)
        held = ((slot_kind == 2) | (slot_kind == 3)).sum(-1)
        h = int(held.argmax())
        if int(held[h]) > best:
            best, where = int(held[h]), (i, h)
    return where


def plot_write_gate(probe: dict, task: RecallTask, path: Path) -> Path | None:
    """Example 0: the write gate of every head over positions, one panel per model and layer."""
    plt = pyplot()
    if plt is None:
        return None
    traces, kinds = probe["traces"], probe["kinds"]
    labels = list(traces)
    depth = len(next(iter(traces.values())))
    fig, axes = plt.subplots(
        len(labels) * depth, 1, figsize=(11, 2.1 * len(labels) * depth), sharex=True, squeeze=False
    )
    n, T = task.seq_len, task.segment_len
    pos = torch.arange(n).numpy()
    for r, (label, layer) in enumerate((lab, layer) for lab in labels for layer in range(depth)):
        ax = axes[r, 0]
        g = traces[label][layer].write_gate[0].cpu().numpy()  # (h n)
        for h in range(g.shape[0]):
            ax.plot(pos, g[h], lw=0.8, alpha=0.8, label=f"head {h}")
        for kind, colour in ((2, "tab:blue"), (3, "tab:orange"), (4, "tab:green")):
            at = (kinds == kind).numpy()
            ax.scatter(pos[at], g[:, at].max(0), s=14, color=colour, zorder=3, label=KINDS[kind])
        for s in range(0, n + 1, T):
            ax.axvline(s, color="gray", lw=0.4, ls=":")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(f"{label}\nlayer {layer}: g")
        if r == 0:
            ax.legend(loc="upper right", ncol=4 + g.shape[0], fontsize=7)
    axes[-1, 0].set_xlabel(f"position (segments of {T}; pairs at the start, queries {task.distance} segments later)")
    fig.suptitle("write gate g per position and memory head (one held-out example)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_slots(probe: dict, task: RecallTask, path: Path) -> Path | None:
    """Example 0: what each slot holds (left) and how old it is (right) at every segment's read."""
    plt = pyplot()
    if plt is None:
        return None
    from matplotlib.colors import ListedColormap

    traces, kinds = probe["traces"], probe["kinds"]
    labels = list(traces)
    fig, axes = plt.subplots(len(labels), 2, figsize=(11, 2.8 * len(labels)), squeeze=False)
    cmap = ListedColormap(["white", "lightgray", "tab:blue", "tab:orange", "tab:green"])
    for r, label in enumerate(labels):
        layer, head = _best_head(traces[label], kinds, task.distance)
        trace = traces[label][layer]
        contents = _slot_kinds(trace, kinds)[:, 0, head].cpu().numpy()  # (c m)
        ages = torch.stack([s.age[0, head] for s in trace.stores]).cpu().float().numpy()  # (c m)
        ages[ages < 0] = float("nan")
        ax = axes[r, 0]
        ax.imshow(contents.T, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(KINDS) - 0.5, interpolation="nearest")
        ax.set_ylabel(f"{label}\nlayer {layer} head {head}: slot")
        ax.axvline(task.distance, color="tab:green", lw=1.5, alpha=0.6)  # the query segment's read
        ax = axes[r, 1]
        im = ax.imshow(ages.T, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, label="age (tokens written since)")
        for ax in axes[r]:
            ax.set_xlabel("segment (the store as that segment read it)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(len(KINDS))]
    fig.legend(handles, KINDS, loc="lower center", ncol=len(KINDS), fontsize=8)
    axes[0, 0].set_title(
        f"slot contents (the head that keeps most pair tokens; green line: the queries' read at segment {task.distance})",
        fontsize=8,
    )
    axes[0, 1].set_title("slot ages", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
