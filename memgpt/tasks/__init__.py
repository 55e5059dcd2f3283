"""Deterministic synthetic tasks that need memory across segments (see each module's recipe)."""

from .base import IGNORE_INDEX, TaskBatch
from .mqar import MQARTask
from .passkey import PasskeyTask, haystack_distance
from .recall import RecallTask

__all__ = ["TaskBatch", "RecallTask", "MQARTask", "PasskeyTask", "haystack_distance", "IGNORE_INDEX"]
