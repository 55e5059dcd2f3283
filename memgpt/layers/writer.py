"""The sigmoid-gated writer: what each token proposes to store, and how strongly."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from ._validation import check_input, head_dim, positive_int

__all__ = ["GatedWriter", "shift_keys"]


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

    def null_key(self) -> Tensor:
        """(h dk) the key of a zero input (the key bias): what a shifted write keys its first token by."""
        return rearrange(self.key_proj.bias, "(h e) -> h e", h=self.heads)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (b n d) -> keys (b h n dk), values (b h n dv), strength g (b h n) in (0, 1)."""
        check_input("x", x, self.dim)
        keys = rearrange(self.key_proj(x), "b n (h e) -> b h n e", h=self.heads)
        values = rearrange(self.value_proj(x), "b n (h e) -> b h n e", h=self.heads)
        strength = torch.sigmoid(rearrange(self.gate_proj(x), "b n h -> b h n"))
        return keys, values, strength


def shift_keys(keys: Tensor, first: Tensor) -> Tensor:
    """keys (b h n dk), first (h dk) -> (b h n dk): token t gets token t-1's key, token 0 ``first``.

    Induction-shaped writes: the slot written for token t is then keyed by the context that
    *preceded* t and holds t's value, so a query made from the context ending at s retrieves what
    followed the same context earlier, i.e. the next token. With unshifted keys the slot that
    matches the query's context holds that context's own last token, which the query already has.
    """
    b, h, n, dk = keys.shape
    if tuple(first.shape) != (h, dk):
        raise ValueError(f"shift_keys: first must be (h dk) = {(h, dk)}, got {tuple(first.shape)}")
    if n == 0:
        return keys
    head = first.to(keys.dtype)[None, :, None, :].expand(b, h, 1, dk)
    return torch.cat([head, keys[:, :, :-1]], dim=2)
