"""``import memgpt`` alone reaches every library subpackage (the README writes ``memgpt.tasks.RecallTask``),
and never the command line's applications or ``transformers``."""

from __future__ import annotations

import subprocess
import sys

SUBPACKAGES = ("integrations", "layers", "memory", "models", "tasks", "training")


def test_import_memgpt_reaches_the_subpackages_in_a_fresh_interpreter():
    code = (
        "import sys, memgpt\n"
        "print(memgpt.tasks.RecallTask.__name__, memgpt.tasks.TextWindowTask.__name__, memgpt.training.Trainer.__name__,"
        " memgpt.integrations.WithMemory.__name__, memgpt.memory.write.__name__)\n"
        "print(sorted(m for m in sys.modules if m == 'transformers' or m.startswith('memgpt.apps')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["RecallTask TextWindowTask Trainer WithMemory write", "[]"]


def test_the_subpackages_are_public_names():
    import memgpt

    assert set(SUBPACKAGES) <= set(memgpt.__all__)
