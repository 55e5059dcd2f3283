"""torch.set_num_threads on a shared machine: 1 vs 2 threads, quiet and with a busy process on one core.

PyTorch's CPU kernels split work over an OpenMP team and wait for its slowest thread. When
another process holds one of the cores, the thread that shares that core runs in scheduler time
slices and every parallel region waits for it: two threads can then be many times slower than
one. The library never sets thread counts (that is the application's choice); this script
measures the effect so users can choose.

Workloads (fp32): a 1024 x 1024 matmul, and one MemGPTBlock forward + backward (width 256, 4
heads, segment 128, batch 4, memory 1,024 slots per row, full). Each is timed at 1 and 2 threads
(and at every core if the machine has more), first as the machine is, then with a Python
busy-loop subprocess pinned to core 0 (os.sched_setaffinity; unpinned where unavailable).
"Quiet" means no competitor of ours: other load on the machine shows in the load average printed.

    python benchmarks/bench_threads.py            # seconds per cell, about a minute
    python benchmarks/bench_threads.py --quick    # smaller workloads, short timings (CI)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager

import torch
from _report import measure_steps, parser, print_table, setup_run, write_json
from harness import machine_line

from memgpt import BlockState, MemGPTBlock, MemoryLayer

COLUMNS = [
    ("workload", "workload", "s"),
    ("condition", "condition", "s"),
    ("threads", "threads", "d"),
    ("ms", "median ms", ".2f"),
    ("iqr_ms", "IQR", ".2f"),
    ("runs", "runs", "d"),
    ("vs_1_thread", "÷ 1 thread", ".2f"),
    ("vs_quiet", "÷ quiet", ".2f"),
    ("load", "load avg", ".2f"),
]


def workloads(quick: bool, device, gen) -> list[tuple[str, callable]]:
    size = 256 if quick else 1024
    a, b = (torch.randn(size, size, generator=gen).to(device) for _ in range(2))
    dim, heads, n, batch, m = (64, 2, 32, 2, 128) if quick else (256, 4, 128, 4, 1024)
    layer = MemoryLayer(dim, heads=heads, capacity=m)
    block = MemGPTBlock(dim, heads, layer).to(device)
    s = layer.empty_state(batch, device=device)
    state = BlockState(
        s.replace(
            keys=torch.randn(s.keys.shape, generator=gen).to(device),
            values=torch.randn(s.values.shape, generator=gen).to(device),
            valid=torch.ones_like(s.valid),
            strength=torch.full_like(s.strength, 0.5),
            count=torch.full_like(s.count, m),
        )
    )
    x = torch.randn(batch, n, dim, generator=gen).to(device).requires_grad_()
    params = [x, *block.parameters()]

    def block_step():
        y, _ = block(x, state)
        return (y, *torch.autograd.grad(y.square().mean(), params, allow_unused=True)[:1])

    return [
        (f"matmul {size}x{size}", lambda: (a @ b,)),
        (f"MemGPTBlock fwd+bwd (d={dim}, n={n}, b={batch}, m={m})", block_step),
    ]


@contextmanager
def busy_core():
    """A Python busy loop in a subprocess, pinned to core 0 where the OS allows; killed on exit."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    pinned = False
    try:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(proc.pid, {0})
            pinned = True
        time.sleep(0.2)  # let it start spinning
        yield "busy loop on core 0" if pinned else "busy loop (unpinned)"
    finally:
        proc.kill()
        proc.wait()


def check_same_results(works, counts) -> None:
    """Thread count changes only the order of float sums: results agree to rounding."""
    for name, fn in works:
        outs = []
        for t in counts:
            torch.set_num_threads(t)
            outs.append(fn())
        for other in outs[1:]:
            for x, y in zip(outs[0], other):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def main() -> None:
    args = parser(__doc__).parse_args()
    device = setup_run(args)
    original = torch.get_num_threads()
    counts = sorted({1, 2, os.cpu_count() or 1})
    run_time = 0.3 if args.quick else 3.0
    gen = torch.Generator().manual_seed(0)
    works = workloads(args.quick, device, gen)
    if device.type == "cuda":
        print("note: on CUDA the thread count only affects host-side work (dispatch, the optimiser)")
    rows = []
    try:
        check_same_results(works, counts)
        print(machine_line())
        for condition in ("quiet", "busy"):
            ctx = busy_core() if condition == "busy" else _nothing()
            with ctx as what:
                for name, fn in works:
                    for t in counts:
                        torch.set_num_threads(t)
                        timing = measure_steps(
                            fn, f"{name}, {t} threads", min_run_time=run_time, min_runs=3, device=device
                        )
                        print(f"  {condition}: {timing}", flush=True)
                        rows.append(
                            dict(
                                workload=name,
                                condition=what or condition,
                                threads=t,
                                ms=timing.median * 1e3,
                                iqr_ms=timing.iqr * 1e3,
                                runs=timing.runs,
                                load=os.getloadavg()[0],
                            )
                        )
    finally:
        torch.set_num_threads(original)
    one = {(r["workload"], r["condition"]): r["ms"] for r in rows if r["threads"] == 1}
    quiet = {(r["workload"], r["threads"]): r["ms"] for r in rows if r["condition"] == "quiet"}
    for r in rows:
        r["vs_1_thread"] = r["ms"] / one[(r["workload"], r["condition"])]
        r["vs_quiet"] = r["ms"] / quiet[(r["workload"], r["threads"])]
    print()
    print_table(rows, COLUMNS)
    print("÷ 1 thread > 1: more threads were slower. The library never sets thread counts; scripts may.")
    print(machine_line())
    write_json(args.json, "bench_threads", args, {"rows": rows})


@contextmanager
def _nothing():
    yield None


if __name__ == "__main__":
    main()
