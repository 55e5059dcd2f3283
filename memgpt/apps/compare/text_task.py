"""The ``text`` task of ``memgpt compare``: a character LM on CPython's standard library.

Training and validation use :class:`~memgpt.tasks.text_windows.TextWindowTask` windows of 8
segments of 16 characters (the train and validation splits), each with one chunk of 16-64
characters repeated further on (the copying curriculum of ``memgpt text``, the same windows for
every contender). Evaluation streams the first ``EVAL_CHARS`` characters of every held-out (test
split) file from its first character, one segment at a time, carrying each contender's state,
and reports bits per character:

- ``overall``: every character from the second on;
- ``far-copyable``: characters whose preceding 16 characters last occurred more than one segment
  back (:func:`~memgpt.tasks.text_windows.far_copyable_mask`), so only a memory can copy them;
- ``not-far-copyable``: the rest.

``EVAL_CHARS`` = 2,048 keeps full attention (which stops at 2,048 tokens) in the table as the
upper reference, and keeps an evaluation to seconds per contender.
"""

from __future__ import annotations

import functools
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from ...tasks.stdlib_text import StdlibCorpus
from ...tasks.text_windows import TextWindowTask, far_copyable_mask
from .contender import SEGMENT_LEN, Contender

__all__ = ["TEXT_POINTS", "EVAL_CHARS", "QUICK_EVAL_CHARS", "windows", "excerpts", "text_bits", "text_points"]

WINDOW_SEGMENTS = 8
REPEAT_LEN = (16, 64)
EVAL_CHARS = 2048
QUICK_EVAL_CHARS = 64
QUICK_EVAL_FILES = 4
TEXT_POINTS = ("overall", "far-copyable", "not-far-copyable")


@functools.lru_cache(maxsize=2)
def windows(split: str) -> TextWindowTask:
    """The training (``train``) or validation (``validation``) windows; read once per process."""
    return TextWindowTask(
        segment_len=SEGMENT_LEN, segments=WINDOW_SEGMENTS, split=split, repeat_prob=1.0, repeat_len=REPEAT_LEN
    )


@functools.lru_cache(maxsize=2)
def excerpts(chars: int = EVAL_CHARS, files: int | None = None) -> tuple[Tensor, ...]:
    """The first ``chars`` characters of each test-split file (the first ``files`` of them), ids (n,)."""
    held_out = [ids for _, ids in StdlibCorpus.scan().load("test")]
    return tuple(ids[:chars] for ids in held_out[:files] if len(ids) >= 2)


@torch.no_grad()
def text_bits(c: Contender, files: tuple[Tensor, ...], batch_size: int) -> list[Tensor]:
    """Per file ``ids (n,)``, the bits ``(n-1,)`` of characters 2..n, each predicted by streaming
    the file from its start one segment at a time (the contender's state starts empty).

    Files of a batch are padded at their end, and the last segment of the batch to a whole
    segment: every contender is causal, so padding after a file never changes its bits.
    """
    T = SEGMENT_LEN
    order = sorted(range(len(files)), key=lambda i: len(files[i]))  # similar lengths share a batch
    out: dict[int, Tensor] = {}
    for b0 in range(0, len(order), batch_size):
        rows = order[b0 : b0 + batch_size]
        n = [len(files[i]) - 1 for i in rows]  # predicted characters per file
        width = -(-max(n) // T) * T
        inputs = torch.zeros(len(rows), width, dtype=torch.long)
        targets = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            inputs[r, : n[r]], targets[r, : n[r]] = files[i][:-1], files[i][1:]
        state, bits = None, []
        for s in range(0, width, T):
            logits, state = c.step(inputs[:, s : s + T], state)
            nats = F.cross_entropy(logits.float().flatten(0, 1), targets[:, s : s + T].flatten(), reduction="none")
            bits.append(nats.view(len(rows), T) / math.log(2))
            state = c.detach(state)
        every = torch.cat(bits, dim=1)
        for r, i in enumerate(rows):
            out[i] = every[r, : n[r]]
    return [out[i] for i in range(len(files))]


def text_points(c: Contender, batch_size: int, quick: bool = False) -> list[dict]:
    """The ``text`` evaluation of one trained contender: bpc overall, far-copyable and not
    (``quick``: the first 64 characters of 4 files, a pipeline check)."""
    chars, files = (QUICK_EVAL_CHARS, QUICK_EVAL_FILES) if quick else (EVAL_CHARS, None)
    held_out = excerpts(chars, files)
    longest = max(len(f) - 1 for f in held_out)
    if c.max_tokens is not None and longest > c.max_tokens:
        why = f"{longest} characters exceed what it can attend to ({c.max_tokens})"
        return [dict(x=x, skipped=why) for x in TEXT_POINTS]
    t0 = time.perf_counter()
    bits = torch.cat(text_bits(c, held_out, batch_size))
    seconds = time.perf_counter() - t0
    # the mask, like the bits, starts at each file's second character
    far = torch.cat([far_copyable_mask(f, context=SEGMENT_LEN, distance=SEGMENT_LEN)[1:] for f in held_out])
    points = []
    for x, where in zip(TEXT_POINTS, (torch.ones_like(far), far, ~far)):
        picked = bits[where]
        bpc = float(picked.mean()) if picked.numel() else None  # none of its kind in these excerpts
        points.append(dict(x=x, bpc=bpc, characters=int(picked.numel()), seconds=seconds))
    return points
