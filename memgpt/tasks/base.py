"""What every synthetic task yields: token ids, answer targets, and where the segments are."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TaskBatch", "IGNORE_INDEX", "positive"]

IGNORE_INDEX = -100  # targets that carry no loss (cross_entropy's default ignore_index)


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
        return self.targets != IGNORE_INDEX

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(self.input_ids.to(device), self.targets.to(device), self.segment_len, self.query_segment)


def positive(owner: str, name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value}")
