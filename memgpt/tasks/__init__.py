"""Deterministic synthetic tasks that need memory across segments (see each module's recipe)."""

from .base import IGNORE_INDEX, TaskBatch
from .passkey import PasskeyTask
from .recall import RecallTask

__all__ = ["TaskBatch", "RecallTask", "PasskeyTask", "IGNORE_INDEX"]
