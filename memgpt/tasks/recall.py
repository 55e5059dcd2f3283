"""Segmented multi-query associative recall (the Zoology MQAR recipe, spread over segments).

Recipe for one sample (``T`` = segment_len, ``d`` = distance, ``P`` = num_pairs):

- vocabulary: filler ids ``[0, F)``, key ids ``[F, F+K)``, value ids ``[F+K, F+K+V)``;
- the sequence has ``d + 1`` segments of ``T`` tokens, all filler (uniform over the filler ids)
  except:
- segment 0 starts with the pairs ``k_1 v_1 k_2 v_2 ... k_P v_P``: P distinct keys drawn
  uniformly without replacement, each value uniform (values may repeat);
- segment ``d`` starts with the queries: the P keys in a random order, one per position; the
  target at each query position is that key's value. Nothing else carries a target.

The query segment holds no value token, so a model that sees only the current segment (or a
memory cleared before it) can do no better than chance, ``1 / num_values``. Self-attention of
a MemGPT model spans one segment, so the answer must travel ``d`` segments through memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import TaskBatch, filler_segment, no_targets, positive

__all__ = ["RecallTask"]


@dataclass(frozen=True)
class RecallTask:
    """Segmented multi-query recall (the recipe is in the module docstring): ``distance + 1``
    segments of ``segment_len`` tokens, the pairs at the start of segment 0, the queries at the
    start of segment ``distance``.

    ``sample(b, generator)`` gives a :class:`TaskBatch` with input_ids and targets (b L),
    ``L = seq_len = (distance + 1) * segment_len``; chance is ``1 / num_values``.
    """

    num_pairs: int = 4
    num_keys: int = 16
    num_values: int = 16
    num_filler: int = 16
    segment_len: int = 16
    distance: int = 2

    def __post_init__(self) -> None:
        for name in ("num_pairs", "num_keys", "num_values", "num_filler", "segment_len", "distance"):
            positive("RecallTask", name, getattr(self, name))
        if self.num_pairs > self.num_keys:
            raise ValueError(f"RecallTask.num_pairs ({self.num_pairs}) must be <= num_keys ({self.num_keys})")
        if 2 * self.num_pairs > self.segment_len:
            raise ValueError(
                f"RecallTask: the {self.num_pairs} pairs need 2 * num_pairs = {2 * self.num_pairs} positions, "
                f"more than segment_len = {self.segment_len}"
            )

    @property
    def vocab_size(self) -> int:
        """Filler, key and value ids: ``num_filler + num_keys + num_values``."""
        return self.num_filler + self.num_keys + self.num_values

    @property
    def seq_len(self) -> int:
        """``L``, tokens per sample: ``(distance + 1) * segment_len``."""
        return (self.distance + 1) * self.segment_len

    @property
    def chance(self) -> float:
        """Accuracy of a guess: ``1 / num_values``."""
        return 1.0 / self.num_values

    def _draw(self, b: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """keys (b P) distinct per row, values (b P), order (b P) the query order: the secrets."""
        P, F, K = self.num_pairs, self.num_filler, self.num_keys
        keys = torch.rand(b, K, generator=generator).argsort(dim=1)[:, :P] + F
        values = torch.randint(0, self.num_values, (b, P), generator=generator) + F + K
        order = torch.rand(b, P, generator=generator).argsort(dim=1)
        return keys, values, order

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """A batch of ``batch_size`` samples, deterministic given the generator's state:
        input_ids and targets ``(b L)``, ``L = (d+1) T``."""
        positive("RecallTask.sample", "batch_size", batch_size)
        b, P, T, d = batch_size, self.num_pairs, self.segment_len, self.distance
        keys, values, order = self._draw(b, generator)
        ids = torch.cat([filler_segment(b, T, self.num_filler, generator) for _ in range(d + 1)], dim=1)
        targets = no_targets(b, self.seq_len)
        ids[:, 0 : 2 * P : 2] = keys
        ids[:, 1 : 2 * P : 2] = values
        q0 = d * T
        ids[:, q0 : q0 + P] = keys.gather(1, order)
        targets[:, q0 : q0 + P] = values.gather(1, order)
        return TaskBatch(ids, targets, T, d)

    def segments(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """The sample that :meth:`sample` would draw from this generator state, as ``d + 1``
        pairs (ids (b T), targets (b T)), one segment at a time.

        The secrets are drawn now, the filler of each segment as the iterator reaches it: do not
        draw from ``generator`` elsewhere until the iterator is exhausted.
        """
        positive("RecallTask.segments", "batch_size", batch_size)
        keys, values, order = self._draw(batch_size, generator)
        return self._stream(batch_size, keys, values, order, generator)

    def _stream(
        self, b: int, keys: Tensor, values: Tensor, order: Tensor, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        P, T = self.num_pairs, self.segment_len
        for s in range(self.distance + 1):
            ids, targets = filler_segment(b, T, self.num_filler, generator), no_targets(b, T)
            if s == 0:
                ids[:, 0 : 2 * P : 2] = keys
                ids[:, 1 : 2 * P : 2] = values
            if s == self.distance:
                ids[:, :P] = keys.gather(1, order)
                targets[:, :P] = values.gather(1, order)
            yield ids, targets
