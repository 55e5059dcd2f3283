"""recurrent-memory-transformer-pytorch: ``RecurrentMemoryTransformer``, carrying its memory tokens
from segment to segment, as its README's first example shows
(``logits, mem, _ = model(x, mem)``).

Configuration:

- ``seq_len = segment_len``, ``causal = True``: one call reads one segment, with ``num_memory_tokens``
  read-memory tokens before it and as many write-memory tokens after it; the write tokens' outputs
  are the next segment's read memory;
- memory: ``num_memory_tokens = 32`` vectors of width ``dim`` (the same number of entries as
  memgpt's 32-slot store), written by the last layer and read by every layer of the next call;
- ``use_xl_memories = False``: the peer can also cache the previous segment's hidden states
  (Transformer-XL style, on by default in the constructor but absent from the README's first
  example); that would widen every call's attention beyond its segment, so it is off and the memory
  tokens are the only thing that crosses a segment; gradients flow through the memory tokens from
  segment to segment (the peer does not detach them);
- ``heads = shape.heads``, ``dim_head = dim // heads``, ``depth = shape.depth``; everything else the
  library's defaults (absolute positions, 4 hyper-connection residual streams, feed-forward x4).
"""

from __future__ import annotations

from torch import Tensor

from ..contender import Contender, ModelShape, detach_tree
from ._common import MEMORY_ENTRIES, installed, missing, refused

__all__ = ["PACKAGE", "build"]

PACKAGE = "recurrent-memory-transformer-pytorch==0.7.0"


def build(shape: ModelShape) -> Contender | str:
    try:
        from recurrent_memory_transformer_pytorch import RecurrentMemoryTransformer
    except Exception as err:  # noqa: BLE001 - any import failure means: this peer is missing
        return missing("recurrent-memory-transformer-pytorch", err)
    config = dict(
        package=installed("recurrent-memory-transformer-pytorch"),
        model="RecurrentMemoryTransformer",
        dim=shape.dim,
        depth=shape.depth,
        heads=shape.heads,
        dim_head=shape.dim // shape.heads,
        seq_len=shape.segment_len,
        num_memory_tokens=MEMORY_ENTRIES,
        use_xl_memories=False,
        causal=True,
    )
    try:
        model = RecurrentMemoryTransformer(
            shape.dim,
            num_tokens=shape.vocab_size,
            depth=shape.depth,
            num_memory_tokens=MEMORY_ENTRIES,
            seq_len=shape.segment_len,
            causal=True,
            dim_head=shape.dim // shape.heads,
            heads=shape.heads,
            use_xl_memories=False,
        )
    except Exception as err:  # noqa: BLE001
        return refused("recurrent-memory-transformer-pytorch", err)

    def step(ids: Tensor, memories: Tensor | None) -> tuple[Tensor, Tensor]:
        logits, memories, _ = model(ids, memories)
        return logits, memories  # memories: (b m d)

    return Contender("rmt", model, step, detach_tree, config=config)
