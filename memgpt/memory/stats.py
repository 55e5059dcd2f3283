"""What a memory store holds, in numbers: fill level, evictions, ages and strengths of its slots.

Shapes (einops notation, see docs/reference/index.md): ``b`` batch, ``h`` memory heads, ``m`` slots (capacity).

Everything here is read from the store's own metadata (``valid``, ``step``, ``strength``,
``count``): no host sync, no copy of keys or values, nothing tracked on the side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .state import MemoryState

__all__ = ["MemoryStats", "memory_stats"]


@dataclass(frozen=True, eq=False)
class MemoryStats:
    """Per row and memory head: how full one store is, what it lost, how old and strong its slots are.

    Fields (``f`` is the store's metadata dtype: float32, or float64 for a float64 store)
        capacity:      int, slots per row and head (``m``)
        writes:        (b,)    int64, tokens written into the row so far (``state.count``)
        stored:        (b h)   int64, valid slots
        fill:          (b h)   f, ``stored / capacity``
        evictions:     (b h)   int64, ``writes - stored``: written tokens the store no longer holds
        age:           (b h m) int64, tokens written after the slot's token (0 = the newest); -1 = empty
        strength:      (b h m) f, the write gate ``g`` the slot was stored with; 0 = empty
        age_mean, age_min, age_max:                (b h) over the stored slots
        strength_mean, strength_min, strength_max: (b h) over the stored slots

    Summaries of a head that stores nothing are 0 (``stored`` says so). ``evictions`` is exact
    for every store the library writes: a write fills empty slots before it overwrites any (all
    three policies), so once a row is full each further token displaces exactly one stored pair
    (under ``strength``/``usage`` possibly its own: a weak token is stored, then displaced by the
    next), and ``writes - stored`` counts those displacements. A store from
    :meth:`MemoryState.reset_rows` starts again at zero writes. Tokens waiting in a model's
    segment buffer are not written yet and do not count.
    """

    capacity: int
    writes: Tensor
    stored: Tensor
    fill: Tensor
    evictions: Tensor
    age: Tensor
    strength: Tensor
    age_mean: Tensor
    age_min: Tensor
    age_max: Tensor
    strength_mean: Tensor
    strength_min: Tensor
    strength_max: Tensor

    def to_dict(self) -> dict[str, Tensor | int]:
        """The fields by name (for logging or ``json`` after ``.tolist()``)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _masked_summary(x: Tensor, valid: Tensor, count: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, min and max of x (b h m) over the valid slots, 0 where a head has none."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    mean = torch.where(valid, x, zero).sum(-1).to(dtype) / count.clamp_min(1).to(dtype)
    if x.is_floating_point():
        low, high = torch.finfo(x.dtype).min, torch.finfo(x.dtype).max
    else:
        low, high = torch.iinfo(x.dtype).min, torch.iinfo(x.dtype).max
    some = count > 0
    lo = torch.where(some, torch.where(valid, x, torch.full_like(x, high)).amin(-1), zero)
    hi = torch.where(some, torch.where(valid, x, torch.full_like(x, low)).amax(-1), zero)
    return mean, lo, hi


def memory_stats(state: MemoryState) -> MemoryStats:
    """Fill level, evictions, slot ages and strengths of ``state`` (see :class:`MemoryStats`).

    state: keys (b h m dk) ... -> tensors of (b,), (b h) and (b h m) on the state's device.
    Costs a few O(b h m) reductions of the metadata; reads neither keys nor values, and the
    results carry no autograd graph.
    """
    if not isinstance(state, MemoryState):
        raise TypeError(f"memory_stats expects a MemoryState, got {type(state).__name__}")
    state.check_live()
    valid, meta = state.valid, state.strength.dtype
    stored = valid.sum(-1)  # (b h)
    writes = state.count.clone()  # a snapshot: an in-place write advances the store's own counter
    age = torch.where(valid, (writes - 1)[:, None, None] - state.step, torch.full_like(state.step, -1))
    g = state.strength.detach()  # statistics carry no autograd graph
    strength = torch.where(valid, g, torch.zeros_like(g))
    age_mean, age_min, age_max = _masked_summary(age, valid, stored, meta)
    strength_mean, strength_min, strength_max = _masked_summary(strength, valid, stored, meta)
    return MemoryStats(
        capacity=state.capacity,
        writes=writes,
        stored=stored,
        fill=stored.to(meta) / state.capacity,
        evictions=writes[:, None] - stored,
        age=age,
        strength=strength,
        age_mean=age_mean,
        age_min=age_min,
        age_max=age_max,
        strength_mean=strength_mean,
        strength_min=strength_min,
        strength_max=strength_max,
    )
