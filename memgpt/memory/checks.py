"""Argument checks shared by the fast ops and their reference twins (same errors, same messages)."""

from __future__ import annotations

import torch
from torch import Tensor

from .state import MemoryState

__all__ = ["EVICTION_POLICIES", "check_read_args", "check_write_args", "check_eviction", "resolve_scale"]

EVICTION_POLICIES = ("fifo", "strength", "usage")
"""The eviction policies a full store can use: ``fifo`` (oldest write first), ``strength`` (smallest
write gate ``g`` first), ``usage`` (least-read slot first)."""


def _fail(message: str, exc: type[Exception] = ValueError) -> None:
    raise exc(message)


def check_eviction(eviction: str) -> None:
    if eviction not in EVICTION_POLICIES:
        _fail(f"eviction must be one of {EVICTION_POLICIES}, got {eviction!r}")


def _check_state(state: MemoryState) -> None:
    if not isinstance(state, MemoryState):
        _fail(f"state must be a MemoryState, got {type(state).__name__}", TypeError)
    state.check_live()


def _check_tensor(name: str, t: Tensor, rank: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        _fail(f"{name} must be a Tensor {layout}, got {type(t).__name__}", TypeError)
    if t.dim() != rank:
        _fail(f"{name} must be {layout}, got shape {tuple(t.shape)}")


def _check_like_state(name: str, t: Tensor, state: MemoryState) -> None:
    if t.device != state.device:
        _fail(f"{name} is on {t.device} but the memory state is on {state.device}")
    if t.dtype != state.dtype:
        _fail(f"{name} has dtype {t.dtype} but the memory state stores {state.dtype}", TypeError)


def resolve_scale(scale: float | None, key_dim: int) -> float:
    if scale is None:
        return key_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        _fail(f"scale must be a float or None, got {type(scale).__name__}", TypeError)
    if not scale > 0:
        _fail(f"scale must be > 0, got {scale}")
    return float(scale)


def check_read_args(q: Tensor, state: MemoryState, top_k: int | None) -> None:
    _check_state(state)
    _check_tensor("q", q, 4, "(b h n dk)")
    b, h, _, dk = q.shape
    expected = (state.batch_size, state.heads, state.key_dim)
    if (b, h, dk) != expected:
        _fail(f"q (b h n dk) must have (b, h, dk) = {expected} to match the memory state, got {(b, h, dk)}")
    _check_like_state("q", q, state)
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            _fail(f"top_k must be an int or None, got {type(top_k).__name__}", TypeError)
        if top_k < 1:
            _fail(f"top_k must be >= 1, got {top_k}")


def check_write_args(
    state: MemoryState,
    keys: Tensor,
    values: Tensor,
    strength: Tensor,
    mask: Tensor | None,
    eviction: str,
    usage_decay: float,
) -> None:
    _check_state(state)
    check_eviction(eviction)
    _check_tensor("keys", keys, 4, "(b h n dk)")
    _check_tensor("values", values, 4, "(b h n dv)")
    _check_tensor("strength", strength, 3, "(b h n)")
    b, h, n, dk = keys.shape
    expected = (state.batch_size, state.heads, state.key_dim)
    if (b, h, dk) != expected:
        _fail(f"keys (b h n dk) must have (b, h, dk) = {expected} to match the memory state, got {(b, h, dk)}")
    if tuple(values.shape) != (b, h, n, state.value_dim):
        _fail(f"values must be (b h n dv) = {(b, h, n, state.value_dim)}, got {tuple(values.shape)}")
    if tuple(strength.shape) != (b, h, n):
        _fail(f"strength must be (b h n) = {(b, h, n)}, got {tuple(strength.shape)}")
    _check_like_state("keys", keys, state)
    _check_like_state("values", values, state)
    if not strength.is_floating_point():
        _fail(f"strength must be a floating point tensor, got {strength.dtype}", TypeError)
    if strength.device != state.device:
        _fail(f"strength is on {strength.device} but the memory state is on {state.device}")
    if mask is not None:
        _check_tensor("mask", mask, 2, "(b n)")
        if tuple(mask.shape) != (b, n):
            _fail(f"mask must be (b n) = {(b, n)}, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            _fail(f"mask must be bool (True = write this token), got {mask.dtype}", TypeError)
        if mask.device != state.device:
            _fail(f"mask is on {mask.device} but the memory state is on {state.device}")
    if isinstance(usage_decay, bool) or not isinstance(usage_decay, (int, float)) or not 0.0 <= usage_decay <= 1.0:
        _fail(f"usage_decay must be a float in [0, 1], got {usage_decay!r}")
