"""The sigmoid-gated writer: what each token proposes to store, and how strongly."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from ._validation import check_input, head_dim, positive_int

__all__ = ["GatedWriter"]


class GatedWriter(nn.Module):
    """Per token and memory head: ``g = sigmoid(W_g x + b_g)``, ``k = W_k x + b_k``, ``v = W_v x + b_v``.

    The store keeps ``(g*k, g*v)`` (the multiplication happens in :func:`memgpt.memory.write`,
    which also records ``g`` for gated scores and the ``strength`` eviction policy).
    """

    def __init__(self, dim: int, heads: int = 1, key_dim: int | None = None, value_dim: int | None = None) -> None:
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.heads = positive_int("heads", heads)
        self.key_dim = head_dim("key_dim", key_dim, dim, heads)
        self.value_dim = head_dim("value_dim", value_dim, dim, heads)
        self.gate_proj = nn.Linear(dim, heads)
        self.key_proj = nn.Linear(dim, heads * self.key_dim)
        self.value_proj = nn.Linear(dim, heads * self.value_dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, key_dim={self.key_dim}, value_dim={self.value_dim}"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (b n d) -> keys (b h n dk), values (b h n dv), strength g (b h n) in (0, 1)."""
        check_input("x", x, self.dim)
        keys = rearrange(self.key_proj(x), "b n (h e) -> b h n e", h=self.heads)
        values = rearrange(self.value_proj(x), "b n (h e) -> b h n e", h=self.heads)
        strength = torch.sigmoid(rearrange(self.gate_proj(x), "b n h -> b h n"))
        return keys, values, strength
