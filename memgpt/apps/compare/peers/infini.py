"""infini-transformer-pytorch: ``InfiniTransformer``, carrying each layer's compressive memory
from segment to segment, as its wrapper (``InfiniTransformerWrapper.forward``) does
(``logits, _, past_memories = model(segment, past_memories=past_memories, return_new_memories=True)``).

Configuration:

- one call reads one segment: causal softmax attention over the segment's tokens, plus a linear-
  attention read of the layer's compressive memory, gated per head; the call then adds the
  segment's keys and values to the memory;
- memory: on every layer (the peer has no per-layer switch), one ``(dim_head x dim_head)``
  key-value matrix and a ``dim_head`` normaliser per head, so a fixed size however long the stream;
  ``use_mem_delta_rule = True`` as the README's examples set it;
- gradients flow through the memories from segment to segment (``detach_memories`` left off);
- ``heads = shape.heads``, ``dim_head = dim // heads`` rounded down to an even number (its rotary
  positions need one), ``depth = shape.depth``; everything else the library's defaults (rotary
  positions within the segment, feed-forward x4, memory gates initialised at sigmoid(10), so an
  untrained model barely reads its memory).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..contender import Contender, ModelShape
from ._common import even_dim_head, installed, missing, refused

__all__ = ["PACKAGE", "build"]

PACKAGE = "infini-transformer-pytorch==0.2.1"


def _detach(memories: list[Any] | None) -> list[Any] | None:
    # the peer's Memories is a NamedTuple (kv (b h dk dv), norm (b h dk)): rebuild it field by field
    if memories is None:
        return None
    return [type(m)(*(t.detach() for t in m)) for m in memories]


def build(shape: ModelShape) -> Contender | str:
    try:
        from infini_transformer_pytorch import InfiniTransformer
    except Exception as err:  # noqa: BLE001 - any import failure means: this peer is missing
        return missing("infini-transformer-pytorch", err)
    dim_head = even_dim_head(shape.dim, shape.heads)
    config = dict(
        package=installed("infini-transformer-pytorch"),
        model="InfiniTransformer",
        dim=shape.dim,
        depth=shape.depth,
        heads=shape.heads,
        dim_head=dim_head,
        memory="per layer and head: (dim_head x dim_head) key-value matrix + dim_head normaliser",
        memory_layers="all",
        use_mem_delta_rule=True,
    )
    try:
        model = InfiniTransformer(
            num_tokens=shape.vocab_size,
            dim=shape.dim,
            depth=shape.depth,
            dim_head=dim_head,
            heads=shape.heads,
            use_mem_delta_rule=True,
        )
    except Exception as err:  # noqa: BLE001
        return refused("infini-transformer-pytorch", err)

    def step(ids: Tensor, memories: list[Any] | None) -> tuple[Tensor, list[Any]]:
        logits, _, memories = model(ids, past_memories=memories, return_new_memories=True)
        return logits, memories

    return Contender("infini", model, step, _detach, config=config)
