"""memgpt: memory-augmented transformer layers for PyTorch.

The memory is explicit state: ``y, state = layer(x, state)``. See the README for shapes.
"""

from ._version import __version__
from .layers import (
    FeedForward,
    GatedFusion,
    GatedWriter,
    KVCache,
    MemoryLayer,
    MultiHeadAttention,
    SoftmaxReader,
)
from .memory import MemoryState
from .models import (
    BlockState,
    GenerationOutput,
    MemGPTBlock,
    MemGPTConfig,
    MemGPTModel,
    MemGPTOutput,
    MemGPTState,
    SegmentBuffer,
    SegmentView,
)

__all__ = [
    "MemoryState",
    "MemoryLayer",
    "MemGPTBlock",
    "BlockState",
    "SegmentBuffer",
    "SegmentView",
    "MemGPTConfig",
    "MemGPTModel",
    "MemGPTOutput",
    "MemGPTState",
    "GenerationOutput",
    "MultiHeadAttention",
    "KVCache",
    "GatedWriter",
    "SoftmaxReader",
    "GatedFusion",
    "FeedForward",
    "__version__",
]
