"""The MemGPT decoder block: pre-norm attention, a memory layer, then the feed-forward network.

    h  = x + SelfAttention(Norm(x))          causal, within the current segment
    u  = Norm(h)
    h' = h + (Fusion(u, Read(u, M)) - u)     the fused u replaces u on the residual stream
    M' = Write(u, M)                         visible to the next segment only
    y  = h' + FFN(Norm(h'))

A block processes a *slab*: ``w`` consecutive positions ``[start, start + w)`` of the current
segment (of ``segment_len`` = T positions). Positions before ``start`` that earlier calls
already fed live in the state's :class:`SegmentBuffer` (their attention keys/values and their
pending memory writes); the pending writes are flushed into memory when the segment completes.
Called without a :class:`SegmentView`, ``x`` is one whole segment: attend within it, read, then
write all of it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..layers import FeedForward, MemoryLayer, MultiHeadAttention
from ..layers._validation import check_input, check_token_mask, positive_int
from ..memory import MemoryState
from ..memory.state import metadata_dtype

__all__ = ["MemGPTBlock", "BlockState", "SegmentBuffer", "SegmentView"]


@dataclass(frozen=True, eq=False)
class SegmentBuffer:
    """What a block keeps of the current, unfinished segment (T = segment_len positions).

    Fields
        attn_keys, attn_values: (b h T dh)   self-attention keys/values
        keys, values:           (b hm T dk), (b hm T dv)  writer outputs waiting for the flush
        strength:               (b hm T)     their write gates

    Which positions are filled is not stored here: the model derives it from its token count.
    """

    attn_keys: Tensor
    attn_values: Tensor
    keys: Tensor
    values: Tensor
    strength: Tensor

    def map(self, fn) -> SegmentBuffer:
        """Apply ``fn`` to every field (each has the batch as its first dimension)."""
        return SegmentBuffer(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})


@dataclass(frozen=True, eq=False)
class BlockState:
    """One block's state: its memory store and, in streaming use, the unfinished segment."""

    memory: MemoryState
    buffer: SegmentBuffer | None = None

    def map(self, fn) -> BlockState:
        """Apply ``fn`` to every tensor whose first dimension is the batch."""
        mem = self.memory._map(fn)
        return BlockState(mem, None if self.buffer is None else self.buffer.map(fn))


class SegmentView(NamedTuple):
    """Where a slab sits in the current segment (built by the model, shared by all blocks).

    Fields
        start:    first in-segment position of the slab (python int)
        present:  (b w) bool, the slab positions that hold a real token of this call
        filled:   (b T) bool, positions already fed by earlier calls (their data is in the buffer)
        flush:    (b,) bool, rows whose segment completes with this slab
        cached:   python bool, whether any row has filled positions (else the buffer is skipped)
        flushing: python bool, whether any row flushes (else the memory write is skipped)
    """

    start: int
    present: Tensor
    filled: Tensor
    flush: Tensor
    cached: bool
    flushing: bool


def _place(buffer: Tensor, fresh: Tensor, present: Tensor, start: int) -> Tensor:
    """Write ``fresh`` (b c w ...) into positions [start, start+w) of ``buffer`` (b c T ...) where present (b w)."""
    w, T = fresh.shape[2], buffer.shape[2]
    keep = present[:, None, :].reshape(present.shape[0], 1, w, *([1] * (fresh.dim() - 3)))
    middle = torch.where(keep, fresh.to(buffer.dtype), buffer[:, :, start : start + w])
    return torch.cat([buffer[:, :, :start], middle, buffer[:, :, start + w : T]], dim=2)


class MemGPTBlock(nn.Module):
    """Pre-norm decoder block with a memory layer between attention and the FFN.

    The memory layer is built by the caller and injected (``MemGPTBlock(dim, heads,
    MemoryLayer(dim, capacity=...))``), so its settings live in one place.
    ``y, state = block(x, state, mask=mask)``: x (b n d) is one segment; state a BlockState or
    None (empty memory). The model drives streaming through ``view=SegmentView(...)``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        memory: MemoryLayer,
        *,
        ffn_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = positive_int("dim", dim)
        if not isinstance(memory, MemoryLayer):
            raise TypeError(f"memory must be a MemoryLayer, got {type(memory).__name__}")
        if memory.dim != dim:
            raise ValueError(f"memory layer width must equal the block's dim {dim}, got {memory.dim}")
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, dropout=dropout)
        self.memory_norm = nn.LayerNorm(dim)
        self.memory = memory
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout=dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def empty_state(
        self,
        batch_size: int,
        segment_len: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> BlockState:
        """Empty memory; with ``segment_len``, also an empty segment buffer for streaming."""
        memory = self.memory.empty_state(batch_size, device=device, dtype=dtype)
        if segment_len is None:
            return BlockState(memory)
        b, T = batch_size, positive_int("segment_len", segment_len)
        a, r = self.attn, self.memory.reader
        z = lambda *shape: torch.zeros(*shape, device=memory.device, dtype=memory.dtype)  # noqa: E731
        buffer = SegmentBuffer(
            attn_keys=z(b, a.heads, T, a.head_dim),
            attn_values=z(b, a.heads, T, a.head_dim),
            keys=z(b, r.heads, T, r.key_dim),
            values=z(b, r.heads, T, r.value_dim),
            strength=torch.zeros(b, r.heads, T, device=memory.device, dtype=metadata_dtype(memory.dtype)),
        )
        return BlockState(memory, buffer)

    def _attention_mask(self, view: SegmentView | None, present: Tensor, w: int, mask: Tensor | None) -> Tensor | None:
        """(b w s) bool: query i may attend key j (s = w, or T + w with the buffer in front)."""
        if view is None and mask is None:
            return None  # plain causal: SDPA's is_causal fast path
        if view is None and mask is not None and not torch.compiler.is_compiling() and bool(mask.all()):
            return None  # the same, found by a host check (a data-dependent branch breaks fullgraph compiles)
        device = present.device
        start = 0 if view is None else view.start
        pos = torch.arange(start, start + w, device=device)
        causal = pos[None, :] <= pos[:, None]  # (w w): key j at or before query i
        # A query always sees itself, so that no row is fully masked (absent queries are discarded).
        allowed = (present[:, None, :] & causal) | torch.eye(w, dtype=torch.bool, device=device)
        if view is not None and view.cached:
            T = view.filled.shape[1]
            past = torch.arange(T, device=device)[None, :] <= pos[:, None]  # (w T)
            allowed = torch.cat([view.filled[:, None, :] & past, allowed], dim=-1)
        return allowed

    def forward(
        self,
        x: Tensor,
        state: BlockState | None = None,
        *,
        mask: Tensor | None = None,
        view: SegmentView | None = None,
        inplace_memory: bool = False,
    ) -> tuple[Tensor, BlockState]:
        """x: (b w d); mask: (b w) bool, True = real token (whole-segment use only).

        Returns y (b w d) and the new BlockState. ``inplace_memory=True`` writes into the given
        state's memory tensors instead of a copy, logged under autograd (see :func:`memgpt.memory.write`).
        """
        check_input("x", x, self.dim)
        b, w, _ = x.shape
        if view is not None:
            if mask is not None:
                raise ValueError("pass either mask (whole-segment use) or view (streaming), not both")
            if state is None or state.buffer is None:
                raise ValueError("streaming (view=...) needs a state with a SegmentBuffer")
            present = view.present
        else:
            if mask is not None:
                check_token_mask(mask, b, w, x.device)
            present = mask if mask is not None else torch.ones(b, w, dtype=torch.bool, device=x.device)
        if state is None:
            state = self.empty_state(b, device=x.device, dtype=x.dtype)
        elif not isinstance(state, BlockState):
            raise TypeError(f"state must be a BlockState or None, got {type(state).__name__}")
        self.memory.check_state(state.memory, b, x.device)
        memory, buffer = state.memory, state.buffer

        # Self-attention within the segment (and over the buffered part of it).
        q, k, v = self.attn.project(self.attn_norm(x))
        allowed = self._attention_mask(view, present, w, mask)
        if view is not None and view.cached:
            assert buffer is not None  # streaming: checked on entry
            keys = torch.cat([buffer.attn_keys.to(k.dtype), k], dim=2)
            values = torch.cat([buffer.attn_values.to(v.dtype), v], dim=2)
        else:
            keys, values = k, v
        h = x + self.resid_dropout(self.attn.attend(q, keys, values, allowed))

        # Memory: read the store as it was before this segment, fuse, queue or make the writes.
        u = self.memory_norm(h)
        fused, memory = self.memory.read(u, memory, mask=present)
        h = h + (fused - u)
        new_keys, new_values, new_strength = self.memory.writer(u)
        if view is None:
            memory = self.memory.store(new_keys, new_values, new_strength, memory, mask=present, inplace=inplace_memory)
        else:
            assert buffer is not None  # streaming: checked on entry
            start = view.start
            buffer = SegmentBuffer(
                attn_keys=_place(buffer.attn_keys, k, present, start),
                attn_values=_place(buffer.attn_values, v, present, start),
                keys=_place(buffer.keys, new_keys, present, start),
                values=_place(buffer.values, new_values, present, start),
                strength=_place(buffer.strength, new_strength, present, start),
            )
            if view.flushing:  # an out-of-place write is O(capacity): skip it while no row flushes
                slab = torch.zeros_like(view.filled)
                slab[:, start : start + w] = present
                flush = (view.filled | slab) & view.flush[:, None]  # (b T)
                memory = self.memory.store(
                    buffer.keys, buffer.values, buffer.strength, memory, mask=flush, inplace=inplace_memory
                )

        y = h + self.resid_dropout(self.ffn(self.ffn_norm(h)))
        return y, BlockState(memory, buffer)
