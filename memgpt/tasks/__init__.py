"""Deterministic synthetic tasks that need memory across segments (see each module's recipe)."""

from .base import IGNORE_INDEX, TaskBatch
from .mqar import MQARTask
from .passkey import PasskeyTask, haystack_distance
from .recall import RecallTask
from .stdlib_text import CharVocab, StdlibCorpus
from .text_windows import TextWindowTask, copy_probe, far_copyable_mask

__all__ = [
    "TaskBatch",
    "RecallTask",
    "MQARTask",
    "PasskeyTask",
    "haystack_distance",
    "IGNORE_INDEX",
    "CharVocab",
    "StdlibCorpus",
    "TextWindowTask",
    "copy_probe",
    "far_copyable_mask",
]
