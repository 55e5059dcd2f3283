"""Autograd through in-place writes: a store that logs what it overwrites and rolls back in backward.

Why: for autograd, an out-of-place write must leave the store that earlier reads saw untouched,
so it copies the whole store: O(capacity) per write. Here a write goes into the store's own
tensors, O(tokens), and logs the rows it overwrites. Reads of the store record only its version.

Backward runs these ops in exact reverse order: every op consumes the previous op's *token* (a
0-dim tensor), so autograd cannot reach an op before the one after it. Then:

- a read rolls the store back to the version it saw, by swapping logged rows in place. It
  recomputes its scores (like activation checkpointing) and adds its store gradient into one
  store-sized accumulator;
- a write takes the gradient of the rows it wrote out of the accumulator, and zeroes them there:
  their old contents were invisible after the write;
- when backward ends, the store is rolled forward to its latest version again.

Costs and contract:
- Full reads on CPU run the flash kernel's forward and, in backward, its backward from the saved
  O(n) outputs (:mod:`memgpt.memory.folded`); other reads (top-k, CUDA) recompute in backward.
- Memory for backward is one store-sized accumulator plus O(tokens) of logs, instead of one store
  per write.
- Gradients flow through :func:`read` and :func:`write` only. The tensors of a logged state do not
  require grad; an op that would copy them under autograd (``clone``, ``reset_rows``, ...) raises
  instead of silently cutting the gradient.
- Changing the store's tensors by any other means before backward is detected, through their
  version counters, and raises in backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from .state import MemoryState

__all__ = ["StoreLog", "start_log", "logged_read", "logged_write", "carry_log"]


class _Entry:
    """One write: flat slot indices (r,) and the rows that are *not* in the store right now.

    Before the write is undone these are the rows it overwrote; after, the rows it wrote. A swap
    exchanges them with the store's, so undo and redo are the same operation.
    """

    __slots__ = ("slot", "rows")

    def __init__(self, slot: Tensor, rows: list[Tensor]) -> None:
        self.slot, self.rows = slot, rows


class StoreLog:
    """The write history of one store whose tensors are written in place under autograd."""

    def __init__(self, state: MemoryState) -> None:
        b, h, m, dk = state.keys.shape
        self.shape = (b, h, m)
        # The tensors a read depends on, flattened over (b h m): keys, values, strength, valid.
        self.flat = [
            state.keys.view(b * h * m, dk),
            state.values.view(b * h * m, state.value_dim),
            state.strength.view(-1),
            state.valid.view(-1),
        ]
        self.entries: list[_Entry] = []
        self.current = 0  # the version the tensors hold (version i = after i logged writes)
        self.token: Tensor | None = None  # output of the last recorded op: the next op's input
        self.grads: list[Tensor] | None = None  # store-gradient accumulator for keys, values, strength
        self._seen = self._versions()
        self._finish_queued = False

    @property
    def latest(self) -> int:
        return len(self.entries)

    def _versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in self.flat)

    def _check_untouched(self) -> None:
        if self._versions() != self._seen:
            raise RuntimeError(
                "the memory store was modified in place after this graph recorded it (by a later write "
                "into a detached or donated copy of the state, or a direct edit of its tensors); its "
                "logged writes can no longer be undone. Backward before writing into it again, or "
                "detach() and clone() the state first"
            )

    # ------------------------------------------------------------------ forward
    def record(self, slot: Tensor) -> None:
        """Log the rows at ``slot`` (r,) that the write about to happen will overwrite."""
        self.entries.append(_Entry(slot, [t.index_select(0, slot) for t in self.flat]))
        self.current = self.latest

    def settle(self) -> None:
        """After this log's own in-place forward ops: their version bumps are expected."""
        self._seen = self._versions()

    def advance(self, token: Tensor | None) -> None:
        if token is not None and token.requires_grad:
            self.token = token

    # ------------------------------------------------------------------ backward
    def checkout(self, version: int) -> None:
        """Swap logged rows until the tensors hold ``version`` (undo or redo, O(tokens) per write)."""
        self._check_untouched()
        while self.current > version:
            self.current -= 1
            self._swap(self.entries[self.current])
        while self.current < version:
            self._swap(self.entries[self.current])
            self.current += 1
        self.settle()

    def _swap(self, entry: _Entry) -> None:
        for i, t in enumerate(self.flat):
            held = t.index_select(0, entry.slot)
            t.index_copy_(0, entry.slot, entry.rows[i])
            entry.rows[i] = held

    def enter_backward(self) -> None:
        """Called by each op's backward: once per backward pass, restore the latest version after it."""
        if not self._finish_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
            self._finish_queued = True

    def _finish_backward(self) -> None:
        self._finish_queued = False
        self.grads = None
        self.checkout(self.latest)

    def accumulate(self, grads: list[Tensor | None]) -> None:
        """Add a read's gradient wrt keys, values, strength (b h m ...) into the accumulator."""
        if self.grads is None:
            self.grads = [torch.zeros_like(t) for t in self.flat[:3]]
        for acc, g in zip(self.grads, grads):
            if g is not None:
                acc.add_(g.reshape(acc.shape))

    def take(self, slot: Tensor) -> list[Tensor] | None:
        """The accumulated gradient of the rows at ``slot`` (r,), zeroed in the accumulator."""
        if self.grads is None:
            return None
        rows = [g.index_select(0, slot) for g in self.grads]
        for g in self.grads:
            g.index_fill_(0, slot, 0)
        return rows


def _attach(state: MemoryState, log: StoreLog) -> MemoryState:
    object.__setattr__(state, "_log", log)
    object.__setattr__(state, "_version", log.current)
    return state


def _token_grad(token: Tensor | None) -> Tensor | None:
    return None if token is None else torch.zeros_like(token)


class _Adopt(Function):
    """Starts a chain on a copy of a store that requires grad; its backward hands the accumulated
    store gradient to the original tensors."""

    @staticmethod
    def forward(ctx, log: StoreLog, keys: Tensor, values: Tensor, strength: Tensor) -> Tensor:
        ctx.log = log
        ctx.dtypes = (keys.dtype, values.dtype, strength.dtype)
        return keys.new_zeros(())

    @staticmethod
    @once_differentiable
    def backward(ctx, _token_grad_out: Tensor):
        log = ctx.log
        log.enter_backward()
        b, h, m = log.shape
        if log.grads is None:
            return None, None, None, None
        gk, gv, gs = log.grads
        log.grads = None  # the chain's first op: nothing adds to it after this
        k_dt, v_dt, s_dt = ctx.dtypes
        return None, gk.view(b, h, m, -1).to(k_dt), gv.view(b, h, m, -1).to(v_dt), gs.view(b, h, m).to(s_dt)


def start_log(state: MemoryState) -> MemoryState:
    """A state whose in-place writes autograd can differentiate (see the module doc); ``state`` is donated.

    Call it before the chain's first read. The store is ``state``'s own tensors, unless they
    require grad or are not contiguous: then they are copied once, and the gradient reaches them
    through the copy. (If some other graph saved them for its backward, PyTorch raises when that
    graph runs backward.) A state that already has a log is returned as it is.
    :func:`memgpt.memory.write` starts a log itself on the first in-place write under autograd,
    with a copy, since a plain read before it may have saved the tensors.
    """
    if getattr(state, "_log", None) is not None:
        return state
    return _start(state, copy=False)


def _start(state: MemoryState, *, copy: bool) -> MemoryState:
    state.check_live()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (state.keys, state.values, state.strength))
    if copy or needs_grad or not state.is_contiguous():
        with torch.no_grad():
            own = state._map(lambda t: t.detach().clone(memory_format=torch.contiguous_format))
    else:
        own = state.replace()
    log = StoreLog(own)
    if needs_grad:
        log.advance(_Adopt.apply(log, state.keys, state.values, state.strength))
    state._donate()
    return _attach(own, log)


class _LoggedRead(Function):
    @staticmethod
    def forward(ctx, log: StoreLog, token: Tensor | None, q: Tensor, state: MemoryState, fn: Callable, split):
        ctx.log, ctx.version, ctx.state, ctx.fn, ctx.split = log, log.current, state, fn, split
        ctx.has_token = token is not None
        ctx.save_for_backward(q)
        if split is None:
            return fn(q, state), q.new_zeros(())
        out, ctx.split_saved = split.forward(q, state)  # O(n) tensors, none of the store's
        return out, q.new_zeros(())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, _token_grad_out: Tensor):
        log, state = ctx.log, ctx.state
        (q,) = ctx.saved_tensors
        log.enter_backward()
        log.checkout(ctx.version)
        token_grad = torch.zeros((), dtype=q.dtype, device=q.device) if ctx.has_token else None
        if ctx.split is not None:  # the kernel's own backward from the saved forward: no recompute
            dq, *store_grads = ctx.split.backward(ctx.split_saved, state, grad_out)
            log.accumulate(store_grads)
            return None, token_grad, dq, None, None, None
        with torch.enable_grad():
            leaves = [
                q.detach().requires_grad_(),
                state.keys.detach().requires_grad_(),
                state.values.detach().requires_grad_(),
                state.strength.detach().requires_grad_(),
            ]
            shadow = MemoryState(
                keys=leaves[1],
                values=leaves[2],
                valid=state.valid,
                strength=leaves[3],
                step=state.step,
                usage=state.usage,
                count=state.count,
            )
            out = ctx.fn(leaves[0], shadow)
            grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
        log.accumulate(list(grads[1:]))
        return None, token_grad, grads[0], None, None, None


def logged_read(q: Tensor, state: MemoryState, fn: Callable[[Tensor, MemoryState], Tensor], split=None) -> Tensor:
    """``fn(q, state)`` (a plain read) with its backward done through the store's log.

    q: (b h n dk) -> (b h n dv). ``split``, if given, computes the same read as a forward that
    saves O(n) tensors (``split.forward(q, state) -> (out, saved)``) and a backward from them
    (``split.backward(saved, state, grad_out) -> (dq, dkeys, dvalues, dstrength)``); without it
    backward recomputes ``fn`` under autograd.
    """
    log = _log_of(state, "logged_read")
    _check_at_version(state, log)
    out, token = _LoggedRead.apply(log, log.token, q, state, fn, split)
    log.advance(token)
    return out


class _LoggedWrite(Function):
    @staticmethod
    def forward(
        ctx,
        log: StoreLog,
        token: Tensor | None,
        keys: Tensor,
        values: Tensor,
        g: Tensor,
        slot: Tensor,
        src: Tensor,
        apply: Callable,
    ):
        log.record(slot)
        apply()
        log.settle()
        ctx.log, ctx.has_token = log, token is not None
        ctx.save_for_backward(keys, values, g, slot, src)
        return keys.new_zeros(())

    @staticmethod
    @once_differentiable
    def backward(ctx, _token_grad_out: Tensor):
        log = ctx.log
        keys, values, g, slot, src = ctx.saved_tensors
        log.enter_backward()
        token_grad = torch.zeros((), dtype=keys.dtype, device=keys.device) if ctx.has_token else None
        rows = log.take(slot)
        if rows is None:  # no read after this write was differentiated
            return None, token_grad, None, None, None, None, None, None
        d_keys, d_values, d_strength = rows  # (r dk), (r dv), (r,): gradient of the stored g*k, g*v, g
        b, h, n, dk = keys.shape
        every = src.numel() == b * h * n  # every token landed (no padding, no overflow): no gather/scatter

        def landed(t: Tensor) -> Tensor:  # (b h n ...) -> (r ...), the tokens that landed
            flat = t.reshape(b * h * n, *t.shape[3:])
            return flat if every else flat.index_select(0, src)

        def spread(rows: Tensor, like: Tensor) -> Tensor:  # (r ...) -> (b h n ...), zeros elsewhere
            if every:
                return rows.view_as(like)
            full = like.new_zeros((b * h * n, *like.shape[3:]))
            return full.index_copy_(0, src, rows).view_as(like)

        g_store = landed(g).to(keys.dtype)[:, None]
        dg = (d_keys * landed(keys)).sum(-1).to(g.dtype) + (d_values * landed(values)).sum(-1).to(g.dtype)
        dg = dg + d_strength.to(g.dtype)
        grads = spread(d_keys * g_store, keys), spread(d_values * g_store, values), spread(dg, g)
        return None, token_grad, *grads, None, None, None


def logged_write(
    state: MemoryState,
    keys: Tensor,
    values: Tensor,
    g: Tensor,
    slot: Tensor,
    src: Tensor,
    apply: Callable[[MemoryState], MemoryState],
) -> MemoryState:
    """Write in place into a logged store (starting its log, with one copy, if it has none).

    keys (b h n dk), values (b h n dv), g (b h n): the write's inputs; ``slot`` (r,): flat
    (b h m) slots written, ``src`` (r,): flat (b h n) token of each; ``apply(state)`` performs the
    write in place on ``state``'s tensors and returns the new state.
    """
    if state._log is None:
        state = _start(state, copy=True)
    log = _log_of(state, "logged_write")
    _check_at_version(state, log)
    result: list[MemoryState] = []
    token = _LoggedWrite.apply(log, log.token, keys, values, g, slot, src, lambda: result.append(apply(state)))
    log.advance(token)
    return _attach(result[0], log)


def carry_log(old: MemoryState, new: MemoryState) -> MemoryState:
    """``new`` (``old`` with only usage/step/count replaced, sharing the logged tensors) joins old's log."""
    return new if old._log is None else _attach(new, _log_of(old, "carry_log"))


def _log_of(state: MemoryState, caller: str) -> StoreLog:
    """The write log of ``state`` (a logged store), or RuntimeError if it has none."""
    log = state._log
    if not isinstance(log, StoreLog):
        raise RuntimeError(f"{caller} needs a memory state written in place under autograd (see start_log)")
    return log


def _check_at_version(state: MemoryState, log: StoreLog) -> None:
    if state._version != log.current or log.current != log.latest:
        raise RuntimeError(
            f"this logged memory state is at version {state._version} but its store holds version "
            f"{log.current} of {log.latest}: a state of the chain can only be used while it is the latest"
        )
    log._check_untouched()
