"""block-recurrent-transformer-pytorch: ``BlockRecurrentTransformer``, carrying its recurrent
states and XL memories from segment to segment, as its README shows
(``out, mems, states = model(seq, xl_memories=mems, states=states)``).

Configuration:

- ``block_width = segment_len``: each block is one segment; its attention spans the block and the
  previous block's keys/values (the peer's XL memory, one block per layer, as it is designed);
- recurrent state: ``num_state_vectors = 32`` (the same number of entries as memgpt's 32-slot
  store; the README uses one block's worth), on the peer's default recurrent layer
  (``depth // 2``, layer 1 of 2), read and written by that layer at every block with the paper's
  fixed simple (EMA) gate;
- ``heads = shape.heads``, ``dim_head = dim // heads`` rounded down to an even number (its rotary
  positions need one), ``depth = shape.depth``; everything else the
  library's defaults (rotary positions, qk-RMSNorm on the recurrent layer, GEGLU feed-forward x4).

How it is fed: the peer detaches the states and memories it returns; gradients cross blocks only
inside one call, over up to ``max_seq_len`` tokens (its ``RecurrentTrainerWrapper`` trains that
way). So that the runner's backpropagation through all segments of a training sample (up to 9)
reaches the recurrent state, ``max_seq_len = 9 * segment_len`` and, with gradients on, the adapter
keeps the current window's tokens and re-runs the model from the window's start (with the states
carried into the window) at every segment, returning the last block's logits; at the window's end
it takes the returned states and starts a new window. Under ``torch.no_grad()`` (evaluation) it
runs one block per call with ``return_memories_and_states=True``, which gives the same numbers at a
fixed cost per segment. ``detach`` closes an open window (one no-grad call over it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..contender import Contender, ModelShape
from ._common import MEMORY_ENTRIES, even_dim_head, installed, missing, refused

__all__ = ["PACKAGE", "WINDOW_SEGMENTS", "BlockRecurrentState", "build"]

PACKAGE = "block-recurrent-transformer-pytorch==0.4.4"
WINDOW_SEGMENTS = 9  # the runner's longest training sample: backpropagation reaches all of it


@dataclass
class BlockRecurrentState:
    """The states and XL memories at the start of the open window, and the window's tokens."""

    xl_memories: list[Tensor] = field(default_factory=list)  # per layer: (2 b w dh)
    states: list[Tensor] = field(default_factory=list)  # per recurrent layer: (b m d)
    window: Tensor | None = None  # (b n) ids fed since the window opened, n < max_seq_len


def build(shape: ModelShape) -> Contender | str:
    try:
        from block_recurrent_transformer_pytorch import BlockRecurrentTransformer
    except Exception as err:  # noqa: BLE001 - any import failure means: this peer is missing
        return missing("block-recurrent-transformer-pytorch", err)
    dim_head = even_dim_head(shape.dim, shape.heads)
    T = shape.segment_len
    config = dict(
        package=installed("block-recurrent-transformer-pytorch"),
        model="BlockRecurrentTransformer",
        dim=shape.dim,
        depth=shape.depth,
        heads=shape.heads,
        dim_head=dim_head,
        block_width=T,
        max_seq_len=WINDOW_SEGMENTS * T,
        num_state_vectors=MEMORY_ENTRIES,
        recurrent_layers=(max(1, shape.depth // 2),),
        xl_memories="previous block, every layer",
        fed="with grad: window of 9 segments re-run from its start; no grad: one block per call",
    )
    try:
        model = BlockRecurrentTransformer(
            num_tokens=shape.vocab_size,
            dim=shape.dim,
            depth=shape.depth,
            dim_head=dim_head,
            heads=shape.heads,
            max_seq_len=WINDOW_SEGMENTS * T,
            block_width=T,
            num_state_vectors=MEMORY_ENTRIES,
            recurrent_layers=(max(1, shape.depth // 2),),
        )
    except Exception as err:  # noqa: BLE001
        return refused("block-recurrent-transformer-pytorch", err)

    def run(ids: Tensor, state: BlockRecurrentState) -> tuple[Tensor, Any, Any]:
        return model(ids, xl_memories=state.xl_memories, states=state.states, return_memories_and_states=True)

    def step(ids: Tensor, state: BlockRecurrentState | None) -> tuple[Tensor, BlockRecurrentState]:
        state = state or BlockRecurrentState()
        if ids.shape[1] != T:
            raise ValueError(f"block-recurrent: segments must have {T} tokens, got {ids.shape[1]}")
        window = ids if state.window is None else torch.cat((state.window, ids), dim=1)  # (b n)
        logits, xl, states = run(window, state)
        if not torch.is_grad_enabled() or window.shape[1] == WINDOW_SEGMENTS * T:
            return logits[:, -T:], BlockRecurrentState(xl, states)  # the window closes here
        return logits[:, -T:], BlockRecurrentState(state.xl_memories, state.states, window)

    def detach(state: BlockRecurrentState | None) -> BlockRecurrentState | None:
        if state is None or state.window is None:
            return state  # the peer returns its states detached already
        with torch.no_grad():
            _, xl, states = run(state.window, state)
        return BlockRecurrentState(xl, states)

    return Contender("block-recurrent", model, step, detach, config=config)
