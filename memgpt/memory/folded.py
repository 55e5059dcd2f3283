"""The full read with the slot bias folded into the keys, for training on CPU.

``[scale*q, 1] . [k, bias] = scale*q.k + bias``: the same scores with no ``attn_mask``. Why: on
CPU, a float mask that needs a gradient sends SDPA to its unfused *math* path, which builds the
n x m weights and then differentiates them. Without a mask, the fused flash kernel runs both
forward and backward, and the bias gradient comes back as the keys' extra column. Flash needs q, k
and v to share one width, so all three are zero-padded to ``max(dk + 1, dv)``.

Two ways to use it:

- :func:`folded_attention`: plain autograd, for reads of an ordinary store.
- :func:`flash_forward` / :func:`flash_backward`: the kernel's forward and backward called
  apart, for reads of a logged store (:mod:`memgpt.memory.reversible`). The forward keeps only
  O(n) tensors (the folded queries, the output and its log-sum-exp). The backward rebuilds the
  folded keys and values from the store, once it has been rolled back to the version the read
  saw. No second forward pass is needed.

The split uses PyTorch's CPU flash-attention ops (``aten._scaled_dot_product_flash_attention_for_cpu``
and its backward); :data:`HAS_FLASH_SPLIT` is False where they are missing, and the logged read
then recomputes instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .state import MemoryState

__all__ = ["folded_attention", "flash_forward", "flash_backward", "HAS_FLASH_SPLIT"]

_aten = torch.ops.aten
HAS_FLASH_SPLIT = hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
    _aten, "_scaled_dot_product_flash_attention_for_cpu_backward"
)


def _width(state: MemoryState) -> int:
    return max(state.key_dim + 1, state.value_dim)


def fold_query(q: Tensor, scale: float, width: int, ct: torch.dtype) -> Tensor:
    """q (b h n dk) -> (b h n width): ``[scale*q, 1, 0...]`` in ``ct``."""
    b, h, n, dk = q.shape
    return torch.cat(
        [q.to(ct) * scale, q.new_ones(b, h, n, 1, dtype=ct), q.new_zeros(b, h, n, width - dk - 1, dtype=ct)], -1
    )


def fold_store(state: MemoryState, bias: Tensor, width: int, ct: torch.dtype) -> tuple[Tensor, Tensor]:
    """The store's keys ``[k, bias, 0...]`` and values ``[v, 0...]``, both (b h m width) in ``ct``.

    bias: (b h m), the slot bias of :func:`memgpt.memory.read.slot_bias`.
    """
    b, h, m, dk = state.keys.shape
    bias = bias.to(ct)[..., None]
    keys = torch.cat([state.keys.to(ct), bias, bias.new_zeros(b, h, m, width - dk - 1)], -1)
    values = torch.cat([state.values.to(ct), bias.new_zeros(b, h, m, width - state.value_dim)], -1)
    return keys, values


def folded_attention(q: Tensor, state: MemoryState, bias: Tensor, scale: float, ct: torch.dtype) -> Tensor:
    """q (b h n dk), bias (b h m) -> (b h n dv) in ``ct``: softmax(scale*q.k + bias) v, differentiable."""
    width = _width(state)
    keys, values = fold_store(state, bias, width, ct)
    return F.scaled_dot_product_attention(fold_query(q, scale, width, ct), keys, values, scale=1.0)[
        ..., : state.value_dim
    ]


def flash_forward(q: Tensor, state: MemoryState, bias: Tensor, scale: float, ct: torch.dtype) -> tuple[Tensor, tuple]:
    """The read's output (b h n dv) in ``ct``, and what :func:`flash_backward` needs (O(n) tensors)."""
    width = _width(state)
    q_folded = fold_query(q, scale, width, ct)
    keys, values = fold_store(state, bias, width, ct)
    out, logsumexp = _aten._scaled_dot_product_flash_attention_for_cpu(q_folded, keys, values, scale=1.0)
    return out[..., : state.value_dim], (q_folded, out, logsumexp)


def flash_backward(
    saved: tuple, state: MemoryState, bias: Tensor, grad_out: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the read w.r.t. q (b h n dk), keys, values and the bias (b h m), in the compute dtype.

    ``state`` must hold the contents the forward read; grad_out: (b h n dv).
    """
    q_folded, out, logsumexp = saved
    ct, width, dk = q_folded.dtype, q_folded.shape[-1], state.key_dim
    keys, values = fold_store(state, bias, width, ct)
    grad_folded = F.pad(grad_out.to(ct), (0, width - grad_out.shape[-1]))
    dq, dkeys, dvalues = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_folded, q_folded, keys, values, out, logsumexp, 0.0, False, scale=1.0
    )
    return dq[..., :dk] * scale, dkeys[..., :dk], dvalues[..., : state.value_dim], dkeys[..., dk]
