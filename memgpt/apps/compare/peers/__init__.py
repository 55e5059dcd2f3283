"""One adapter per peer library: each builds the peer's model through its public API, as its own
README shows, and wraps it as a :class:`~memgpt.apps.compare.contender.Contender`."""
