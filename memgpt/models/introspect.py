"""Memory introspection: what the stores hold, and what the memory layers do during a forward.

Shapes (einops notation, see docs/reference/index.md): ``b`` batch, ``h`` memory heads, ``n`` positions fed,
``m`` slots, ``c`` calls of a memory layer (one per segment, or per slab when streaming).

- :func:`memory_stats` reads a state: per layer, row and head, the fill level, evictions so far,
  the ages and write strengths of the stored slots (:class:`memgpt.memory.MemoryStats`).
- :func:`trace_memory` records a forward: ``with trace_memory(model) as trace: model(ids)``,
  then ``trace[i]`` is layer i's :class:`LayerTrace`: the write gate per position, the fusion
  gate's memory share per position, the read weight each slot received, and the store each
  segment read.

The trace is built on forward hooks of the memory layers' existing submodules (the writer, the
reader, the fusion gate's ``gate_proj``, and the enclosing block or layer for the token mask):
the forward itself is unchanged, the hooks exist only inside the ``with`` block, and a layer that
is not traced has no hook at all. Recorded tensors are detached copies on the model's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import overload

import torch
from torch import Tensor, nn

from ..layers import MemoryLayer
from ..memory import MemoryState, MemoryStats
from ..memory import memory_stats as store_stats
from .block import BlockState, MemGPTBlock
from .state import MemGPTState

__all__ = ["memory_stats", "trace_memory", "MemoryTrace", "LayerTrace"]


@overload
def memory_stats(state: MemGPTState) -> tuple[MemoryStats, ...]: ...
@overload
def memory_stats(state: MemoryState | BlockState) -> MemoryStats: ...
def memory_stats(state: MemoryState | BlockState | MemGPTState) -> MemoryStats | tuple[MemoryStats, ...]:
    """:class:`MemoryStats` of a store; of a block state's store; or one per layer of a model state.

    Pending writes of an unfinished segment (in the segment buffers) are not in the stores yet
    and are not counted. No host sync; the results carry no autograd graph.
    """
    if isinstance(state, MemGPTState):
        return tuple(store_stats(layer.memory) for layer in state.layers)
    if isinstance(state, BlockState):
        return store_stats(state.memory)
    if isinstance(state, MemoryState):
        return store_stats(state)
    raise TypeError(f"memory_stats expects a MemoryState, BlockState or MemGPTState, got {type(state).__name__}")


@dataclass(frozen=True, eq=False)
class LayerTrace:
    """What one memory layer did over the traced calls, positions in the order they were fed.

    Fields
        name:          the layer's module name in the traced model (e.g. ``blocks.0.memory``)
        write_gate:    (b h n) float32, the writer's gate ``g = sigmoid(W_g u + b_g)`` of every
                       fed position (the strength it is, or will be, stored with)
        present:       (b n) bool, the position holds a real token of that row (padding and the
                       unfed part of a row's slab are False: they are never written)
        memory_share:  (b n) float32, the fusion gate's share of memory, ``mean_d (1 - lambda)``:
                       ``x~ = lambda * u + (1 - lambda) * r``, so 0 keeps the local hidden state
                       (self-attention over the segment) and 1 replaces it with the memory read
        widths:        (c,) the number of positions of each call (sum = n)
        stores:        c :class:`MemoryStats`, the store as each call read it (before its writes)
        slot_weight:   (c b h m) float32 or None, per call the read weight ``beta`` each slot
                       received, averaged over that call's real tokens: sums to 1 over the slots
                       of a non-empty store, 0 for an empty one (with ``top_k``, over the slots
                       actually read). None when traced with ``slot_weights=False``.

    For a batch fed without padding from position 0 (one call, or streaming calls in lockstep)
    the n positions are exactly the tokens in order. With padding, the columns are the model's
    segment grid (see :class:`memgpt.MemGPTModel`): each row's real tokens are packed at its own
    positions, and ``present`` marks them.
    """

    name: str
    write_gate: Tensor
    present: Tensor
    memory_share: Tensor
    widths: tuple[int, ...]
    stores: tuple[MemoryStats, ...]
    slot_weight: Tensor | None = None

    @property
    def starts(self) -> tuple[int, ...]:
        """First position of each call (the column where ``stores[c]`` was read)."""
        out, at = [], 0
        for w in self.widths:
            out.append(at)
            at += w
        return tuple(out)


@dataclass
class _Recorder:
    """The chunks one memory layer produced, one per call (filled by the hooks)."""

    name: str
    layer: MemoryLayer
    slot_weights: bool
    mask: Tensor | None = None  # (b w) of the call in progress, set by the block/layer pre-hook
    gates: list[Tensor] = field(default_factory=list)
    presents: list[Tensor] = field(default_factory=list)
    shares: list[Tensor] = field(default_factory=list)
    stores: list[MemoryStats] = field(default_factory=list)
    weights: list[Tensor] = field(default_factory=list)

    # ---------------------------------------------------------------- hooks
    def on_block(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        view, mask = kwargs.get("view"), kwargs.get("mask")
        self.mask = view.present if view is not None else mask

    def on_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.mask = args[2] if len(args) > 2 else kwargs.get("mask")

    def on_read(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        x = args[0] if args else kwargs["x"]
        state = args[1] if len(args) > 1 else kwargs["state"]
        b, w, _ = x.shape
        mask = self.mask if self.mask is not None else torch.ones(b, w, dtype=torch.bool, device=x.device)
        self.mask = None
        self.presents.append(mask.detach().clone())
        with torch.no_grad():
            self.stores.append(store_stats(state))
            if self.slot_weights:
                total = self.layer.reader.usage(x.detach(), state, mask)  # (b h m): summed over the real tokens
                tokens = mask.sum(dim=1).clamp_min(1).to(total.dtype)
                self.weights.append((total / tokens[:, None, None]).float())

    def on_fusion_gate(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        with torch.no_grad():
            self.shares.append((1 - torch.sigmoid(output.detach().float())).mean(dim=-1))

    def on_write(self, module: nn.Module, args: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
        self.gates.append(output[2].detach().float().clone())

    # ---------------------------------------------------------------- result
    def result(self) -> LayerTrace:
        if not self.gates:
            raise ValueError(f"nothing was recorded for {self.name}: call the model inside the `with` block")
        counts = {len(self.gates), len(self.presents), len(self.shares), len(self.stores)}
        if len(counts) != 1:
            raise RuntimeError(
                f"{self.name}: the reader, fusion and writer ran a different number of times "
                f"(write gates {len(self.gates)}, reads {len(self.stores)}, fusions {len(self.shares)}); "
                "trace_memory follows MemoryLayer's read -> fuse -> write order"
            )
        return LayerTrace(
            name=self.name,
            write_gate=torch.cat(self.gates, dim=2),
            present=torch.cat(self.presents, dim=1),
            memory_share=torch.cat(self.shares, dim=1),
            widths=tuple(g.shape[2] for g in self.gates),
            stores=tuple(self.stores),
            slot_weight=torch.stack(self.weights) if self.slot_weights else None,
        )


class MemoryTrace:
    """A context manager that records what the memory layers of a model do (see :func:`trace_memory`).

    ``trace[i]`` / ``trace.layers`` give :class:`LayerTrace` s of the traced layers, in the order
    they were selected; ``trace.names`` their module names. Calls accumulate until :meth:`clear`.
    """

    def __init__(self, model: nn.Module, *, layers: Sequence[int] | None = None, slot_weights: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"trace_memory expects an nn.Module, got {type(model).__name__}")
        if not isinstance(slot_weights, bool):
            raise TypeError(f"slot_weights must be a bool, got {type(slot_weights).__name__}")
        found = [(name, m) for name, m in model.named_modules() if isinstance(m, MemoryLayer)]
        if not found:
            raise ValueError(f"trace_memory: {type(model).__name__} holds no MemoryLayer")
        layers = list(range(len(found))) if layers is None else list(layers)
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(found):
                raise ValueError(f"layers must be ints in [0, {len(found)}) (its memory layers), got {i!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must not repeat, got {layers}")
        self._model = model
        self._blocks = {id(m.memory): m for m in model.modules() if isinstance(m, MemGPTBlock)}
        self._recorders = [_Recorder(found[i][0] or "(root)", found[i][1], slot_weights) for i in layers]
        self._handles: list = []
        self._entered = False

    @property
    def names(self) -> tuple[str, ...]:
        """The traced memory layers' module names, in trace order."""
        return tuple(r.name for r in self._recorders)

    @property
    def layers(self) -> tuple[LayerTrace, ...]:
        """One :class:`LayerTrace` per traced memory layer, in trace order."""
        return tuple(r.result() for r in self._recorders)

    def __len__(self) -> int:
        return len(self._recorders)

    def __getitem__(self, i: int) -> LayerTrace:
        return self._recorders[i].result()

    def clear(self) -> None:
        """Forget what was recorded (the hooks stay while inside the ``with`` block)."""
        for r in self._recorders:
            for chunks in (r.gates, r.presents, r.shares, r.stores, r.weights):
                chunks.clear()
            r.mask = None

    def __enter__(self) -> MemoryTrace:
        if self._entered:
            raise RuntimeError("this MemoryTrace was already entered; make a new one with trace_memory(model)")
        self._entered = True
        for r in self._recorders:
            layer = r.layer
            block = self._blocks.get(id(layer))
            self._handles += [
                layer.register_forward_pre_hook(r.on_layer, with_kwargs=True),
                layer.reader.register_forward_hook(r.on_read, with_kwargs=True),
                layer.fusion.gate_proj.register_forward_hook(r.on_fusion_gate),
                layer.writer.register_forward_hook(r.on_write),
            ]
            if block is not None:
                self._handles.append(block.register_forward_pre_hook(r.on_block, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook (what was recorded stays readable)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def trace_memory(model: nn.Module, *, layers: Sequence[int] | None = None, slot_weights: bool = True) -> MemoryTrace:
    """Record the memory layers of ``model`` while inside ``with trace_memory(model) as trace:``.

    model: any module holding :class:`memgpt.MemoryLayer` s (a :class:`memgpt.MemGPTModel`, a
    block, a wrapped model, or one memory layer); ``layers``: indices into its memory layers in
    module order (default all; for a MemGPTModel index i is ``blocks[i]``); ``slot_weights``:
    also record the read weight per slot (one extra score computation per read, in no_grad).

    Works with whole-sequence and streaming calls alike (each call appends its positions), under
    autograd or not; costs nothing outside the ``with`` block, and nothing for layers not traced.
    """
    return MemoryTrace(model, layers=layers, slot_weights=slot_weights)
