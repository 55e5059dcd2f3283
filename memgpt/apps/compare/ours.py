"""memgpt's own contenders: the memory model under each eviction policy and read, the no-memory
baseline and full attention, all :class:`MemGPTModel` of the same architecture.

- ``memgpt-<policy>``: a MemGPTModel whose self-attention spans one segment, with a store of
  ``capacity`` slots per layer (default 32) evicted by ``fifo``, ``strength`` or ``usage``;
  ``memgpt-<policy>-top<k>`` reads only the ``k`` best-scoring slots;
- ``baseline``: the same model with its state dropped at every segment (nothing crosses one);
- ``full-attention``: one segment spanning the whole sample (memory unused), the ceiling where it
  fits; it cannot stream, so it stops at ``max_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor

from ...models import MemGPTConfig, MemGPTModel, MemGPTState
from .contender import Builder, Contender, ModelShape

__all__ = ["OURS", "memgpt_contender", "baseline_contender", "full_attention_contender"]

FULL_ATTENTION_MAX_TOKENS = 2048  # (b h n n) scores at batch 32: beyond this it no longer fits well


def _config(shape: ModelShape, capacity: int, eviction: str, top_k: int | None, segment_len: int) -> MemGPTConfig:
    return MemGPTConfig(
        vocab_size=shape.vocab_size,
        dim=shape.dim,
        depth=shape.depth,
        heads=shape.heads,
        segment_len=segment_len,
        memory_capacity=capacity,
        memory_heads=shape.heads,
        eviction=eviction,
        top_k=top_k,
    )


def _detach(state: MemGPTState | None) -> MemGPTState | None:
    return None if state is None else state.detach()


def memgpt_contender(shape: ModelShape, *, eviction: str, capacity: int = 32, top_k: int | None = None) -> Contender:
    config = _config(shape, capacity, eviction, top_k, shape.segment_len)
    model = MemGPTModel(config)

    def step(ids: Tensor, state: MemGPTState | None) -> tuple[Tensor, MemGPTState]:
        out = model(ids, state)
        return out.logits, out.state

    name = f"memgpt-{eviction}" + (f"-top{top_k}" if top_k else "")
    return Contender(name, model, step, _detach, config=config.to_dict())


def baseline_contender(shape: ModelShape, *, capacity: int = 32) -> Contender:
    config = _config(shape, capacity, "fifo", None, shape.segment_len)
    model = MemGPTModel(config)

    def step(ids: Tensor, state: None) -> tuple[Tensor, None]:
        return model(ids).logits, None  # a fresh state every segment: nothing crosses a boundary

    return Contender("baseline", model, step, _detach, config={"state": "dropped every segment"})


def full_attention_contender(shape: ModelShape, *, max_tokens: int = FULL_ATTENTION_MAX_TOKENS) -> Contender:
    """Causal attention over everything fed so far: a MemGPTModel whose one segment spans
    ``max_tokens``, fed segment by segment (its state holds the unfinished segment's attention
    keys and values, so this is exact full attention); it stops at ``max_tokens``."""
    config = _config(shape, 1, "fifo", None, max_tokens)
    model = MemGPTModel(config)

    def step(ids: Tensor, state: MemGPTState | None) -> tuple[Tensor, MemGPTState]:
        out = model(ids, state)
        return out.logits, out.state

    return Contender("full-attention", model, step, _detach, config=config.to_dict(), max_tokens=max_tokens)


def _named(fn: Callable[..., Contender], **kwargs) -> Builder:
    return partial(fn, **kwargs)


# name -> builder; the runner builds each at the width that matches the parameter target.
OURS: dict[str, Builder] = {
    "memgpt-strength": _named(memgpt_contender, eviction="strength"),
    "memgpt-fifo": _named(memgpt_contender, eviction="fifo"),
    "memgpt-usage": _named(memgpt_contender, eviction="usage"),
    "memgpt-strength-top8": _named(memgpt_contender, eviction="strength", top_k=8),
    "baseline": _named(baseline_contender),
    "full-attention": _named(full_attention_contender),
}
