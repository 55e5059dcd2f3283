"""The softmax reader: each token queries the memory and projects what it read to model width."""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from ..memory import MemoryState, read, read_usage
from ..memory.checks import resolve_scale
from ._validation import check_input, check_token_mask, head_dim, positive_int

__all__ = ["SoftmaxReader"]


class SoftmaxReader(nn.Module):
    """``q = W_q x``; per head ``read = sum_i softmax_i(scale q.k_i [+ log g_i]) v_i``; ``r = W_o [read_1; ...]``.

    ``top_k`` reads only the k best-scoring slots (chunked, never a (n x m) score matrix);
    ``gated_scores`` adds ``log g`` of each slot to its score (``False`` is the seed's formula).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 1,
        key_dim: int | None = None,
        value_dim: int | None = None,
        scale: float | None = None,
        top_k: int | None = None,
        gated_scores: bool = True,
    ) -> None:
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.heads = positive_int("heads", heads)
        self.key_dim = head_dim("key_dim", key_dim, dim, heads)
        self.value_dim = head_dim("value_dim", value_dim, dim, heads)
        self.scale = resolve_scale(scale, self.key_dim)
        self.top_k = None if top_k is None else positive_int("top_k", top_k)
        self.gated_scores = bool(gated_scores)
        self.query_proj = nn.Linear(dim, heads * self.key_dim, bias=False)
        self.out_proj = nn.Linear(heads * self.value_dim, dim, bias=False)

    def extra_repr(self) -> str:
        read_kind = "full softmax (SDPA)" if self.top_k is None else f"top-{self.top_k} (chunked)"
        return (
            f"dim={self.dim}, heads={self.heads}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
            f"scale={self.scale:.4g}, read={read_kind}, gated_scores={self.gated_scores}"
        )

    def queries(self, x: Tensor, state: MemoryState) -> Tensor:
        """x: (b n d) -> q (b h n dk) in the memory's dtype."""
        check_input("x", x, self.dim)
        q = rearrange(self.query_proj(x), "b n (h e) -> b h n e", h=self.heads)
        return q.to(state.dtype)

    def forward(self, x: Tensor, state: MemoryState) -> Tensor:
        """x: (b n d), state: the memory to read -> r (b n d) in x's dtype."""
        q = self.queries(x, state)
        out = read(q, state, scale=self.scale, top_k=self.top_k, gated_scores=self.gated_scores)
        return self.out_proj(rearrange(out, "b h n e -> b n (h e)").to(x.dtype))

    def usage(self, x: Tensor, state: MemoryState, mask: Tensor | None = None) -> Tensor:
        """Read weights each slot receives from the tokens of x (mask (b n): those to count): (b h m)."""
        q = self.queries(x, state)
        if mask is not None:
            check_token_mask(mask, x.shape[0], x.shape[1], x.device)
        return read_usage(q, state, scale=self.scale, top_k=self.top_k, gated_scores=self.gated_scores, mask=mask)
