"""Applications built on the library: the command line (``python -m memgpt``), the demonstration,
the real-text experiment and their reports.

The library never imports this package; it may import everything else.
"""
