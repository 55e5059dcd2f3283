"""Causal multi-head self-attention on ``F.scaled_dot_product_attention``, with a KV cache."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ._validation import check_input, positive_int

__all__ = ["KVCache", "MultiHeadAttention"]


class KVCache(NamedTuple):
    """Keys and values of the tokens seen so far: each (b h t dh)."""

    keys: Tensor
    values: Tensor

    def detach(self) -> KVCache:
        """Cut the autograd graph here."""
        return KVCache(self.keys.detach(), self.values.detach())


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention; causal unless the caller passes its own mask.

    ``y, cache = attn(x, cache)``: x (b n d); cache holds (b h t dh) from earlier calls and the
    returned cache holds (b h t+n dh). Query ``i`` of this call sits at position ``t + i``.
    """

    def __init__(self, dim: int, heads: int, *, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.heads = positive_int("heads", heads)
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.head_dim = dim // heads
        self.dropout = dropout
        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, backend=F.scaled_dot_product_attention"

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (b n d) -> q, k, v each (b h n dh)."""
        qkv = rearrange(self.qkv_proj(x), "b n (three h e) -> three b h n e", three=3, h=self.heads)
        return qkv[0], qkv[1], qkv[2]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
        """q: (b h n dh), k/v: (b h s dh), allowed: (b n s) bool or None (= causal, s == n).

        Returns (b n d) after the output projection.
        """
        p = self.dropout if self.training else 0.0
        if allowed is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], dropout_p=p)
        return self.out_proj(rearrange(out, "b h n e -> b n (h e)"))

    def forward(
        self, x: Tensor, cache: KVCache | None = None, *, attn_mask: Tensor | None = None
    ) -> tuple[Tensor, KVCache]:
        """x: (b n d); attn_mask: (b n t+n) bool, True = may attend (default: causal).

        Every query must be allowed at least one key (a fully masked row has no defined output).
        """
        check_input("x", x, self.dim)
        b, n, _ = x.shape
        q, k, v = self.project(x)
        t = 0
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
            expected = (b, self.heads, self.head_dim)
            got = (cache.keys.shape[0], cache.keys.shape[1], cache.keys.shape[3])
            if cache.keys.dim() != 4 or got != expected or cache.values.shape != cache.keys.shape:
                raise ValueError(
                    f"cache keys/values must be (b h t dh) with (b, h, dh) = {expected}, "
                    f"got {tuple(cache.keys.shape)} and {tuple(cache.values.shape)}"
                )
            t = cache.keys.shape[2]
            k = torch.cat([cache.keys.to(k.dtype), k], dim=2)
            v = torch.cat([cache.values.to(v.dtype), v], dim=2)
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool or tuple(attn_mask.shape) != (b, n, t + n):
                raise ValueError(
                    f"attn_mask must be bool (b n t+n) = {(b, n, t + n)}, "
                    f"got {attn_mask.dtype} {tuple(attn_mask.shape)}"
                )
            allowed = attn_mask
        elif t:
            i = torch.arange(n, device=x.device)[:, None] + t
            allowed = (torch.arange(t + n, device=x.device)[None, :] <= i).expand(b, n, t + n)
        else:
            allowed = None
        return self.attend(q, k, v, allowed), KVCache(k, v)
