"""Command line, tables, JSON and a setup-aware timer shared by bench_block, bench_model and bench_threads."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from harness import Timing, machine_line, measure


def parser(doc: str) -> argparse.ArgumentParser:
    """--quick, --device and --json, the options every benchmark script takes."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes and short timings (seconds; CI)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--json", metavar="PATH", help="also write the rows and the machine line as JSON")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for this run (default: torch's own choice)")
    return p


def setup_run(args: argparse.Namespace) -> torch.device:
    """Apply --threads (this script only; the library never sets thread counts) and resolve --device."""
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_steps(fn, label: str, *, min_run_time: float, min_runs: int, device: torch.device) -> Timing:
    """harness.measure, after one timed warm-up call that sets the run time to >= ``min_runs`` calls.

    blocked_autorange stops after ``min_run_time``: a step of seconds would otherwise be timed once.
    """
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - start
    return measure(fn, label, min_run_time=max(min_run_time, min_runs * first))


def measure_with_setup(fn, setup, label: str, *, runs: int, device: torch.device) -> Timing:
    """Median of ``runs`` timed calls of ``fn()``, each after an untimed ``setup()``.

    For peers whose state a timed step changes irreversibly (the KNN index resets at capacity),
    so that every timed step starts from the same state. One untimed warm-up call first.
    """
    setup()
    fn()
    times = []
    for _ in range(runs):
        setup()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Timing(label, statistics.median(times), q[2] - q[0], len(times))


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec); a missing or None value prints as '-'."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(k) is None else format(row[k], f) for k, _, f in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    left = [f == "s" for _, _, f in columns]  # text left, numbers right

    def line(r: list[str]) -> str:
        return " | ".join(c.ljust(w) if lft else c.rjust(w) for c, w, lft in zip(r, widths, left)).rstrip()

    print(line(cells[0]))
    print("-+-".join("-" * w for w in widths))
    for r in cells[1:]:
        print(line(r))


def write_json(path: str | None, script: str, args: argparse.Namespace, sections: dict) -> None:
    if path is None:
        return
    payload = {"script": script, "machine": machine_line(), "args": vars(args), **sections}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")
