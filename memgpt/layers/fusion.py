"""Gated fusion of a token's hidden state with what it read from memory."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._validation import check_input, positive_int

__all__ = ["GatedFusion"]


class GatedFusion(nn.Module):
    """``lambda = sigmoid(W [x; r] + b)``, ``x~ = lambda * x + (1 - lambda) * r`` (all width ``dim``).

    The gate's weights start at zero and its bias at ``bias_init``, so at initialisation
    ``lambda = sigmoid(bias_init)`` everywhere: 0.0 gives an even mix, a large value (e.g. 6.0,
    ``lambda`` = 0.9975) starts the fusion as nearly the identity ``x~ = x``, for inserting
    memory into a pretrained model. Zero weights still receive gradients (through ``[x; r]``).
    """

    def __init__(self, dim: int, *, bias_init: float = 0.0) -> None:
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.bias_init = float(bias_init)
        self.gate_proj = nn.Linear(2 * dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gate_proj.weight)
        nn.init.constant_(self.gate_proj.bias, self.bias_init)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bias_init={self.bias_init}"

    def forward(self, x: Tensor, r: Tensor) -> Tensor:
        """x, r: (b n d) -> (b n d)."""
        check_input("x", x, self.dim)
        check_input("r", r, self.dim)
        if r.shape != x.shape:
            raise ValueError(f"r must have the shape of x {tuple(x.shape)}, got {tuple(r.shape)}")
        lam = torch.sigmoid(self.gate_proj(torch.cat([x, r], dim=-1)))
        return lam * x + (1 - lam) * r
