"""Why ``gated_scores=True`` is the default: how much weak writes dilute a read.

The seed stores ``(g*k, g*v)`` and scores ``softmax(q . g*k)``. A write with ``g -> 0`` stores a
near-zero key, whose score ``~0`` still takes softmax weight ``exp(0)``: many weak writes
(padding-like tokens, filler the gate learnt to ignore) soak up the read's weight and pull it
towards zero. ``gated_scores=True`` adds ``log g`` to the score, i.e. multiplies each slot's
weight by ``g``, so a weak write loses its influence in proportion to its gate.

Setup per row: ``strong`` slots written with ``g ~ U(0.8, 1)`` and a growing number of weak
slots with ``g ~ U(0, g_weak)``; queries are noisy copies of the strong keys (what a trained
reader looks for). We report the relative error and cosine similarity of the read against the
ideal read over the strong slots alone, for both modes, plus the weight left on strong slots.

    python benchmarks/gated_scores.py           # full table
    python benchmarks/gated_scores.py --quick   # a few rows (CI runs this so it never rots)
"""

from __future__ import annotations

import argparse

import torch

from memgpt.memory import MemoryState, reference, write


def build(strong: int, weak: int, g_weak: float, dim: int, batch: int, gen: torch.Generator):
    m = strong + weak
    state = MemoryState.empty(batch, 1, m, dim, dim, dtype=torch.float64)
    keys = torch.randn(batch, 1, m, dim, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, 1, m, dim, generator=gen, dtype=torch.float64)
    g = torch.cat(
        [
            0.8 + 0.2 * torch.rand(batch, 1, strong, generator=gen, dtype=torch.float64),
            g_weak * torch.rand(batch, 1, weak, generator=gen, dtype=torch.float64),
        ],
        dim=-1,
    )
    perm = torch.randperm(m, generator=gen)  # interleave strong and weak writes in time
    state = write(state, keys[:, :, perm], values[:, :, perm], g[:, :, perm])
    is_strong = state.strength >= 0.8  # (b 1 m)
    return state, keys[:, :, :strong], is_strong


def measure(strong: int, weak: int, g_weak: float, dim: int = 64, batch: int = 64, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    state, strong_keys, is_strong = build(strong, weak, g_weak, dim, batch, gen)
    q = strong_keys + 0.5 * torch.randn(strong_keys.shape, generator=gen, dtype=torch.float64)
    ideal_state = state.replace(valid=state.valid & is_strong)
    out = {}
    for gated in (False, True):
        ideal = reference.read(q, ideal_state, gated_scores=gated)
        got = reference.read(q, state, gated_scores=gated)
        w = reference.read_weights(q, state, gated_scores=gated)
        rel = ((got - ideal).norm(dim=-1) / ideal.norm(dim=-1)).mean().item()
        cos = torch.nn.functional.cosine_similarity(got, ideal, dim=-1).mean().item()
        mass = (w * is_strong[:, :, None, :]).sum(-1).mean().item()
        out["gated" if gated else "seed"] = (rel, cos, mass)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few rows only")
    args = parser.parse_args()
    strong = 16
    weak_counts = [0, 16, 240] if args.quick else [0, 16, 48, 112, 240, 496, 1008]
    g_weaks = [0.1] if args.quick else [0.02, 0.1, 0.3]
    print(f"strong slots: {strong} (g ~ U(0.8, 1)); queries = strong keys + N(0, 0.25); dim 64, 64 rows")
    print("relative error / cosine vs the ideal read over strong slots only; 'mass' = weight on strong slots")
    header = f"{'weak':>5} {'g_weak':>6} | {'seed rel.err':>12} {'cos':>6} {'mass':>6} | {'gated rel.err':>13} {'cos':>6} {'mass':>6}"
    print(header)
    print("-" * len(header))
    for g_weak in g_weaks:
        for weak in weak_counts:
            r = measure(strong, weak, g_weak)
            (sr, sc, sm), (gr, gc, gm) = r["seed"], r["gated"]
            print(f"{weak:>5} {g_weak:>6.2f} | {sr:>12.3f} {sc:>6.3f} {sm:>6.3f} | {gr:>13.3f} {gc:>6.3f} {gm:>6.3f}")


if __name__ == "__main__":
    main()
