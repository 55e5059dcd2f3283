"""Fast memory reads: full softmax (SDPA) and chunked top-k, plus the read-weight sums for usage.

Score of query ``q`` on slot ``i``:  ``scale * q·k_i (+ log g_i if gated_scores)``, over valid slots.
The softmax is always taken in float32 or wider (float64 stays float64): on CPU low-precision
inputs are upcast (bf16 matmuls are 18-100x slower than fp32 there), on CUDA the SDPA kernels
accumulate the softmax in float32 themselves.

With ``normalize_keys`` the keys enter the score as their directions ``k_i/|k_i|`` (cosine reads:
:class:`memgpt.layers.SoftmaxReader` with ``qk_norm``), normalised inside the read, so that a store
written in place under autograd needs no normalised copy and its gradient reaches the raw keys.

Paths: the full read is one fused SDPA call (under autograd on CPU with the slot bias folded into
the keys, so that the fused kernel also runs backward: :mod:`memgpt.memory.folded`). The top-k read selects chunk by chunk;
outside autograd it weights the chosen values with the selection's own scores, under autograd it
recomputes the chosen scores so that gradients reach q, the chosen keys and their gates.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_read_args, resolve_scale
from .folded import HAS_FLASH_SPLIT, flash_backward, flash_forward, folded_attention
from .reversible import logged_read
from .state import MemoryState

__all__ = ["read", "read_usage", "slot_bias", "TOP_K_CHUNK", "TOP_K_GROUP"]

# Slots scored per step of the running top-k: peak extra memory is O(n * (k + TOP_K_CHUNK)).
TOP_K_CHUNK = 4096
"""Slots scored per step of a ``top_k`` read: its peak extra memory is O(n (k + TOP_K_CHUNK)) per
row and head, whatever the capacity."""


def _compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if dtype == torch.float64:
        return torch.float64
    if device.type == "cuda":
        return dtype
    return torch.float32


def _masked_value(dtype: torch.dtype) -> float:
    # Finite, so that an all-masked row gives a uniform (finite) softmax instead of NaN, and
    # far enough below any real score that a valid slot always takes all the weight.
    return torch.finfo(dtype).min / 4


def slot_bias(state: MemoryState, gated_scores: bool, dtype: torch.dtype) -> Tensor:
    """Additive score bias per slot, (b h m): ``log g`` (or 0) for valid slots, a huge negative else.

    ``g`` is clamped at float32's smallest normal so that ``g = 0`` gives a finite ``log`` (about
    -87): such a slot keeps a weight below 1e-37 of any normally written slot.
    """
    if gated_scores:
        tiny = torch.finfo(torch.float32).tiny
        bias = torch.log(state.strength.to(dtype).clamp_min(tiny))
    else:
        bias = torch.zeros_like(state.strength, dtype=dtype)
    return torch.where(state.valid, bias, torch.full_like(bias, _masked_value(dtype)))


def _has_valid(state: MemoryState) -> Tensor:
    return state.valid.any(dim=-1)[..., None, None]  # (b h 1 1)


def _check_normalize_keys(normalize_keys: bool) -> None:
    if not isinstance(normalize_keys, bool):
        raise TypeError(f"normalize_keys must be a bool, got {type(normalize_keys).__name__} ({normalize_keys!r})")


def _unit(keys: Tensor) -> Tensor:
    """keys (... dk) -> their directions in keys' dtype, normalised in float32 or wider (0 stays 0)."""
    wide = keys if keys.dtype == torch.float64 else keys.float()
    return F.normalize(wide, dim=-1).to(keys.dtype)


def _directions(state: MemoryState, normalize_keys: bool) -> MemoryState:
    """``state`` with unit-length keys when ``normalize_keys`` (empty slots stay 0: masked anyway).

    Never given a logged store with grad enabled: a logged read normalises inside its forward
    and backward, where grad is off or the store is a plain shadow, so ``replace`` cannot refuse.
    """
    return state.replace(keys=_unit(state.keys)) if normalize_keys else state


def read(
    q: Tensor,
    state: MemoryState,
    *,
    scale: float | None = None,
    top_k: int | None = None,
    gated_scores: bool = True,
    normalize_keys: bool = False,
) -> Tensor:
    """Read the memory: ``sum_i softmax_i(score) v_i``.

    q: (b h n dk) in the state's dtype; returns (b h n dv) in that dtype.
    An empty store (no valid slot in a row) reads zeros. ``normalize_keys`` scores against the
    keys' directions ``k_i/|k_i|`` (with unit-length q: cosines); gradients reach the raw keys.
    """
    check_read_args(q, state, top_k)
    _check_normalize_keys(normalize_keys)
    s = resolve_scale(scale, state.key_dim)
    if state._log is not None and torch.is_grad_enabled():
        # A store written in place under autograd: the read records only the store's version.
        split = (
            _FlashSplit(s, gated_scores, normalize_keys)
            if top_k is None and q.device.type == "cpu" and HAS_FLASH_SPLIT
            else None
        )
        return logged_read(
            q, state, lambda q_, state_: _read(q_, _directions(state_, normalize_keys), s, top_k, gated_scores), split
        )
    return _read(q, _directions(state, normalize_keys), s, top_k, gated_scores)


def _read(q: Tensor, state: MemoryState, s: float, top_k: int | None, gated_scores: bool) -> Tensor:
    if top_k is not None:
        return _read_top_k(q, state, s, top_k, gated_scores)
    ct = _compute_dtype(q.dtype, q.device)
    if q.device.type == "cpu" and _bias_needs_grad(state, gated_scores):
        # A float mask that needs a gradient would send SDPA to its math path on CPU; a mask that
        # needs none keeps the fused kernel both ways (so the plain masked call stays below).
        out = folded_attention(q, state, slot_bias(state, gated_scores, ct), s, ct)
    else:
        bias = slot_bias(state, gated_scores, ct)[:, :, None, :]  # (b h 1 m)
        out = F.scaled_dot_product_attention(
            q.to(ct),
            state.keys.to(ct),
            state.values.to(ct),
            attn_mask=bias.expand(-1, -1, q.shape[2], -1),
            scale=s,
        )
    has_valid = _has_valid(state)
    # Rows with an empty store must read zeros (SDPA gives them the mean value). On CPU a host
    # check is free and skips a pass over the output when every row has a slot (the usual case).
    if out.device.type == "cpu" and not torch.compiler.is_compiling() and bool(has_valid.all()):
        return out.to(q.dtype)
    return (out * has_valid).to(q.dtype)


def _bias_needs_grad(state: MemoryState, gated_scores: bool) -> bool:
    return torch.is_grad_enabled() and gated_scores and state.strength.requires_grad


def _needs_grad(q: Tensor, state: MemoryState, gated_scores: bool) -> bool:
    if not torch.is_grad_enabled():
        return False
    return (
        q.requires_grad
        or state.keys.requires_grad
        or state.values.requires_grad
        or (gated_scores and state.strength.requires_grad)
    )


class _FlashSplit:
    """The CPU full read as a separate forward and backward, for logged stores (see
    :mod:`memgpt.memory.folded`): backward rebuilds the folded store instead of re-reading."""

    def __init__(self, scale: float, gated_scores: bool, normalize_keys: bool = False) -> None:
        self.scale, self.gated_scores, self.normalize_keys = scale, gated_scores, normalize_keys

    def forward(self, q: Tensor, state: MemoryState) -> tuple[Tensor, tuple]:
        """q (b h n dk) -> (b h n dv) in q's dtype, and O(n) saved tensors."""
        state = _directions(state, self.normalize_keys)
        ct = _compute_dtype(q.dtype, q.device)
        out, saved = flash_forward(q, state, slot_bias(state, self.gated_scores, ct), self.scale, ct)
        has_valid = _has_valid(state).to(ct)  # empty rows read zeros
        return (out * has_valid).to(q.dtype), (saved, has_valid)

    def backward(
        self, saved: tuple, state: MemoryState, grad_out: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Gradients w.r.t. q, keys, values and strength (None when scores are not gated)."""
        if self.normalize_keys:  # the kernel's gradient w.r.t. the unit keys, then through the normalisation
            with torch.enable_grad():
                raw = state.keys.detach().requires_grad_()
                unit = _unit(raw)
            # dataclasses.replace, not state.replace: a later in-place write has donated ``state``
            unit_state = dataclasses.replace(state, keys=unit.detach())
            dq, dunit, dvalues, dstrength = self._backward(saved, unit_state, grad_out)
            (dkeys,) = torch.autograd.grad(unit, raw, dunit)
            return dq, dkeys, dvalues, dstrength
        return self._backward(saved, state, grad_out)

    def _backward(
        self, saved: tuple, state: MemoryState, grad_out: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        saved, has_valid = saved
        ct = has_valid.dtype
        bias = slot_bias(state, self.gated_scores, ct)
        dq, dkeys, dvalues, dbias = flash_backward(saved, state, bias, grad_out.to(ct) * has_valid, self.scale)
        dstrength = None
        if self.gated_scores:  # bias = log(max(g, tiny)) on valid slots
            g = state.strength.to(ct)
            live = state.valid & (g >= torch.finfo(torch.float32).tiny)
            dstrength = torch.where(live, dbias / g, torch.zeros((), dtype=ct, device=g.device)).to(
                state.strength.dtype
            )
        return dq.to(state.dtype), dkeys.to(state.dtype), dvalues.to(state.dtype), dstrength


# Group size of the top-k pre-filter: the k best slots of a chunk lie in the k groups of
# TOP_K_GROUP consecutive slots with the largest maxima (each of those groups holds an element
# at least as large as any element outside them), so the exact top k is taken over k groups'
# slots instead of the whole chunk.
TOP_K_GROUP = 16


def _chunk_top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """scores (B n c) -> the k largest (B n k) and their positions in the chunk, unsorted."""
    B, n, c = scores.shape
    G = TOP_K_GROUP
    if c % G or c // G <= k:  # too few groups for the pre-filter to pay
        return scores.topk(min(k, c), dim=-1, sorted=False)
    groups = scores.view(B, n, c // G, G)
    best_groups = groups.amax(dim=-1).topk(k, dim=-1, sorted=False).indices  # (B n k)
    candidates = groups.gather(2, best_groups[..., None].expand(-1, -1, -1, G)).flatten(2)  # (B n k*G)
    top, pos = candidates.topk(k, dim=-1, sorted=False)
    return top, best_groups.gather(2, pos // G) * G + pos % G


@torch.no_grad()
def _select_top_k(q: Tensor, keys: Tensor, bias: Tensor, scale: float, k: int) -> tuple[Tensor, Tensor]:
    """The k best scores (b h n k) and their slots, scoring TOP_K_CHUNK slots at a time.

    Each chunk's own top k is merged with the running best (2k candidates): the global top k
    lies in the union of the chunks' top k, so peak extra memory is O(n * (k + chunk)). Scores
    are ``(scale*q).k + bias``, written once by the matmul and biased in place.
    """
    b, h, n, dk = q.shape
    m = keys.shape[2]
    qf = q.reshape(b * h, n, dk) * scale
    best: Tensor | None = None
    best_idx: Tensor | None = None
    for start in range(0, m, TOP_K_CHUNK):
        stop = min(start + TOP_K_CHUNK, m)
        chunk_keys = keys[:, :, start:stop].reshape(b * h, stop - start, dk)
        scores = torch.bmm(qf, chunk_keys.transpose(-1, -2))  # (bh n c)
        scores += bias[:, :, start:stop].reshape(b * h, 1, stop - start)
        top, idx = _chunk_top_k(scores, k)
        idx = idx + start
        if best is not None and best_idx is not None:  # set together
            top = torch.cat([best, top], dim=-1)
            top, pos = top.topk(min(k, top.shape[-1]), dim=-1, sorted=False)
            idx = torch.cat([best_idx, idx], dim=-1).gather(-1, pos)
        best, best_idx = top, idx
    assert best is not None and best_idx is not None  # m >= 1 (MemoryState.validate): the loop ran
    return best.reshape(b, h, n, -1), best_idx.reshape(b, h, n, -1)


def _flat_rows(idx: Tensor, m: int) -> Tensor:
    """Slots idx (b h n k) of a (b h m) store -> rows of its (b*h*m) flattening."""
    b, h = idx.shape[:2]
    return idx + (torch.arange(b * h, device=idx.device) * m).view(b, h, 1, 1)


def _gather_slots(x: Tensor, idx: Tensor) -> Tensor:
    """x: (b h m d), idx: (b h n k) -> (b h n k d), as whole-row index_select (fast on CPU, unlike
    an element-wise gather with an expanded index) without materialising (b h n m d)."""
    b, h, m, d = x.shape
    n, k = idx.shape[2], idx.shape[3]
    return x.reshape(b * h * m, d).index_select(0, _flat_rows(idx, m).flatten()).view(b, h, n, k, d)


def _read_top_k(q: Tensor, state: MemoryState, scale: float, top_k: int, gated_scores: bool) -> Tensor:
    ct = q.dtype if q.dtype == torch.float64 else torch.float32
    k = min(top_k, state.capacity)
    bias = slot_bias(state, gated_scores, ct)  # (b h m)
    qc, keys, values = q.to(ct), state.keys.to(ct), state.values.to(ct)
    top, idx = _select_top_k(qc.detach(), keys.detach(), bias.detach(), scale, k)  # (b h n k) each
    if not _needs_grad(q, state, gated_scores):
        # Inference: the selection's own scores, and a weighted sum of the chosen value rows
        # without materialising them (b h n k dv).
        b, h, n, _ = q.shape
        rows = _flat_rows(idx, state.capacity).reshape(b * h * n, k)
        out = F.embedding_bag(
            rows,
            values.reshape(-1, state.value_dim),
            mode="sum",
            per_sample_weights=top.softmax(-1).reshape(b * h * n, k),
        ).view(b, h, n, -1)
        return (out * _has_valid(state)).to(q.dtype)
    # Recompute the selected scores with autograd: gradients reach q, the chosen keys and g.
    k_sel = _gather_slots(keys, idx)  # (b h n k dk)
    v_sel = _gather_slots(values, idx)  # (b h n k dv)
    b_sel = bias.gather(2, idx.flatten(2)).view_as(idx)  # (b h n k)
    scores = torch.einsum("bhnd,bhnkd->bhnk", qc, k_sel) * scale + b_sel
    weights = scores.softmax(dim=-1)
    out = torch.einsum("bhnk,bhnkd->bhnd", weights, v_sel)
    return (out * _has_valid(state)).to(q.dtype)


def read_usage(
    q: Tensor,
    state: MemoryState,
    *,
    scale: float | None = None,
    top_k: int | None = None,
    gated_scores: bool = True,
    mask: Tensor | None = None,
    normalize_keys: bool = False,
) -> Tensor:
    """Sum over queries of the read weights each slot receives, (b h m), no gradient.

    q: (b h n dk); mask: (b n) bool, queries to count (default all). Rows with no valid slot get
    zeros. Summing (not averaging) keeps usage additive, so reading a segment in one call or
    token by token accumulates the same usage. With ``top_k``, exactly the k slots :func:`read`
    uses are credited. The result has the dtype of ``state.usage``. ``normalize_keys``: as in :func:`read`.
    """
    check_read_args(q, state, top_k)
    _check_normalize_keys(normalize_keys)
    s = resolve_scale(scale, state.key_dim)
    with torch.no_grad():
        state = _directions(state, normalize_keys)
        ct = q.dtype if q.dtype == torch.float64 else torch.float32
        bias = slot_bias(state, gated_scores, ct)
        qc, keys = q.to(ct), state.keys.to(ct)
        if top_k is None:
            weights = (torch.matmul(qc, keys.transpose(-1, -2)) * s + bias[:, :, None, :]).softmax(dim=-1)
            idx = None
        else:
            top, idx = _select_top_k(qc, keys, bias, s, min(top_k, state.capacity))  # (b h n k) each
            weights = top.softmax(dim=-1)
        weights = weights * _has_valid(state)
        if mask is not None:
            weights = weights * mask[:, None, :, None].to(weights.dtype)
        if idx is None:
            return weights.sum(dim=2).to(state.usage.dtype)
        usage = torch.zeros(state.usage.shape, dtype=weights.dtype, device=weights.device)
        return usage.scatter_add(2, idx.flatten(2), weights.flatten(2)).to(state.usage.dtype)
