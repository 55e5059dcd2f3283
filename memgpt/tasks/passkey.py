"""Passkey retrieval across segments (the Landmark Attention / Infini-attention setting, toy scale).

Recipe for one sample (``T`` = segment_len, ``d`` = distance, ``L`` = passkey_len):

- vocabulary: filler ids ``[0, F)``, digits ``[F, F+10)``, then ``PASS = F+10`` and ``ASK = F+11``;
- ``d + 1`` segments of filler, except segment 0 holds ``PASS p_1 ... p_L`` at a random offset
  (uniform over the offsets that fit), each digit uniform;
- segment ``d`` starts with ``ASK p_1 ... p_{L-1}``: the target at ``ASK`` is ``p_1`` and at
  ``p_i`` it is ``p_{i+1}``; nothing else carries a target.

Only the first digit needs memory; later digits see the earlier ones (teacher forcing) but not
the passkey, so a model without memory stays at chance (0.1) on every digit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import IGNORE_INDEX, TaskBatch, positive

__all__ = ["PasskeyTask"]


@dataclass(frozen=True)
class PasskeyTask:
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
        return self.num_filler + 10

    @property
    def ask_id(self) -> int:
        return self.num_filler + 11

    @property
    def vocab_size(self) -> int:
        return self.num_filler + 12

    @property
    def seq_len(self) -> int:
        return (self.distance + 1) * self.segment_len

    @property
    def chance(self) -> float:
        return 0.1

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        positive("PasskeyTask.sample", "batch_size", batch_size)
        b, L, T, F = batch_size, self.passkey_len, self.segment_len, self.num_filler
        ids = torch.randint(0, F, (b, self.seq_len), generator=generator)
        targets = torch.full((b, self.seq_len), IGNORE_INDEX, dtype=torch.long)
        digits = torch.randint(0, 10, (b, L), generator=generator) + F
        start = torch.randint(0, T - L, (b,), generator=generator)  # PASS at start, digits after
        cols = start[:, None] + torch.arange(L + 1)[None, :]
        ids.scatter_(1, cols, torch.cat([torch.full((b, 1), self.pass_id), digits], dim=1))
        q0 = self.distance * T
        ids[:, q0] = self.ask_id
        ids[:, q0 + 1 : q0 + L] = digits[:, : L - 1]
        targets[:, q0 : q0 + L] = digits
        return TaskBatch(ids, targets, T, self.distance)
