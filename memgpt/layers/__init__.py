"""Composable layers: attention, the memory reader/writer/fusion, the memory layer, the FFN."""

from .attention import KVCache, MultiHeadAttention
from .feedforward import FeedForward
from .fusion import GatedFusion
from .memory_layer import MemoryLayer
from .reader import SoftmaxReader
from .writer import GatedWriter

__all__ = [
    "KVCache",
    "MultiHeadAttention",
    "FeedForward",
    "GatedFusion",
    "GatedWriter",
    "SoftmaxReader",
    "MemoryLayer",
]
