"""The softmax reader: each token queries the memory and projects what it read to model width."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..memory import MemoryState, read, read_usage
from ..memory.checks import resolve_scale
from ._validation import check_input, check_token_mask, head_dim, positive_int

__all__ = ["SoftmaxReader", "QK_NORM_SCALE"]

# Initial temperature of cosine-similarity reads (qk_norm=True) when no scale is given: a slot
# whose key matches the query (cosine 1) then scores ~10 above random slots (cosine ~0), sharp
# enough for one slot to win among hundreds from the first step on.
QK_NORM_SCALE = 10.0


def _wide(t: Tensor) -> Tensor:
    """float64 stays float64; anything else is normalised in float32 (bf16 norms are coarse)."""
    return t if t.dtype == torch.float64 else t.float()


class SoftmaxReader(nn.Module):
    """``q = W_q x``; per head ``read = sum_i softmax_i(scale q.k_i [+ log g_i]) v_i``; ``r = W_o [read_1; ...]``.

    ``top_k`` reads only the k best-scoring slots (chunked, never a (n x m) score matrix);
    ``gated_scores`` adds ``log g`` of each slot to its score (``False`` is the seed's formula).

    ``qk_norm=True`` scores by cosine similarity with a learned per-head temperature:
    ``tau_h * (q/|q|).(k_i/|k_i|) [+ log g_i]``, ``tau_h = exp(log_scale_h)`` starting at
    ``scale`` (default :data:`QK_NORM_SCALE`). Stored keys are ``g*k`` with ``g > 0``, so the
    normalisation sees ``k``'s direction and the gate enters through ``log g`` only. Plain dot
    products start with scores of std ~1 over every slot (a diffuse read) and must grow the key
    and query norms to sharpen; the cosine read can be sharp as soon as directions align.
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
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.heads = positive_int("heads", heads)
        self.key_dim = head_dim("key_dim", key_dim, dim, heads)
        self.value_dim = head_dim("value_dim", value_dim, dim, heads)
        if not isinstance(qk_norm, bool):
            raise TypeError(f"qk_norm must be a bool, got {type(qk_norm).__name__} ({qk_norm!r})")
        self.qk_norm = qk_norm
        self.scale = QK_NORM_SCALE if qk_norm and scale is None else resolve_scale(scale, self.key_dim)
        self.top_k = None if top_k is None else positive_int("top_k", top_k)
        self.gated_scores = bool(gated_scores)
        self.query_proj = nn.Linear(dim, heads * self.key_dim, bias=False)
        self.out_proj = nn.Linear(heads * self.value_dim, dim, bias=False)
        # A parameter only when learned, so state dicts of plain readers are unchanged.
        self.log_scale = nn.Parameter(torch.full((heads,), math.log(self.scale))) if qk_norm else None

    def extra_repr(self) -> str:
        read_kind = "full softmax (SDPA)" if self.top_k is None else f"top-{self.top_k} (chunked)"
        scores = f"cosine, learned scale from {self.scale:.4g}" if self.qk_norm else f"scale={self.scale:.4g}"
        return (
            f"dim={self.dim}, heads={self.heads}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
            f"{scores}, read={read_kind}, gated_scores={self.gated_scores}"
        )

    def temperature(self) -> Tensor | None:
        """(h,) the learned per-head scale of cosine reads; None without qk_norm."""
        return None if self.log_scale is None else self.log_scale.exp()

    def queries(self, x: Tensor, state: MemoryState) -> Tensor:
        """x: (b n d) -> q (b h n dk) in the memory's dtype (with qk_norm: unit length times the scale)."""
        check_input("x", x, self.dim)
        q = rearrange(self.query_proj(x), "b n (h e) -> b h n e", h=self.heads)
        if self.qk_norm:
            if self.log_scale is None:  # made with qk_norm=False, the flag set afterwards
                raise RuntimeError("this SoftmaxReader has no log_scale: construct it with qk_norm=True")
            q = _wide(q)
            q = F.normalize(q, dim=-1) * self.log_scale.exp()[:, None, None].to(q.dtype)
        return q.to(state.dtype)

    def _read_kwargs(self) -> dict:
        """How the read scores the queries: with qk_norm against the keys' directions, the scale
        already in q. The read normalises the keys itself (no normalised copy of the store), so a
        store written in place under autograd is read as it is."""
        scale = 1.0 if self.qk_norm else self.scale
        return dict(scale=scale, top_k=self.top_k, gated_scores=self.gated_scores, normalize_keys=self.qk_norm)

    def forward(self, x: Tensor, state: MemoryState) -> Tensor:
        """x: (b n d), state: the memory to read -> r (b n d) in x's dtype."""
        out = read(self.queries(x, state), state, **self._read_kwargs())
        return self.out_proj(rearrange(out, "b h n e -> b n (h e)").to(x.dtype))

    def usage(self, x: Tensor, state: MemoryState, mask: Tensor | None = None) -> Tensor:
        """Read weights each slot receives from the tokens of x (mask (b n): those to count): (b h m)."""
        q = self.queries(x, state)
        if mask is not None:
            check_token_mask(mask, x.shape[0], x.shape[1], x.device)
        return read_usage(q, state, mask=mask, **self._read_kwargs())
