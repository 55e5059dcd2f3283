"""The position-wise feed-forward network of a transformer block."""

from __future__ import annotations

from torch import Tensor, nn

from ._validation import positive_int

__all__ = ["FeedForward"]


class FeedForward(nn.Module):
    """``Linear(dim, hidden) -> GELU -> Linear(hidden, dim)``; x: (b n d) -> (b n d)."""

    def __init__(self, dim: int, hidden_dim: int | None = None, *, dropout: float = 0.0) -> None:
        super().__init__()
        positive_int("dim", dim)
        hidden_dim = positive_int("hidden_dim", hidden_dim if hidden_dim is not None else 4 * dim)
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: (b n d) -> (b n d)."""
        return self.net(x)
