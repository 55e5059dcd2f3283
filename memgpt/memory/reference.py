"""Plain reference twins of the memory ops: same signatures, written to be obviously correct.

Loops over batch, heads, tokens and slots are fine here: this is the oracle the fast ops in
``read.py``/``write.py`` are held against by the tests and by the benchmarks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_read_args, check_write_args, resolve_scale
from .state import MemoryState
from .write import USAGE_DECAY

__all__ = ["read", "write", "read_usage", "read_weights"]


def read_weights(
    q: Tensor,
    state: MemoryState,
    *,
    scale: float | None = None,
    top_k: int | None = None,
    gated_scores: bool = True,
) -> Tensor:
    """Read weights ``beta`` (b h n m) in float32 (float64 for float64 input); zero on invalid slots."""
    check_read_args(q, state, top_k)
    s = resolve_scale(scale, state.key_dim)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = s * torch.einsum("bhnd,bhmd->bhnm", q.to(ct), state.keys.to(ct))
    if gated_scores:
        g = state.strength.to(ct).clamp_min(torch.finfo(torch.float32).tiny)
        scores = scores + torch.log(g)[:, :, None, :]
    valid = state.valid[:, :, None, :].expand_as(scores)
    if top_k is not None and top_k < state.capacity:
        ranked = scores.masked_fill(~valid, float("-inf"))
        idx = ranked.topk(top_k, dim=-1).indices
        chosen = torch.zeros_like(valid).scatter(-1, idx, True)
        valid = valid & chosen
    scores = scores.masked_fill(~valid, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    # A row with no valid slot: softmax of all -inf is NaN; such a row reads nothing.
    return torch.where(valid, weights, torch.zeros_like(weights))


def read(
    q: Tensor,
    state: MemoryState,
    *,
    scale: float | None = None,
    top_k: int | None = None,
    gated_scores: bool = True,
) -> Tensor:
    """q: (b h n dk) -> (b h n dv); see :func:`memgpt.memory.read`."""
    w = read_weights(q, state, scale=scale, top_k=top_k, gated_scores=gated_scores)
    return torch.einsum("bhnm,bhmd->bhnd", w, state.values.to(w.dtype)).to(q.dtype)


def read_usage(
    q: Tensor,
    state: MemoryState,
    *,
    scale: float | None = None,
    top_k: int | None = None,
    gated_scores: bool = True,
    mask: Tensor | None = None,
) -> Tensor:
    """(b h m) in the dtype of ``state.usage``: the read weights summed over the (unmasked) queries."""
    with torch.no_grad():
        w = read_weights(q, state, scale=scale, top_k=top_k, gated_scores=gated_scores)
        if mask is not None:
            w = w * mask[:, None, :, None].to(w.dtype)
        return w.sum(dim=2).to(state.usage.dtype)


def _victim(valid: list[bool], priority: list[float], step: list[int]) -> int:
    """The slot a new token goes to: the first empty slot, else the (priority, age) minimum."""
    for i, v in enumerate(valid):
        if not v:
            return i
    return min(range(len(valid)), key=lambda i: (priority[i], step[i]))


def write(
    state: MemoryState,
    keys: Tensor,
    values: Tensor,
    strength: Tensor,
    *,
    mask: Tensor | None = None,
    eviction: str = "fifo",
    usage_decay: float = USAGE_DECAY,
) -> MemoryState:
    """One token at a time, one head at a time; see :func:`memgpt.memory.write`."""
    check_write_args(state, keys, values, strength, mask, eviction, usage_decay)
    b, h, n, _ = keys.shape
    m = state.capacity
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool)
    mask = mask.cpu()
    out_keys, out_values = state.keys.clone(), state.values.clone()
    out_strength = state.strength.clone()
    valid = state.valid.clone()
    step = state.step.clone()
    usage = state.usage.clone()
    count = state.count.clone()
    g = strength.to(state.strength.dtype)
    for bi in range(b):
        start = [1.0] * h  # the usage a new slot starts at, per head
        if eviction == "usage" and bool(mask[bi].any()):  # only the usage policy decays usage
            usage[bi] = usage[bi] * usage_decay
            for hi in range(h):  # a fair start: the lower median of the slots filled before this write
                filled = sorted(u for u, ok in zip(usage[bi, hi].tolist(), valid[bi, hi].tolist()) if ok)
                start[hi] = filled[(len(filled) - 1) // 2] if filled else 1.0
        for j in range(n):
            if not bool(mask[bi, j]):
                continue
            s = int(count[bi])
            for hi in range(h):
                if eviction == "fifo":
                    slot = s % m
                else:
                    prio = out_strength[bi, hi] if eviction == "strength" else usage[bi, hi]
                    slot = _victim(valid[bi, hi].tolist(), prio.tolist(), step[bi, hi].tolist())
                gain = g[bi, hi, j]
                out_keys[bi, hi, slot] = keys[bi, hi, j] * gain.to(keys.dtype)
                out_values[bi, hi, slot] = values[bi, hi, j] * gain.to(values.dtype)
                out_strength[bi, hi, slot] = gain
                valid[bi, hi, slot] = True
                step[bi, hi, slot] = s
                usage[bi, hi, slot] = start[hi]
            count[bi] = s + 1
    return MemoryState(
        keys=out_keys,
        values=out_values,
        valid=valid,
        strength=out_strength,
        step=step,
        usage=usage,
        count=count,
    )
