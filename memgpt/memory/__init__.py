"""The key-value memory store and its batched ops (fast path; plain twins in ``reference``)."""

from .checks import EVICTION_POLICIES
from .read import TOP_K_CHUNK, read, read_usage
from .reversible import start_log
from .state import MemoryState
from .stats import MemoryStats, memory_stats
from .write import USAGE_DECAY, write

__all__ = [
    "MemoryState",
    "read",
    "read_usage",
    "write",
    "EVICTION_POLICIES",
    "USAGE_DECAY",
    "TOP_K_CHUNK",
    "start_log",
    "MemoryStats",
    "memory_stats",
]
