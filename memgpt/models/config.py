"""The validated configuration of a MemGPT language model."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..memory.checks import check_eviction
from ..memory.write import USAGE_DECAY

__all__ = ["MemGPTConfig"]


def _int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"MemGPTConfig.{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"MemGPTConfig.{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class MemGPTConfig:
    """Sizes and memory settings of :class:`memgpt.MemGPTModel`.

    ``segment_len`` tokens form a segment: self-attention sees the current segment only;
    memory carries everything older. Each block has one memory layer with ``memory_heads``
    heads of ``memory_capacity`` slots per sample. ``token_shift`` adds a learned embedding of
    the previous token to each input embedding (see docs/concepts/streaming.md, *Token shift*).
    ``qk_norm`` makes memory reads cosine similarities with a learned per-head scale, starting
    at ``scale`` (default 10; see :class:`memgpt.layers.SoftmaxReader`). ``shift_keys`` keys the
    slot written for token t by the writer's key of token t-1 (the segment's first token by the
    key bias; :func:`memgpt.layers.writer.shift_keys`): induction-shaped writes.
    """

    vocab_size: int
    dim: int
    depth: int
    heads: int
    segment_len: int
    memory_capacity: int
    memory_heads: int = 1
    key_dim: int | None = None
    value_dim: int | None = None
    ffn_dim: int | None = None
    dropout: float = 0.0
    scale: float | None = None
    top_k: int | None = None
    eviction: str = "fifo"
    gated_scores: bool = True
    usage_decay: float = USAGE_DECAY
    fusion_bias_init: float = -3.0
    tie_embeddings: bool = True
    token_shift: bool = True
    qk_norm: bool = False
    shift_keys: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "depth", "heads", "segment_len", "memory_capacity", "memory_heads"):
            _int(name, getattr(self, name))
        for name in ("key_dim", "value_dim", "ffn_dim", "top_k"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name))
        if self.dim % self.heads:
            raise ValueError(f"MemGPTConfig.dim ({self.dim}) must be divisible by heads ({self.heads})")
        if (self.key_dim is None or self.value_dim is None) and self.dim % self.memory_heads:
            raise ValueError(
                f"MemGPTConfig.dim ({self.dim}) must be divisible by memory_heads ({self.memory_heads}) "
                "unless key_dim and value_dim are given"
            )
        check_eviction(self.eviction)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MemGPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.usage_decay <= 1.0:
            raise ValueError(f"MemGPTConfig.usage_decay must be in [0, 1], got {self.usage_decay}")
        for name in ("qk_norm", "shift_keys"):
            if not isinstance(getattr(self, name), bool):
                value = getattr(self, name)
                raise TypeError(f"MemGPTConfig.{name} must be a bool, got {type(value).__name__} ({value!r})")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"MemGPTConfig.scale must be > 0, got {self.scale}")

    @property
    def memory_key_dim(self) -> int:
        """``dk`` of the memory: ``key_dim``, or ``dim // memory_heads``."""
        return self.key_dim if self.key_dim is not None else self.dim // self.memory_heads

    @property
    def memory_value_dim(self) -> int:
        """``dv`` of the memory: ``value_dim``, or ``dim // memory_heads``."""
        return self.value_dim if self.value_dim is not None else self.dim // self.memory_heads

    def to_dict(self) -> dict:
        """Every field by name (``MemGPTConfig(**config.to_dict())`` rebuilds it)."""
        return asdict(self)
