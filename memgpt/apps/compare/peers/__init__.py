"""One adapter per peer library: each builds the peer's model through its public API, as its own
README shows, and wraps it as a :class:`~memgpt.apps.compare.contender.Contender`.

``PEERS`` maps a short name to the adapter's ``build``. Every adapter imports its peer package
inside ``build`` only, so importing this registry never fails: a peer that is not installed (the
``peers`` extra) builds into a string that says so, and gets a row instead of numbers.

| name | package | memory carried across segments |
| --- | --- | --- |
| ``titans`` | titans-pytorch | neural memory (MLP weights) on every layer; whole prefix re-run |
| ``rmt`` | recurrent-memory-transformer-pytorch | 32 memory tokens |
| ``infini`` | infini-transformer-pytorch | compressive (linear-attention) memory per layer |
| ``memorizing`` | memorizing-transformers-pytorch | kNN memory of 32 past keys/values (host) |
| ``xl`` | x-transformers | Transformer-XL cache of 32 hidden states per layer |
| ``block-recurrent`` | block-recurrent-transformer-pytorch | 32 recurrent state vectors + previous block |
"""

from __future__ import annotations

from ..contender import Builder
from . import block_recurrent, infini, memorizing, rmt, titans, xtransformers

__all__ = ["PEERS", "PACKAGES"]

_MODULES = {
    "titans": titans,
    "rmt": rmt,
    "infini": infini,
    "memorizing": memorizing,
    "xl": xtransformers,
    "block-recurrent": block_recurrent,
}

PEERS: dict[str, Builder] = {name: module.build for name, module in _MODULES.items()}
PACKAGES: dict[str, str] = {name: module.PACKAGE for name, module in _MODULES.items()}
