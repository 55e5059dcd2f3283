"""memgpt: memory-augmented transformer layers for PyTorch.

The memory is explicit state: ``y, state = layer(x, state)``. Shapes are in einops notation; the docs'
API reference (docs/reference/index.md) has the legend.
"""

# The subpackages, so that `import memgpt` is enough for `memgpt.tasks.RecallTask` and the like
# (memgpt.apps, the command line, is imported only when run).
from . import integrations, layers, memory, models, tasks, training
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
from .memory import MemoryState, MemoryStats
from .models import (
    BlockState,
    GenerationOutput,
    LayerTrace,
    MemGPTBlock,
    MemGPTConfig,
    MemGPTModel,
    MemGPTOutput,
    MemGPTState,
    MemoryTrace,
    SegmentBuffer,
    SegmentView,
    memory_stats,
    trace_memory,
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
    "MemoryStats",
    "memory_stats",
    "trace_memory",
    "MemoryTrace",
    "LayerTrace",
    "__version__",
    # the subpackages
    "integrations",
    "layers",
    "memory",
    "models",
    "tasks",
    "training",
]
