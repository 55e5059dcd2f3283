"""Passkey retrieval across segments (the Landmark Attention / Infini-attention setting, toy scale).

Recipe for one sample (``T`` = segment_len, ``d`` = distance, ``L`` = passkey_len):

- vocabulary: filler ids ``[0, F)``, digits ``[F, F+10)``, then ``PASS = F+10`` and ``ASK = F+11``;
- ``d + 1`` segments of filler, except segment 0 holds ``PASS p_1 ... p_L`` at a random offset
  (uniform over the offsets that fit), each digit uniform;
- segment ``d`` starts with ``ASK p_1 ... p_{L-1}``: the target at ``ASK`` is ``p_1`` and at
  ``p_i`` it is ``p_{i+1}``; nothing else carries a target.

Only the first digit needs memory; later digits see the earlier ones (teacher forcing) but not
the passkey, so a model without memory stays at chance (0.1) on every digit.

Long haystacks stream: :meth:`PasskeyTask.segments` yields the sample of :meth:`PasskeyTask.sample`
one ``(b T)`` segment at a time, drawing each filler segment as it goes (the secrets, ``(b L)``
digits and ``(b,)`` offsets, are drawn first), so memory stays flat up to millions of tokens.
:meth:`PasskeyTask.for_length` and :func:`haystack_distance` size the haystack in tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import TaskBatch, filler_segment, no_targets, positive

__all__ = ["PasskeyTask", "haystack_distance"]


def haystack_distance(num_tokens: int, segment_len: int = 16) -> int:
    """The distance ``d`` of the shortest passkey sample of at least ``num_tokens`` tokens:
    ``d = ceil(num_tokens / T) - 1``, so ``(d+1) T`` is ``num_tokens`` rounded up to whole
    segments (1,048,576 tokens at ``T = 16``: ``d = 65,535``, 65,536 segments)."""
    positive("haystack_distance", "num_tokens", num_tokens)
    positive("haystack_distance", "segment_len", segment_len)
    if num_tokens <= segment_len:
        raise ValueError(
            f"haystack_distance: a haystack needs at least 2 segments (num_tokens > segment_len = "
            f"{segment_len}), got num_tokens = {num_tokens}"
        )
    return -(-num_tokens // segment_len) - 1


@dataclass(frozen=True)
class PasskeyTask:
    """Passkey retrieval across ``distance`` segments (the recipe is in the module docstring):
    ``PASS`` and ``passkey_len`` digits in segment 0, ``ASK`` at the start of segment ``distance``.

    ``sample(b, generator)`` gives a :class:`TaskBatch` with input_ids and targets (b L),
    ``L = seq_len = (distance + 1) * segment_len``; chance is 0.1 per digit.
    """

    passkey_len: int = 4
    num_filler: int = 16
    segment_len: int = 16
    distance: int = 2

    def __post_init__(self) -> None:
        for name in ("passkey_len", "num_filler", "segment_len", "distance"):
            positive("PasskeyTask", name, getattr(self, name))
        if self.passkey_len + 1 > self.segment_len:
            raise ValueError(
                f"PasskeyTask: PASS and {self.passkey_len} digits need {self.passkey_len + 1} positions, "
                f"more than segment_len = {self.segment_len}"
            )

    @property
    def pass_id(self) -> int:
        """The ``PASS`` token that precedes the passkey."""
        return self.num_filler + 10

    @property
    def ask_id(self) -> int:
        """The ``ASK`` token that starts the question."""
        return self.num_filler + 11

    @property
    def vocab_size(self) -> int:
        """Filler ids, 10 digits, ``PASS`` and ``ASK``."""
        return self.num_filler + 12

    @property
    def seq_len(self) -> int:
        """``L``, tokens per sample: ``(distance + 1) * segment_len``."""
        return (self.distance + 1) * self.segment_len

    @property
    def chance(self) -> float:
        """Accuracy of a guess, per digit."""
        return 0.1

    @classmethod
    def for_length(
        cls, num_tokens: int, *, passkey_len: int = 4, num_filler: int = 16, segment_len: int = 16
    ) -> PasskeyTask:
        """The task whose haystack is ``num_tokens`` tokens rounded up to whole segments
        (``distance = haystack_distance(num_tokens, segment_len)``)."""
        distance = haystack_distance(num_tokens, segment_len)
        return cls(passkey_len=passkey_len, num_filler=num_filler, segment_len=segment_len, distance=distance)

    def _draw(self, b: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """digits (b L) as token ids, start (b,) the offset of PASS in segment 0: the secrets."""
        L, T = self.passkey_len, self.segment_len
        digits = torch.randint(0, 10, (b, L), generator=generator) + self.num_filler
        start = torch.randint(0, T - L, (b,), generator=generator)
        return digits, start

    def _hide(self, ids: Tensor, digits: Tensor, start: Tensor) -> None:
        """Write ``PASS p_1 ... p_L`` at ``start`` into the (b T) first segment ``ids``, in place."""
        b, L = digits.shape
        cols = start[:, None] + torch.arange(L + 1)[None, :]
        ids.scatter_(1, cols, torch.cat([torch.full((b, 1), self.pass_id), digits], dim=1))

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """A batch of ``batch_size`` samples, deterministic given the generator's state:
        input_ids and targets ``(b L)``, ``L = (d+1) T``."""
        positive("PasskeyTask.sample", "batch_size", batch_size)
        b, L, T, d = batch_size, self.passkey_len, self.segment_len, self.distance
        digits, start = self._draw(b, generator)
        ids = torch.cat([filler_segment(b, T, self.num_filler, generator) for _ in range(d + 1)], dim=1)
        targets = no_targets(b, self.seq_len)
        self._hide(ids[:, :T], digits, start)  # a view: writes into ids
        q0 = d * T
        ids[:, q0] = self.ask_id
        ids[:, q0 + 1 : q0 + L] = digits[:, : L - 1]
        targets[:, q0 : q0 + L] = digits
        return TaskBatch(ids, targets, T, d)

    def segments(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """The sample that :meth:`sample` would draw from this generator state, as ``d + 1``
        pairs (ids (b T), targets (b T)), each filler segment drawn as the iterator reaches it.

        Holds ``O(b (T + L))`` tensors whatever ``d``; do not draw from ``generator`` elsewhere
        until the iterator is exhausted.
        """
        positive("PasskeyTask.segments", "batch_size", batch_size)
        digits, start = self._draw(batch_size, generator)
        return self._stream(batch_size, digits, start, generator)

    def _stream(
        self, b: int, digits: Tensor, start: Tensor, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        L, T = self.passkey_len, self.segment_len
        for s in range(self.distance + 1):
            ids, targets = filler_segment(b, T, self.num_filler, generator), no_targets(b, T)
            if s == 0:
                self._hide(ids, digits, start)
            if s == self.distance:
                ids[:, 0] = self.ask_id
                ids[:, 1:L] = digits[:, : L - 1]
                targets[:, :L] = digits
            yield ids, targets
