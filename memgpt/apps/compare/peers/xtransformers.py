"""x-transformers as a Transformer-XL: ``TransformerWrapper`` over a causal ``Decoder``, carrying
the cached hidden states (``mems``) from segment to segment, as its README's "Transformer-XL
recurrence" section shows (``max_mem_len`` on the wrapper, ``rel_pos_bias=True`` on the decoder,
``return_mems=True`` and ``mems=`` on every call).

Configuration:

- ``max_seq_len = segment_len``: one call reads one segment, so self-attention over the call's own
  tokens spans the segment; every layer also attends to its memory;
- memory: ``max_mem_len = 32`` cached hidden states per layer (the inputs of that layer for the
  last 32 tokens, a FIFO), the same number of entries as memgpt's 32-slot store per layer; the
  memory is on every layer (x-transformers caches every attention layer's input);
- ``detach_mems=False``: the peer detaches its mems by default (truncating backpropagation at the
  segment); here gradients flow through them, as through every contender's state, so the runner's
  backpropagation through all segments of a sample reaches the peer's memory too;
- ``heads = shape.heads``, ``attn_dim_head = dim // heads``, ``depth = shape.depth``, everything
  else the library's defaults (pre-norm, GELU feed-forward x4, learned absolute positions within
  the segment plus the T5 relative position bias the README asks for).

x-transformers also offers ``num_memory_tokens`` (Memory Transformers): learned tokens that are
the same at every call, so nothing crosses a segment through them; they are not a recurrent memory
and get no contender here (the recurrent memory-token design is recurrent-memory-transformer-pytorch,
see ``rmt.py``).
"""

from __future__ import annotations

from torch import Tensor

from ..contender import Contender, ModelShape, detach_tree
from ._common import MEMORY_ENTRIES, installed, missing, refused

__all__ = ["PACKAGE", "build"]

PACKAGE = "x-transformers==2.31.10"


def build(shape: ModelShape) -> Contender | str:
    try:
        from x_transformers import Decoder, TransformerWrapper
    except Exception as err:  # noqa: BLE001 - any import failure means: this peer is missing
        return missing("x-transformers", err)
    config = dict(
        package=installed("x-transformers"),
        model="TransformerWrapper(Decoder) with Transformer-XL recurrence",
        dim=shape.dim,
        depth=shape.depth,
        heads=shape.heads,
        dim_head=shape.dim // shape.heads,
        max_seq_len=shape.segment_len,
        max_mem_len=MEMORY_ENTRIES,
        memory_layers="all",
        rel_pos_bias=True,
        detach_mems=False,
    )
    try:
        model = TransformerWrapper(
            num_tokens=shape.vocab_size,
            max_seq_len=shape.segment_len,
            max_mem_len=MEMORY_ENTRIES,
            attn_layers=Decoder(
                dim=shape.dim,
                depth=shape.depth,
                heads=shape.heads,
                attn_dim_head=shape.dim // shape.heads,
                rel_pos_bias=True,
            ),
        )
    except Exception as err:  # noqa: BLE001
        return refused("x-transformers", err)

    def step(ids: Tensor, mems: list[Tensor] | None) -> tuple[Tensor, list[Tensor]]:
        logits, mems = model(ids, mems=mems, return_mems=True, detach_mems=False)
        return logits, mems  # mems: depth x (b <=max_mem_len d)

    return Contender("xl", model, step, detach_tree, config=config)
