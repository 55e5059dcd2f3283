"""Models built from the layers: the MemGPT decoder block, the language model, its config and the
state it carries between calls (with the state's file format).

Imports :mod:`memgpt.layers` and :mod:`memgpt.memory`; never the training or application code.
"""

from .block import BlockState, MemGPTBlock, SegmentBuffer, SegmentView
from .config import MemGPTConfig
from .introspect import LayerTrace, MemoryTrace, memory_stats, trace_memory
from .model import GenerationOutput, MemGPTModel, MemGPTOutput
from .state import MemGPTState

__all__ = [
    "MemGPTConfig",
    "MemGPTBlock",
    "BlockState",
    "SegmentBuffer",
    "SegmentView",
    "MemGPTModel",
    "MemGPTOutput",
    "GenerationOutput",
    "MemGPTState",
    "memory_stats",
    "trace_memory",
    "MemoryTrace",
    "LayerTrace",
]
