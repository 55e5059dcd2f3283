"""The tasks of ``memgpt compare``: what each contender trains on and where it is evaluated.

Every task trains on short samples (the answers 1-8 segments after what they need) and is
evaluated far beyond them, on samples streamed segment by segment:

- ``recall``: :class:`~memgpt.tasks.RecallTask`, 4 key-value pairs in segment 0, the keys
  queried ``d`` segments later; evaluated at ``d`` = 1 ... 1,024 segments;
- ``mqar``: :class:`~memgpt.tasks.MQARTask`, 16 key-value pairs over the first 2 segments, each
  key asked once in the 2 query segments that follow a gap of ``g`` filler segments (trained at
  ``g`` = 0 ... 4); evaluated at ``g`` = 1 ... 256;
- ``passkey``: :class:`~memgpt.tasks.PasskeyTask`, a 4-digit passkey in segment 0 asked for
  ``d`` segments later; evaluated on haystacks of 1k ... 1M tokens;
- ``text``: the stdlib character LM (:mod:`.text_task`): trained on windows of 8 segments, scored
  in bits per character on the first 2,048 characters of each held-out file, overall and on the
  far-copyable characters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ...tasks import MQARTask, PasskeyTask, RecallTask, TaskBatch
from ...tasks.text_windows import TextWindowTask
from .contender import SEGMENT_LEN, Contender
from .text_task import TEXT_POINTS, text_points, windows

__all__ = ["SuiteTask", "TASKS", "segments_of"]


Task = RecallTask | PasskeyTask | MQARTask | TextWindowTask


@dataclass(frozen=True)
class SuiteTask:
    """``make(x)``: the task instance whose samples put the answers at evaluation point ``x``
    (a distance in segments, or a haystack length in tokens); ``train_x``: the points sampled
    uniformly per training batch; ``eval_x``: the evaluation points; ``x_label``: what x is.

    ``metric``: ``acc`` (accuracy on the answers, higher is better; the best learning rate has the
    best validation accuracy, then loss) or ``bpc`` (bits per character, lower is better; the best
    learning rate has the lowest validation loss). ``make_val``: the validation task at a training
    point (default ``make``, sampled with another seed). ``evaluate(contender, batch_size, quick)``:
    the evaluation points of a trained contender, instead of accuracy at each of ``eval_x``.
    """

    name: str
    make: Callable[[int], Task]
    train_x: tuple[int, ...]
    eval_x: tuple[int | str, ...]
    quick_eval_x: tuple[int | str, ...]
    x_label: str
    metric: Literal["acc", "bpc"] = "acc"
    make_val: Callable[[int], Task] | None = None
    evaluate: Callable[[Contender, int, bool], list[dict]] | None = None

    @property
    def vocab_size(self) -> int:
        return self.make(self.train_x[0]).vocab_size

    def segments(self, x: int) -> int:
        task = self.make(x)
        return task.seq_len // task.segment_len


def segments_of(task: Task, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """(ids (b T), targets (b T)) for each segment of a sample of ``task``; streamed without
    materialising the sample when the task can (``task.segments``)."""
    stream = getattr(task, "segments", None)  # TextWindowTask.segments is a count, not a stream
    if callable(stream):
        yield from stream(batch_size, generator)
        return
    batch: TaskBatch = task.sample(batch_size, generator)
    T = batch.segment_len
    for s in range(0, batch.input_ids.shape[1], T):
        yield batch.input_ids[:, s : s + T], batch.targets[:, s : s + T]


TRAIN_DISTANCES = (1, 2, 3, 4, 5, 6, 7, 8)


TASKS: dict[str, SuiteTask] = {
    "recall": SuiteTask(
        name="recall",
        make=lambda d: RecallTask(segment_len=SEGMENT_LEN, distance=d),
        train_x=TRAIN_DISTANCES,
        eval_x=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        quick_eval_x=(1, 4, 16),
        x_label="distance (segments of 16 tokens)",
    ),
    "mqar": SuiteTask(
        name="mqar",
        make=lambda gap: MQARTask(
            num_pairs=16, num_keys=64, num_values=64, segment_len=SEGMENT_LEN, num_query_segments=2, distance=gap
        ),
        train_x=(0, 1, 2, 3, 4),
        eval_x=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        quick_eval_x=(1, 4),
        x_label="gap between pairs and queries (segments of 16 tokens)",
    ),
    "passkey": SuiteTask(
        name="passkey",
        make=lambda tokens: PasskeyTask.for_length(tokens, segment_len=SEGMENT_LEN),
        train_x=tuple((d + 1) * SEGMENT_LEN for d in TRAIN_DISTANCES),
        eval_x=(1024, 4096, 16384, 65536, 262144, 1048576),
        quick_eval_x=(64, 256),
        x_label="haystack length (tokens)",
    ),
    "text": SuiteTask(
        name="text",
        make=lambda _: windows("train"),
        make_val=lambda _: windows("validation"),
        train_x=(8,),  # segments per window (one kind of sample)
        eval_x=TEXT_POINTS,
        quick_eval_x=TEXT_POINTS,
        x_label="characters of the held-out files (first 2,048 of each)",
        metric="bpc",
        evaluate=text_points,
    ),
}
