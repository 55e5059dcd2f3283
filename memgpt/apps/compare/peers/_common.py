"""What the peer adapters share: the reason strings a builder returns instead of raising, and the
memory size every peer with such a knob is given."""

from __future__ import annotations

__all__ = ["MEMORY_ENTRIES", "even_dim_head", "installed", "missing", "refused"]

# memgpt's contenders keep a store of 32 slots per memory layer: a peer with a memory-size knob
# (memory tokens, cached hidden states, kNN entries, state vectors) gets 32 entries per memory layer.
MEMORY_ENTRIES = 32


def even_dim_head(dim: int, heads: int) -> int:
    """``dim // heads`` rounded down to an even number (at least 2): the head width of a peer with
    rotary positions, which rotate pairs of features and fail at an odd width. The runner tunes
    ``dim`` in steps of ``heads``, so ``dim // heads`` is odd at every other width."""
    return max(2, dim // heads - dim // heads % 2)


def missing(package: str, err: Exception) -> str:
    """The row for a peer that is not installed."""
    return f"{package} is not installed ({type(err).__name__}: {err}); pip install -e '.[peers]'"


def refused(package: str, err: Exception) -> str:
    """The row for a peer that is installed but will not build at this shape."""
    return f"{package} refused the configuration ({type(err).__name__}: {err})"


def installed(distribution: str) -> str:
    """``name==version`` of the installed distribution, written into a contender's config (the
    pin in ``PACKAGE`` is what CI installs; this is what actually ran)."""
    from importlib.metadata import version

    return f"{distribution}=={version(distribution)}"
