"""Helpers shared by the demonstration drivers (demo.py, textlm.py): JSON-safe configs, pyplot."""

from __future__ import annotations


def jsonable(d):
    """Dataclass-asdict output with tuples turned into lists (JSON has no tuples)."""
    if isinstance(d, dict):
        return {k: jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [jsonable(v) for v in d]
    return d


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the caller says how to get the plot
        return None
    return plt
