"""Scaling curves of the memory ops: time vs capacity (1k → 1M slots) and vs batch, and the bytes
a slot costs against the theoretical minimum.

Curves (fp32, H=8 heads, n=256 queries/tokens, d=64):

- vs capacity, B=1: full read, top-k read (k=32), write out of place, write in place
  (inference), and a MemoryLayer forward+backward (dim 512: read, fuse, write, then one probe read
  of the new store so that the write's backward runs) with the copying write and with the
  logged in-place write;
- vs batch, m=4,096: the same ops at B = 1 … 16, as time per row;
- bytes per slot: every MemoryState field per slot and head against ``heads·(dk+dv)·4``.

Every point is a median over repeated runs (one run for the slowest points), after the ops were
checked against the reference twins. The plot goes to ``docs/results/scaling.png`` (``--plot``).

    python benchmarks/bench_scaling.py --plot       # the full curves (a few minutes)
    python benchmarks/bench_scaling.py --quick      # tiny sizes, seconds (CI)
    python benchmarks/bench_scaling.py --device cuda   # the same curves on a GPU
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import torch
from _report import resolve_device
from bench_ops import check_correct, full_state, in_place_writer
from harness import machine_line, measure

from memgpt.layers import MemoryLayer
from memgpt.memory import MemoryState, read, start_log, write

H, N, D, TOP_K = 8, 256, 64, 32


def bytes_per_slot(state: MemoryState) -> tuple[float, float]:
    """(actual, minimum) bytes per slot and head: all per-slot fields vs keys+values alone."""
    b, h, m = state.valid.shape
    per_slot = sum(
        getattr(state, f.name).element_size() * getattr(state, f.name).numel()
        for f in fields(state)
        if f.name != "count"
    ) / (b * h * m)
    count = state.count.element_size() * state.count.numel() / (b * h * m)
    minimum = (state.key_dim + state.value_dim) * state.keys.element_size()
    return per_slot + count, float(minimum)


def time_ops(
    B: int, m: int, gen: torch.Generator, run_time: float, layer: MemoryLayer | None, device: torch.device
) -> dict:
    state = full_state(B, H, m, D, gen, device)
    q = torch.randn(B, H, N, D, generator=gen).to(device)
    keys = torch.randn(B, H, N, D, generator=gen).to(device)
    values = torch.randn(B, H, N, D, generator=gen).to(device)
    g = torch.rand(B, H, N, generator=gen).to(device)
    out = {
        "read": measure(lambda: read(q, state), "read", min_run_time=run_time).median,
        "top_k": measure(lambda: read(q, state, top_k=TOP_K), "top-k", min_run_time=run_time).median,
        "write": measure(lambda: write(state, keys, values, g), "write", min_run_time=run_time).median,
        "write_in_place": measure(
            in_place_writer(state, keys, values, g), "write in place", min_run_time=run_time
        ).median,
    }
    if layer is not None:
        x = torch.randn(B, N, layer.dim, generator=gen).to(device).requires_grad_()
        probe = torch.randn(B, H, 1, D, generator=gen).to(device)  # a later read: the write's backward runs
        holder = [state.clone()]

        def step(inplace: bool):
            # inplace: the logged write (a new graph on the same tensors each call: no copy)
            start = start_log(holder[0].detach()) if inplace else state
            y, new = layer(x, start, inplace=inplace)
            (y.square().mean() + read(probe, new).mean()).backward()
            if inplace:
                holder[0] = new

        out["layer_fwd_bwd"] = measure(lambda: step(False), "layer fwd+bwd", min_run_time=run_time).median
        out["layer_logged"] = measure(lambda: step(True), "layer fwd+bwd, logged", min_run_time=run_time).median
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    caps = [r["m"] for r in results["capacity"]]
    for key, label in [
        ("read", "full read"),
        ("top_k", f"top-k read (k={TOP_K})"),
        ("write", "write, out of place (training)"),
        ("write_in_place", "write, in place (inference)"),
        ("layer_fwd_bwd", "MemoryLayer fwd+bwd (dim 512), copying write"),
        ("layer_logged", "MemoryLayer fwd+bwd (dim 512), logged write"),
    ]:
        pts = [(r["m"], r[key]) for r in results["capacity"] if key in r]
        if pts:
            ax1.loglog(*zip(*[(m, t * 1e3) for m, t in pts]), marker="o", label=label)
    ax1.set(xlabel="capacity m (slots per row and head)", ylabel="ms (median)", title=f"B=1, H={H}, n={N}, d={D}")
    ax1.set_xticks(caps, [f"{m // 1024}k" if m < 1 << 20 else f"{m >> 20}M" for m in caps])
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    batches = [r["B"] for r in results["batch"]]
    for key, label in [
        ("read", "full read"),
        ("top_k", "top-k read"),
        ("write", "write, out of place"),
        ("write_in_place", "write, in place"),
    ]:
        ax2.loglog(batches, [r[key] * 1e3 / r["B"] for r in results["batch"]], marker="o", label=label)
    ax2.set(xlabel="batch B", ylabel="ms per row (median)", title=f"m={results['batch'][0]['m']:,}")
    ax2.set_xticks(batches, [str(b) for b in batches])
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plot", action="store_true", help="write docs/results/scaling.png")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    gen = torch.Generator().manual_seed(0)
    check_correct(gen, device)
    print(machine_line())
    if args.quick:
        capacities, batches, run_time, layer_max = [256, 1024], [1, 2], 0.05, 1024
    else:
        capacities = [1 << p for p in range(10, 21, 2)]  # 1k, 4k, 16k, 64k, 256k, 1M
        batches, run_time, layer_max = [1, 2, 4, 8, 16], 0.5, 1 << 16
    results: dict = {"capacity": [], "batch": []}
    print(f"vs capacity (B=1, H={H}, n={N}, d={D}, fp32, {device}), ms:")
    print(
        f"{'m':>9} | {'read':>9} {'top-k':>9} {'write':>9} {'in place':>9} {'layer f+b':>9} {'logged':>9} "
        "| bytes/slot (min)"
    )
    for m in capacities:
        torch.manual_seed(0)
        layer = MemoryLayer(512, heads=H, key_dim=D, value_dim=D, capacity=m).to(device) if m <= layer_max else None
        t = time_ops(1, m, gen, run_time if m < 1 << 18 else 0.0, layer, device)
        actual, minimum = bytes_per_slot(full_state(1, H, 4, D, gen))
        results["capacity"].append({"m": m, **t})
        lay = (
            f"{t['layer_fwd_bwd'] * 1e3:>9.2f} {t['layer_logged'] * 1e3:>9.2f}"
            if "layer_fwd_bwd" in t
            else f"{'-':>9} {'-':>9}"
        )
        print(
            f"{m:>9,} | {t['read'] * 1e3:>9.2f} {t['top_k'] * 1e3:>9.2f} {t['write'] * 1e3:>9.2f} "
            f"{t['write_in_place'] * 1e3:>9.3f} {lay} | {actual:.1f} ({minimum:.0f}, +{100 * (actual / minimum - 1):.1f}%)",
            flush=True,
        )
    first, last = results["capacity"][0], results["capacity"][-1]
    span = last["m"] / first["m"]
    print(
        f"growth over {span:.0f}x capacity: read {last['read'] / first['read']:.0f}x, top-k "
        f"{last['top_k'] / first['top_k']:.0f}x, write out of place {last['write'] / first['write']:.0f}x, "
        f"in place {last['write_in_place'] / first['write_in_place']:.2f}x"
    )
    m_batch = 256 if args.quick else 4096
    print(f"vs batch (m={m_batch:,}), ms per row:")
    print(f"{'B':>4} | {'read':>9} {'top-k':>9} {'write':>9} {'in place':>9}")
    for B in batches:
        t = time_ops(B, m_batch, gen, run_time, None, device)
        results["batch"].append({"B": B, "m": m_batch, **t})
        print(
            f"{B:>4} | {t['read'] * 1e3 / B:>9.2f} {t['top_k'] * 1e3 / B:>9.2f} {t['write'] * 1e3 / B:>9.2f} "
            f"{t['write_in_place'] * 1e3 / B:>9.3f}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, Path(__file__).resolve().parent.parent / "docs" / "results" / "scaling.png")


if __name__ == "__main__":
    main()
