"""The peer libraries' blocks, built as their own models build them, or a reason they are missing.

Each builder returns the block or a string saying why it cannot be built (the peers are the
optional ``bench`` extra; a benchmark without them prints the reason and goes on).

- x-transformers: ``Decoder(depth=1)``, one causal attention layer (flash) and one FFN, pre-norm.
- memorizing-transformers-pytorch: ``PreNormResidual(KNNAttention)`` then ``PreNormResidual(FeedForward)``,
  as ``MemorizingTransformer`` stacks them for a memorizing layer, with a ``KNNMemory`` per layer
  (one faiss HNSW index per batch row on the host, keys/values in a numpy memmap). The T5
  relative-position bias the full model adds is left out (less work for the peer).
- infini-transformer-pytorch: ``CausalAttention`` (with its compressive memory) then
  ``FeedForward``, residuals around each, as ``InfiniTransformer`` stacks them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _missing(package: str, err: Exception) -> str:
    return f"{package} is not installed ({type(err).__name__}: {err}); pip install -e '.[bench]'"


def xtransformers_block(dim: int, heads: int) -> nn.Module | str:
    """y = block(x (b n d)), causal."""
    try:
        from x_transformers import Decoder
    except Exception as err:  # noqa: BLE001 - any import failure means: skip this peer
        return _missing("x-transformers", err)
    return Decoder(dim=dim, depth=1, heads=heads, attn_dim_head=dim // heads, attn_flash=True)


def knn_block(dim: int, heads: int, num_retrieved: int) -> nn.Module | str:
    """y = block(x (b n d), knn_memory): searches the memory, then adds this call's keys/values to it."""
    try:
        from memorizing_transformers_pytorch.memorizing_transformers_pytorch import (
            FeedForward,
            KNNAttention,
            PreNormResidual,
        )
    except Exception as err:  # noqa: BLE001
        return _missing("memorizing-transformers-pytorch (pip install --no-deps) and faiss-cpu", err)

    class KNNBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            attn = KNNAttention(dim=dim, heads=heads, dim_head=dim // heads, num_retrieved_memories=num_retrieved)
            self.attn = PreNormResidual(dim, attn)
            self.ff = PreNormResidual(dim, FeedForward(dim=dim))

        def forward(self, x: Tensor, knn_memory) -> Tensor:
            x, _ = self.attn(x, knn_memory=knn_memory)
            return self.ff(x)

    return KNNBlock()


def knn_memory(dim_head: int, capacity: int, batch_size: int, path: str):
    """The peer's KNNMemory, as MemorizingTransformer creates it (no multiprocessing)."""
    from memorizing_transformers_pytorch.knn_memory import KNNMemory

    return KNNMemory(
        dim_head, max_memories=capacity, num_indices=batch_size, memmap_filename=path, multiprocessing=False
    )


def fill_knn_memory(memory, keys: Tensor, values: Tensor) -> None:
    """Clear and refill every row: keys, values (b m dh), keys l2-normalised as the layer stores them."""
    memory.clear()
    memory.add(torch.stack([nn.functional.normalize(keys, dim=-1), values], dim=2))


def infini_block(dim: int, heads: int) -> nn.Module | str:
    """y, memories = block(x (b n d), memories): one segment, reading and updating the compressive memory."""
    try:
        from infini_transformer_pytorch.infini_transformer import CausalAttention, FeedForward
    except Exception as err:  # noqa: BLE001
        return _missing("infini-transformer-pytorch", err)

    class InfiniBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = CausalAttention(dim, dim_head=dim // heads, heads=heads)
            self.ff = FeedForward(dim)

        def forward(self, x: Tensor, memories=None):
            a, _, memories = self.attn(x, past_memories=memories, return_new_memories=True)
            x = x + a
            return x + self.ff(x), memories

    return InfiniBlock()
