"""Multi-query associative recall over many segments (Zoology's MQAR, Arora et al. 2023).

Recipe for one sample (``T`` = segment_len, ``P`` = num_pairs, ``Q`` = num_query_segments,
``d`` = distance):

- vocabulary: filler ids ``[0, F)``, key ids ``[F, F+K)``, value ids ``[F+K, F+K+V)``;
- **pairs region**, the first ``ceil(P / (T // 2))`` segments: ``k_1 v_1 k_2 v_2 ... k_P v_P``,
  ``T // 2`` pairs per segment from its start (so no pair straddles two segments when ``T`` is
  odd), the rest of the last pairs segment filler. The P keys are distinct, drawn uniformly
  without replacement; each value is uniform (values may repeat, as in :class:`RecallTask`;
  Zoology draws them distinct);
- ``d`` segments of filler (default 0);
- **query region**, ``Q`` segments starting at ``query_segment``: every key appears once more,
  at P distinct positions of the ``Q T`` positions; the target at each is that key's value.
  Every other position is filler (uniform over the filler ids) and carries no target.

Query positions follow Zoology's power law: position ``x = 1 .. Q T`` of the region is drawn
(without replacement) with weight ``x ** (power_a - 1)``. ``power_a = 1`` (the default) spreads
the queries uniformly over the region, so one sample asks at many distances; Zoology's
``power_a = 0.01`` puts most of them near its start. Which key is asked where is a uniform
permutation, independent of the positions (in Zoology the first pairs tend to be asked first).
Zoology also places queries at every other position only; here any position may hold one.

No value token appears in the query region, and self-attention of a MemGPT model spans one
segment, so every answer must come through memory; without it a model stays at chance,
``1 / num_values``. ``segments()`` streams the sample that ``sample()`` draws from the same
generator state (secrets first, then the filler one segment at a time).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import TaskBatch, filler_segment, no_targets, positive

__all__ = ["MQARTask"]


@dataclass(frozen=True)
class MQARTask:
    """Multi-query associative recall over segments (the recipe is in the module docstring):
    ``num_pairs`` key-value pairs in the pairs region, ``distance`` filler segments, then
    ``num_query_segments`` segments in which every key is asked once.

    ``sample(b, generator)`` gives a :class:`TaskBatch` with input_ids and targets (b L),
    ``L = seq_len = num_segments * segment_len``; ``segments()`` streams the same sample.
    Chance is ``1 / num_values``.
    """

    num_pairs: int = 32
    num_keys: int = 64
    num_values: int = 64
    num_filler: int = 16
    segment_len: int = 16
    num_query_segments: int = 4
    distance: int = 0
    power_a: float = 1.0

    def __post_init__(self) -> None:
        for name in ("num_pairs", "num_keys", "num_values", "num_filler", "num_query_segments"):
            positive("MQARTask", name, getattr(self, name))
        positive("MQARTask", "segment_len", self.segment_len, minimum=2)
        positive("MQARTask", "distance", self.distance, minimum=0)
        a = self.power_a
        if isinstance(a, bool) or not isinstance(a, (int, float)):
            raise TypeError(f"MQARTask.power_a must be a float, got {type(a).__name__} ({a!r})")
        if not (math.isfinite(a) and a > 0):
            raise ValueError(f"MQARTask.power_a must be a finite float > 0, got {a}")
        if self.num_pairs > self.num_keys:
            raise ValueError(f"MQARTask.num_pairs ({self.num_pairs}) must be <= num_keys ({self.num_keys})")
        room = self.num_query_segments * self.segment_len
        if self.num_pairs > room:
            raise ValueError(
                f"MQARTask: the {self.num_pairs} queries need num_pairs positions, more than the query region's "
                f"num_query_segments * segment_len = {self.num_query_segments} * {self.segment_len} = {room}"
            )

    @property
    def pairs_per_segment(self) -> int:
        """Pairs in one segment of the pairs region: ``segment_len // 2``."""
        return self.segment_len // 2

    @property
    def pair_segments(self) -> int:
        """Segments of the pairs region."""
        return -(-self.num_pairs // self.pairs_per_segment)

    @property
    def query_segment(self) -> int:
        """Index of the first query segment."""
        return self.pair_segments + self.distance

    @property
    def num_segments(self) -> int:
        """Segments per sample: pairs region, gap and query region."""
        return self.query_segment + self.num_query_segments

    @property
    def vocab_size(self) -> int:
        """Filler, key and value ids: ``num_filler + num_keys + num_values``."""
        return self.num_filler + self.num_keys + self.num_values

    @property
    def seq_len(self) -> int:
        """``L``, tokens per sample: ``num_segments * segment_len``."""
        return self.num_segments * self.segment_len

    @property
    def chance(self) -> float:
        """Accuracy of a guess: ``1 / num_values``."""
        return 1.0 / self.num_values

    def key_columns(self) -> Tensor:
        """(P,) int64 position of each pair's key in the sample (its value follows it)."""
        i = torch.arange(self.num_pairs)
        pps = self.pairs_per_segment
        return (i // pps) * self.segment_len + 2 * (i % pps)

    def _draw(self, b: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The secrets: keys (b P) distinct per row, values (b P), positions (b P) of the queries
        in the query region (ascending), order (b P) which pair is asked at each position."""
        P, F, K, n = self.num_pairs, self.num_filler, self.num_keys, self.num_query_segments * self.segment_len
        keys = torch.rand(b, K, generator=generator).argsort(dim=1)[:, :P] + F
        values = torch.randint(0, self.num_values, (b, P), generator=generator) + F + K
        weights = torch.arange(1, n + 1, dtype=torch.float64) ** (self.power_a - 1)
        positions = torch.multinomial(weights.expand(b, n), P, replacement=False, generator=generator)
        positions = positions.sort(dim=1).values
        order = torch.rand(b, P, generator=generator).argsort(dim=1)
        return keys, values, positions, order

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """A batch of ``batch_size`` samples, deterministic given the generator's state:
        input_ids and targets ``(b L)``; ``query_segment`` is the first query segment."""
        positive("MQARTask.sample", "batch_size", batch_size)
        b, T = batch_size, self.segment_len
        keys, values, positions, order = self._draw(b, generator)
        ids = torch.cat([filler_segment(b, T, self.num_filler, generator) for _ in range(self.num_segments)], dim=1)
        targets = no_targets(b, self.seq_len)
        cols = self.key_columns()
        ids[:, cols] = keys
        ids[:, cols + 1] = values
        at = self.query_segment * T + positions
        ids.scatter_(1, at, keys.gather(1, order))
        targets.scatter_(1, at, values.gather(1, order))
        return TaskBatch(ids, targets, T, self.query_segment)

    def segments(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """The sample that :meth:`sample` would draw from this generator state, as
        ``num_segments`` pairs (ids (b T), targets (b T)), one segment at a time.

        The secrets are drawn now, the filler of each segment as the iterator reaches it: do not
        draw from ``generator`` elsewhere until the iterator is exhausted.
        """
        positive("MQARTask.segments", "batch_size", batch_size)
        keys, values, positions, order = self._draw(batch_size, generator)
        return self._stream(
            batch_size, keys, values, positions, keys.gather(1, order), values.gather(1, order), generator
        )

    def _stream(
        self,
        b: int,
        keys: Tensor,
        values: Tensor,
        positions: Tensor,
        asked: Tensor,
        answers: Tensor,
        generator: torch.Generator,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        T, pps = self.segment_len, self.pairs_per_segment
        for s in range(self.num_segments):
            ids, targets = filler_segment(b, T, self.num_filler, generator), no_targets(b, T)
            if s < self.pair_segments:
                lo, hi = s * pps, min(self.num_pairs, (s + 1) * pps)
                ids[:, 0 : 2 * (hi - lo) : 2] = keys[:, lo:hi]
                ids[:, 1 : 2 * (hi - lo) : 2] = values[:, lo:hi]
            elif s >= self.query_segment:
                local = positions - (s - self.query_segment) * T  # (b P)
                row, j = ((local >= 0) & (local < T)).nonzero(as_tuple=True)  # the queries in s
                ids[row, local[row, j]] = asked[row, j]
                targets[row, local[row, j]] = answers[row, j]
            yield ids, targets
