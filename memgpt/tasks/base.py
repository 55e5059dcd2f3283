"""What every synthetic task yields: token ids, answer targets, and where the segments are.

Shapes: ``b`` batch, ``L`` the whole sample (``seq_len``), ``T`` one segment (``segment_len``).
The segmented tasks (recall, MQAR, passkey) draw from their generator in one order: first the
sample's secrets (keys, values, positions, digits), then the filler one segment at a time with
:func:`filler_segment`. ``sample()`` and ``segments()`` therefore give the same tokens from the
same generator state, and ``segments()`` never holds more than one segment of filler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TaskBatch", "IGNORE_INDEX", "positive", "filler_segment", "no_targets"]

IGNORE_INDEX = -100  # targets that carry no loss (cross_entropy's default ignore_index)
"""The target of positions that carry no loss (``torch.nn.functional.cross_entropy``'s default
``ignore_index``)."""


@dataclass
class TaskBatch:
    """input_ids: (b L) int64; targets: (b L) int64, the answer at answer positions, -100 elsewhere.

    ``query_segment`` is the index of the segment holding the answers (clearing memory just
    before it is the ablation); ``segment_len`` the length of a segment.
    """

    input_ids: Tensor
    targets: Tensor
    segment_len: int
    query_segment: int

    @property
    def answer_mask(self) -> Tensor:
        """(b L) bool, True at the positions that carry a target."""
        return self.targets != IGNORE_INDEX

    def to(self, device: torch.device | str) -> TaskBatch:
        """The same batch with its tensors on ``device``."""
        return TaskBatch(self.input_ids.to(device), self.targets.to(device), self.segment_len, self.query_segment)


def filler_segment(batch_size: int, segment_len: int, num_filler: int, generator: torch.Generator) -> Tensor:
    """(b T) int64 filler ids uniform over ``[0, num_filler)``: one segment, one draw."""
    return torch.randint(0, num_filler, (batch_size, segment_len), generator=generator)


def no_targets(batch_size: int, length: int) -> Tensor:
    """(b length) int64 filled with :data:`IGNORE_INDEX`."""
    return torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)


def positive(owner: str, name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value}")
