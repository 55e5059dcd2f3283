"""Fast memory write: append ``(g*k, g*v)`` per token and head, evicting by policy when full.

Semantics (the reference twin spells them out token by token): the written tokens of a row are
stored in order; while the row has empty slots a token takes one, and once it is full each token
overwrites the slot its eviction policy chooses:

- ``fifo``:     the oldest write (a ring buffer: the token with write step ``s`` goes to slot
                ``s % capacity``);
- ``strength``: the slot with the smallest write gate ``g`` (ties: the oldest);
- ``usage``:    the slot with the smallest usage (ties: the oldest). A row's usage decays by
                ``usage_decay`` once per write that stores anything in it, and a new slot starts
                at the median usage of the row's filled slots (the lower one of an even count,
                after that decay; 1 in an empty row): a fair start, so that a new write outlives
                the less-read half and is evicted only once it has been read less than others. (Starting at a fixed
                value froze the store: old slots accumulate read weight past any constant, so
                every new write was the next victim.) Under the other policies usage is only set
                to 1 on written slots: nothing reads it there, and decaying every slot would make
                each write O(capacity).

All policies are computed for the whole write at once, without loops over tokens or slots:
when the row overflows, the survivors are the last written token plus the ``capacity - 1``
best of everything else (old slots and earlier tokens of this write), which is exactly what
evicting one minimum per token leaves behind. For ``strength``/``usage`` the surviving old
slots stay in place and new tokens fill the freed slots in ascending order, so slot positions
may differ from the token-by-token reference while the set of stored pairs is the same.

Two ways to apply a write, with identical results:

- out of place (default): a new store; the old one is untouched, so autograd and callers that
  keep it see what they kept. Costs one copy of the whole store (O(capacity)).
- in place (``inplace=True``): the rows are copied into the given store (O(tokens written) for
  ``fifo``; ``strength``/``usage`` still scan the O(capacity) metadata to choose victims), and
  the given state is *donated*: using it again raises. This is what makes decoding with a large
  memory cheap. Under autograd the write is *logged* (:mod:`memgpt.memory.reversible`): it keeps
  the rows it overwrites, so backward can roll the store back, and gradients flow through
  :func:`read` and :func:`write` as with the out-of-place write; see :func:`write`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .checks import check_write_args
from .reversible import logged_write
from .state import MemoryState

__all__ = ["write", "USAGE_DECAY"]

USAGE_DECAY = 0.9
"""Default ``usage_decay``: a row's slot usage is multiplied by it once per write that stores
anything in that row (``eviction="usage"`` only)."""


def _fair_start(usage: Tensor, valid: Tensor) -> Tensor:
    """(b h): the (lower) median usage of each row's filled slots, 1 where a row has none
    (``usage`` policy). A median is one of the row's own values, so no rounding decides which
    slot goes; empty slots are left out whatever they hold."""
    filled = valid.any(dim=-1)
    median = torch.where(valid, usage, torch.full_like(usage, float("nan"))).nanmedian(dim=-1).values
    return torch.where(filled, median, torch.ones_like(median))


def _fifo_destinations(step_new: Tensor, rank: Tensor, mask: Tensor, n_written: Tensor, m: int) -> Tensor:
    """Slot per token (b n), or ``m`` (discard) for tokens masked out or overwritten in this write."""
    keep = mask & (rank >= (n_written[:, None] - m))
    return torch.where(keep, step_new % m, torch.full_like(step_new, m))


def _priority_destinations(
    state: MemoryState,
    prio_old: Tensor,
    prio_new: Tensor,
    step_new: Tensor,
    rank: Tensor,
    mask: Tensor,
    n_written: Tensor,
) -> Tensor:
    """Slot per token and head (b h n), or ``m`` (discard), for the ``strength``/``usage`` policies."""
    b, h, m = state.valid.shape
    n = mask.shape[1]
    last = mask & (rank == (n_written[:, None] - 1))  # (b n): the last written token survives
    neg_inf = torch.tensor(float("-inf"), device=prio_old.device)
    pos_inf = torch.tensor(float("inf"), device=prio_old.device)
    p_old = torch.where(state.valid, prio_old, neg_inf)
    p_new = torch.where(mask[:, None, :], prio_new, neg_inf)
    p_new = torch.where(last[:, None, :], pos_inf, p_new)
    prio = torch.cat([p_old, p_new], dim=-1)  # (b h m+n)
    steps = torch.cat([state.step, step_new[:, None, :].expand(b, h, n)], dim=-1)
    valid = torch.cat([state.valid, mask[:, None, :].expand(b, h, n)], dim=-1)
    # Order candidates best first by (priority desc, step desc): two stable sorts.
    by_step = steps.argsort(dim=-1, descending=True, stable=True)
    by_prio = prio.gather(-1, by_step).argsort(dim=-1, descending=True, stable=True)
    order = by_step.gather(-1, by_prio)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(m + n, device=order.device).expand_as(order))
    survive = valid & (ranks < m)
    survive_old, survive_new = survive[..., :m], survive[..., m:]
    # The k-th surviving new token (in write order) takes the k-th freed slot (ascending).
    freed_first = (survive_old.to(torch.int8)).argsort(dim=-1, stable=True)  # freed slot indices first
    new_rank = (survive_new.long().cumsum(-1) - 1).clamp_min(0)
    target = freed_first.gather(-1, new_rank.clamp_max(m - 1))
    return torch.where(survive_new, target, torch.full_like(target, m))


def _scatter_rows(store: Tensor, dest: Tensor, rows: Tensor) -> Tensor:
    """A new, contiguous (b h m d) store: ``store`` with ``rows`` (b h n d) written at ``dest`` (b h n).

    One copy of the store (memcpy speed) plus an O(n) scatter into it. The copy is flat, with one
    extra row at the end where tokens sent to the discard slot ``m`` land; the returned store is
    the prefix before that row, so it stays contiguous. The scatter is in place on the fresh copy
    only, so the caller's ``store`` and autograd's saved tensors never change.
    """
    b, h, m, d = store.shape
    fresh = torch.cat([store.reshape(b * h * m, d), store.new_zeros(1, d)])  # (b*h*m + 1, d)
    base = (torch.arange(b * h, device=dest.device) * m).view(b, h, 1)
    index = torch.where(dest < m, dest + base, b * h * m)  # discarded tokens -> the extra row
    fresh.scatter_(0, index.reshape(-1, 1).expand(-1, d), rows.reshape(-1, d))
    return fresh[: b * h * m].view(b, h, m, d)


class _Plan(NamedTuple):
    """Where and what one write stores, computed before it is applied (in place or logged)."""

    dest: Tensor  # (b h n) slot per token, m = discard
    g: Tensor  # (b h n) write gate in the metadata dtype
    step_new: Tensor  # (b n) write step per token
    usage_old: Tensor  # (b h m) usage before the write (decayed under the usage policy)
    usage_new: Tensor  # (b h) usage of the slots this write fills
    n_written: Tensor  # (b,) tokens written per row


def _records_grad(state: MemoryState, keys: Tensor, values: Tensor, strength: Tensor) -> bool:
    """Whether autograd records this write (then an in-place write must be a logged one)."""
    if not torch.is_grad_enabled():
        return False
    return state._log is not None or any(
        t.requires_grad for t in (keys, values, strength, state.keys, state.values, state.strength)
    )


def _write_logged(state: MemoryState, keys: Tensor, values: Tensor, plan: _Plan) -> MemoryState:
    """The in-place write under autograd: the same rows as :func:`_apply_in_place`, logged first."""
    b, h, n, _ = keys.shape
    m, dest = state.capacity, plan.dest
    src = (dest < m).flatten().nonzero().squeeze(1)  # (r,) flat (b h n) tokens that land
    slot = (dest + (torch.arange(b * h, device=dest.device) * m).view(b, h, 1)).flatten().index_select(0, src)

    def apply(target: MemoryState) -> MemoryState:
        return _apply_in_place(target, keys, values, plan)

    return logged_write(state, keys, values, plan.g, slot, src, apply)


def _apply_in_place(state: MemoryState, keys: Tensor, values: Tensor, plan: _Plan) -> MemoryState:
    """Copy the surviving tokens' rows into ``state``'s tensors at ``dest`` (b h n; ``m`` = discard).

    Work is O(b·h·n) rows plus one host sync (the number of survivors): the surviving tokens are
    picked by a boolean mask so that ``index_copy_`` sees unique destinations only.
    """
    dest, g, step_new, usage_old, usage_new, n_written = plan
    b, h, n, dk = keys.shape
    m, dv = state.capacity, state.value_dim
    target = state if state.is_contiguous() else state.contiguous()
    if usage_old is not state.usage:  # the usage policy decays whole rows: O(capacity) metadata
        target.usage.copy_(usage_old)
    start = _ring_run_start(dest, m)
    if start is not None:
        return _write_ring_slices(state, target, start, keys, values, g, step_new, usage_new, n_written)
    kept = (dest < m).flatten()  # (b*h*n)
    src = kept.nonzero().squeeze(1)
    slot = (dest + (torch.arange(b * h, device=dest.device) * m).view(b, h, 1)).flatten()
    every = src.numel() == kept.numel()  # the common case (no padding, no overflow): no selection pass

    def pick(t: Tensor) -> Tensor:
        return t if every else t.index_select(0, src)

    slot = pick(slot)
    g_store = g.to(keys.dtype)[..., None]
    target.keys.view(-1, dk).index_copy_(0, slot, pick((keys * g_store).reshape(-1, dk)))
    target.values.view(-1, dv).index_copy_(0, slot, pick((values * g_store).reshape(-1, dv)))
    target.valid.view(-1).index_fill_(0, slot, True)
    target.strength.view(-1).index_copy_(0, slot, pick(g.reshape(-1)))
    target.step.view(-1).index_copy_(0, slot, pick(step_new[:, None, :].expand(b, h, n).reshape(-1)))
    target.usage.view(-1).index_copy_(0, slot, pick(usage_new[:, :, None].expand(b, h, n).reshape(-1)))
    target.count.add_(n_written)
    new = target.replace()
    state._donate()  # after replace(): the new state must not inherit the mark
    return new


def _ring_run_start(dest: Tensor, m: int) -> int | None:
    """The first slot if every row and head writes all its tokens to the same run of consecutive
    ring slots (fifo decoding or streaming a batch in lockstep), else None."""
    n = dest.shape[-1]
    if n == 0 or n > m:
        return None
    start = int(dest[0, 0, 0])
    if start >= m:
        return None
    run = (start + torch.arange(n, device=dest.device)) % m
    return start if bool((dest == run).all()) else None


def _write_ring_slices(
    state: MemoryState,
    target: MemoryState,
    start: int,
    keys: Tensor,
    values: Tensor,
    g: Tensor,
    step_new: Tensor,
    usage_new: Tensor,
    n_written: Tensor,
) -> MemoryState:
    """Tokens 0..n-1 to slots start, start+1, ... (mod m) in every row and head, as at most two
    slice writes: ``g*k`` is multiplied straight into the store (``out=`` a slice of it), with no
    temporary and no index, at about the speed of a copy."""
    m, n = state.capacity, keys.shape[2]
    first = min(n, m - start)  # tokens before the ring wraps
    g_store = g.to(keys.dtype)[..., None]
    for lo, hi, at in ((0, first, start), (first, n, 0)):  # at most two ranges
        if hi <= lo:
            continue
        rows = slice(at, at + hi - lo)
        torch.mul(keys[:, :, lo:hi], g_store[:, :, lo:hi], out=target.keys[:, :, rows])
        torch.mul(values[:, :, lo:hi], g_store[:, :, lo:hi], out=target.values[:, :, rows])
        target.valid[:, :, rows] = True
        target.strength[:, :, rows] = g[:, :, lo:hi]
        target.step[:, :, rows] = step_new[:, None, lo:hi]
        target.usage[:, :, rows] = usage_new[:, :, None]
    target.count.add_(n_written)
    new = target.replace()
    state._donate()
    return new


def write(
    state: MemoryState,
    keys: Tensor,
    values: Tensor,
    strength: Tensor,
    *,
    mask: Tensor | None = None,
    eviction: str = "fifo",
    usage_decay: float = USAGE_DECAY,
    inplace: bool = False,
) -> MemoryState:
    """Write ``(g*k, g*v)`` for every (unmasked) token and head; returns the new state.

    keys: (b h n dk), values: (b h n dv) in the state's dtype; strength ``g``: (b h n) float;
    mask: (b n) bool, True = write this token (default: all). Gradients flow to keys, values,
    strength and to the surviving slots of the old state.

    ``inplace=True`` writes into ``state``'s own tensors instead of a copy and returns a state
    sharing them; ``state`` is donated (reading or writing it again raises). A store that is not
    contiguous is made contiguous once first. Under autograd the write is logged instead
    (:mod:`memgpt.memory.reversible`): the first such write copies the store once (a plain read
    may have saved its tensors; :func:`memgpt.memory.start_log` before the first read avoids
    that copy), later ones are O(tokens); the returned state's tensors do not require grad, and
    its gradients flow through :func:`read` and :func:`write` only.
    """
    check_write_args(state, keys, values, strength, mask, eviction, usage_decay)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    records = _records_grad(state, keys, values, strength)
    if records and not inplace and state._log is not None:
        raise RuntimeError(
            "this memory state is written in place under autograd (it has a write log): continue with "
            "write(..., inplace=True), or detach() it to start a new graph"
        )
    b, h, n, dk = keys.shape
    if n == 0:
        return state
    m = state.capacity
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=keys.device)
    rank = mask.long().cumsum(dim=1) - 1  # (b n) position among this row's written tokens
    n_written = mask.long().sum(dim=1)  # (b,)
    step_new = state.count[:, None] + rank  # (b n)
    g = strength.to(state.strength.dtype)  # float32, or float64 for a float64 store
    if eviction == "usage":
        wrote = (n_written > 0)[:, None, None]
        usage_old = torch.where(wrote, state.usage * usage_decay, state.usage)
        usage_new = _fair_start(usage_old, state.valid)
    else:
        usage_old = state.usage
        usage_new = torch.ones(b, h, dtype=usage_old.dtype, device=usage_old.device)

    if eviction == "fifo":
        dest = _fifo_destinations(step_new, rank, mask, n_written, m)[:, None, :].expand(b, h, n)
    elif eviction == "strength":
        dest = _priority_destinations(state, state.strength, g, step_new, rank, mask, n_written)
    else:  # usage
        prio_new = usage_new[:, :, None].expand(b, h, n)
        dest = _priority_destinations(state, usage_old, prio_new, step_new, rank, mask, n_written)

    if inplace:
        plan = _Plan(dest, g, step_new, usage_old, usage_new, n_written)
        return (_write_logged if records else _apply_in_place)(state, keys, values, plan)

    # For each slot, the token that lands there (or -1); destinations are unique except the
    # discard column m, which is dropped.
    token = torch.arange(n, device=keys.device).expand(b, h, n)
    writer = torch.full((b, h, m + 1), -1, dtype=torch.long, device=keys.device)
    writer = writer.scatter(-1, dest, token)[..., :m]
    hit = writer >= 0  # (b h m)
    src = writer.clamp_min(0)

    g_store = g.to(keys.dtype)[..., None]
    return MemoryState(
        keys=_scatter_rows(state.keys, dest, keys * g_store),
        values=_scatter_rows(state.values, dest, values * g_store),
        valid=state.valid | hit,
        strength=torch.where(hit, g.gather(2, src), state.strength),
        step=torch.where(hit, step_new[:, None, :].expand(b, h, n).gather(2, src), state.step),
        usage=torch.where(hit, usage_new[:, :, None], usage_old),
        count=state.count + n_written,
    )
