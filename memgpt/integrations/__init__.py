"""Memory layers for models you already have.

- :mod:`memgpt.integrations.wrap`: :class:`WithMemory` puts a memory layer after any block that
  maps (b n d) -> (b n d); :class:`ResidualMemory` is that memory on a residual stream;
  :func:`drop_in_memory` builds a ``MemoryLayer`` initialised near the identity.
- :mod:`memgpt.integrations.hf`: ``MemoryModel`` inserts memory after chosen layers of a
  Hugging Face model (imports ``transformers`` only when used; extra ``hf``).

Nothing here imports ``transformers``.
"""

from .states import MemoryStates
from .wrap import DROP_IN_FUSION_BIAS, ResidualMemory, WithMemory, drop_in_bias, drop_in_memory

__all__ = ["DROP_IN_FUSION_BIAS", "MemoryStates", "ResidualMemory", "WithMemory", "drop_in_bias", "drop_in_memory"]
