"""memgpt: memory-augmented transformer layers for PyTorch.

The memory is explicit state: ``y, state = layer(x, state)``. See the README for shapes.
"""

from .block import BlockState, MemGPTBlock, SegmentBuffer, SegmentView
from .config import MemGPTConfig
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
from .model import GenerationOutput, MemGPTModel, MemGPTOutput
from .model_state import MemGPTState

__version__ = "0.1.0"

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
