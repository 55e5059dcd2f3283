"""Shared benchmark harness: medians with spread, same-run baselines, the machine's load.

Every script checks correctness against the reference before it times anything, and reports
ratios to a baseline measured in the same run (absolute times drift on shared machines).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch
from torch.utils import benchmark


@dataclass
class Timing:
    label: str
    median: float  # seconds
    iqr: float  # seconds
    runs: int

    def __str__(self) -> str:
        return f"{self.label}: {self.median * 1e3:.3f} ms (IQR {self.iqr * 1e3:.3f} ms, {self.runs} runs)"


def measure(fn, label: str, *, min_run_time: float = 1.0) -> Timing:
    """Median time of ``fn()`` with torch.utils.benchmark, on the process's thread count."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(), label=label)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return Timing(label, m.median, m.iqr, len(m.times))


def machine_line() -> str:
    """What ran the benchmark and how loaded the machine was (a loaded core skews everything)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"device {device}, 1-min load average {load:.2f}"
    )
