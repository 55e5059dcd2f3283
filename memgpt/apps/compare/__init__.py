"""``python -m memgpt compare``: memgpt's memory against the no-memory baseline, full attention and
the peer libraries, on the same tasks, data, budget and parameter count."""
