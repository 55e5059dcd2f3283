"""What every contender of ``python -m memgpt compare`` is: a language model that reads one
segment at a time and carries a state from segment to segment.

The runner treats memgpt, the no-memory baseline, full attention and every peer library alike:
it builds each at the width that brings its parameter count closest to a common target
(:func:`build_matched`), trains it with the same data, steps, batch, optimizer and segment
length, feeding a sample segment by segment (backpropagating through all of its segments), and
evaluates it by streaming much longer samples under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

__all__ = [
    "SEGMENT_LEN",
    "Contender",
    "Builder",
    "ModelShape",
    "n_params",
    "build_matched",
    "detach_tree",
    "check_logits",
]

State = Any  # whatever the contender carries between segments (None before the first)

SEGMENT_LEN = 16  # tokens per call in every task of the suite: self-attention sees no further back


@dataclass(frozen=True)
class ModelShape:
    """What every contender is built from; ``dim`` is the free width the runner tunes."""

    vocab_size: int
    segment_len: int  # tokens per call; self-attention never sees further back than this
    dim: int
    depth: int = 2
    heads: int = 4


@dataclass
class Contender:
    """A model plus the three functions the runner needs.

    ``step(ids, state) -> (logits, state)``: ids (b T) int64, one segment; logits (b T vocab).
    ``state`` is ``None`` before the first segment of a sample.
    ``detach(state) -> state``: cut the autograd graph (between evaluation chunks).
    ``max_tokens``: the longest sample it can take (``None``: it streams any length); longer
    evaluations get a row that says so instead of a number.
    ``config``: how it was configured, written beside its results.
    """

    name: str
    model: nn.Module
    step: Callable[[Tensor, State], tuple[Tensor, State]]
    detach: Callable[[State], State]
    config: dict = field(default_factory=dict)
    max_tokens: int | None = None


# A builder makes a contender for a shape, or returns a string saying why it cannot (a peer
# package that is not installed, a configuration the peer refuses).
Builder = Callable[[ModelShape], "Contender | str"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_matched(
    build: Builder, shape: ModelShape, target: int, dims: range | None = None
) -> tuple[Contender, int] | str:
    """(contender, width): ``build`` at the width in ``dims`` (default 16..512, multiples of
    ``shape.heads``) whose parameter count is closest to ``target``; or why it cannot be built.

    Parameter counts grow with the width, so a bisection finds the first width at or above the
    target; the answer is it or the width before it.
    """
    step = shape.heads
    widths = list(dims or range(step * max(1, -(-16 // step)), 513, step))
    built: dict[int, Contender | str] = {}

    def at(i: int) -> Contender | str:
        if i not in built:
            built[i] = build(ModelShape(shape.vocab_size, shape.segment_len, widths[i], shape.depth, shape.heads))
        return built[i]

    lo, hi = 0, len(widths) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        c = at(mid)
        if isinstance(c, str):
            return c
        if n_params(c.model) < target:
            lo = mid + 1
        else:
            hi = mid
    options: list[tuple[Contender, int]] = []
    for i in (lo, lo - 1) if lo else (lo,):
        c = at(i)
        if isinstance(c, str):
            return c
        options.append((c, widths[i]))
    return min(options, key=lambda cw: abs(n_params(cw[0].model) - target))


def detach_tree(state: State) -> State:
    """``detach`` for states made of tensors in (nested) tuples, lists and dicts."""
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, (tuple, list)):
        return type(state)(detach_tree(s) for s in state)
    if isinstance(state, dict):
        return {k: detach_tree(v) for k, v in state.items()}
    if hasattr(state, "detach"):
        return state.detach()
    return state


def check_logits(name: str, logits: Tensor, ids: Tensor, vocab_size: int) -> None:
    """Every adapter's step output is checked once: (b T vocab) float."""
    want = (*ids.shape, vocab_size)
    if not isinstance(logits, Tensor) or tuple(logits.shape) != want or not logits.is_floating_point():
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{name}: step must return float logits {want}, got {got}")
