"""Memory ops against the machine's own limit: full read, top-k read and write, vs plain bmm/copy.

Shapes follow the performance issue: B=8 rows, H=8 heads, n=256 queries/tokens, d=64, fp32,
capacity m in {1k, 4k, 16k, 64k}. Reported, all as same-run ratios:

- full read:  GFLOP/s (4·B·H·n·m·d FLOPs) and its ratio to the bmm roofline (two plain bmm at
  the read's shapes into preallocated outputs), plus the naive read (matmul, mask, softmax,
  matmul) for scale;
- top-k read (k = 32): its time over the full read's;
- write of n tokens, out of place and in place (inference, ``write(..., inplace=True)``): its
  time over a contiguous copy of the written bytes, and the time at m over the time at the
  smallest m (capacity independence);
- the full read under autograd (training), forward + backward: the library's (slot bias folded
  into the keys, so that SDPA's fused flash kernel runs both ways) against SDPA with the bias
  as a float mask that needs a gradient (its unfused math path, what the read used before;
  m <= 16k, as it materialises the n x m weights several times);
- the write under autograd (training), forward and backward with store-sized gradients as the
  reads after it would leave them: out of place (copies the store) and logged in place
  (``memgpt.memory.reversible``: forward, and forward + backward);
- ``--huge``: the top-k read at m = 1,048,576 slots (B=1, H=8, n=256, d=64) in a fresh
  subprocess, its time and its peak extra resident memory above the store itself.

    python benchmarks/bench_ops.py            # the full table (minutes)
    python benchmarks/bench_ops.py --quick    # m = 1k only, short timings (CI: never asserts speed)
    python benchmarks/bench_ops.py --huge     # also the 1M-slot top-k peak-memory check (~1 min)
    python benchmarks/bench_ops.py --device cuda --huge   # the same on a GPU
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch
import torch.nn.functional as F
from _report import resolve_device
from harness import machine_line, measure

from memgpt.memory import MemoryState, read, reference, start_log, write


def full_state(B: int, H: int, m: int, d: int, gen: torch.Generator, device="cpu") -> MemoryState:
    """A full store of random contents (made on the CPU from ``gen``, then moved to ``device``)."""
    state = MemoryState.empty(B, H, m, d, d)
    return state.replace(
        keys=torch.randn(B, H, m, d, generator=gen),
        values=torch.randn(B, H, m, d, generator=gen),
        valid=torch.ones(B, H, m, dtype=torch.bool),
        strength=torch.rand(B, H, m, generator=gen) * 0.9 + 0.1,
        step=torch.arange(m).expand(B, H, m).contiguous(),
        count=torch.full((B,), m, dtype=torch.long),
    ).to(device)


def check_correct(gen: torch.Generator, device: torch.device) -> None:
    """Fast == reference on a small case before anything is timed."""
    state = full_state(2, 2, 300, 16, gen, device)
    q = torch.randn(2, 2, 7, 16, generator=gen).to(device)
    torch.testing.assert_close(read(q, state), reference.read(q, state), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(read(q, state, top_k=8), reference.read(q, state, top_k=8), rtol=1e-4, atol=1e-5)
    k, v = torch.randn(2, 2, 5, 16, generator=gen).to(device), torch.randn(2, 2, 5, 16, generator=gen).to(device)
    g = torch.rand(2, 2, 5, generator=gen).to(device)
    small = full_state(2, 2, 9, 16, gen, device)
    fast, slow = write(small, k, v, g), reference.write(small, k, v, g)
    torch.testing.assert_close(fast.keys, slow.keys)
    torch.testing.assert_close(fast.values, slow.values)
    with torch.no_grad():
        in_place = write(small.clone(), k, v, g, inplace=True)
    torch.testing.assert_close(in_place.keys, slow.keys, rtol=0, atol=0)
    # The training read (folded bias, flash kernel) has the reference's gradients.
    grads = []
    for fn in (read, reference.read):
        leaves = [q.clone().requires_grad_()] + [
            getattr(state, f).clone().requires_grad_() for f in ("keys", "values", "strength")
        ]
        out = fn(leaves[0], state.replace(keys=leaves[1], values=leaves[2], strength=leaves[3]))
        grads.append(torch.autograd.grad(out.square().sum(), leaves))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # A logged in-place write under autograd gives the out-of-place write's gradients.
    inputs = [t.clone().requires_grad_() for t in (q, k, v, g)]
    grads = []
    for inplace in (False, True):
        state = start_log(small.clone()) if inplace else small
        state = write(state, *inputs[1:], inplace=inplace)
        grads.append(torch.autograd.grad(read(inputs[0], state).square().sum(), inputs))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def in_place_writer(state: MemoryState, keys, values, g):
    """A callable that writes in place again and again (each call donates the previous state)."""
    holder = [state.clone()]

    def step():
        with torch.no_grad():
            holder[0] = write(holder[0], keys, values, g, inplace=True)

    return step


def math_path_read(q, state, scale):
    """The read as it was computed under autograd before the folded bias: a float mask needing a
    gradient, which sends SDPA to its math path."""
    bias = torch.log(state.strength)[:, :, None, :].expand(-1, -1, q.shape[2], -1)
    return F.scaled_dot_product_attention(q, state.keys, state.values, attn_mask=bias, scale=scale)


def training_read(fn, q, state):
    """Forward + backward of ``fn(q, state)`` w.r.t. q, keys, values and strength."""
    leaves = [q.clone().requires_grad_()] + [
        getattr(state, f).clone().requires_grad_() for f in ("keys", "values", "strength")
    ]
    leaf_state = state.replace(keys=leaves[1], values=leaves[2], strength=leaves[3])
    grad_out = torch.randn(q.shape[:3] + (state.value_dim,), device=q.device)

    def step():
        torch.autograd.grad(fn(leaves[0], leaf_state), leaves, grad_out)

    return step


def autograd_writer(state: MemoryState, keys, values, g, grads):
    """Out-of-place write under autograd, then its backward from store-sized gradients."""
    leaf = state.replace(keys=state.keys.clone().requires_grad_(), values=state.values.clone().requires_grad_())
    inputs = [t.clone().requires_grad_() for t in (keys, values, g)]

    def step():
        new = write(leaf, *inputs)
        torch.autograd.backward([new.keys, new.values, new.strength], list(grads))

    return step


def logged_writer(state: MemoryState, keys, values, g, grads, *, backward: bool):
    """Logged in-place write under autograd (each call continues from the last state), and its
    backward with the log's gradient accumulator holding store-sized gradients."""
    holder = [state.clone()]
    inputs = [t.clone().requires_grad_() for t in (keys, values, g)]
    flat = [grads[0].view(-1, grads[0].shape[-1]), grads[1].view(-1, grads[1].shape[-1]), grads[2].view(-1)]

    def step():
        logged = start_log(holder[0].detach())  # a new graph on the same tensors: no copy
        logged._log.grads = flat  # as the reads after this write would leave it
        new = write(logged, *inputs, inplace=True)
        if backward:
            new._log.token.backward()
        holder[0] = new

    return step


def _rss_field(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])  # KiB
    raise RuntimeError(f"{name} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux clear_refs "5") and return the current RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_field("VmRSS")


def _peak_rss() -> int:
    return _rss_field("VmHWM")


def huge_top_k(device: torch.device, m: int = 1 << 20) -> None:
    """Top-k read at a million slots: time and peak extra memory (run in a fresh process): resident
    memory on the CPU, allocated memory on CUDA."""
    B, H, n, d, k = 1, 8, 256, 64, 32
    gen = torch.Generator().manual_seed(0)
    state = full_state(B, H, m, d, gen, device)
    q = torch.randn(B, H, n, d, generator=gen).to(device)
    read(q[:, :, :1], state, top_k=k)  # warm up the allocator on small shapes
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() // 1024
    else:
        base = _reset_peak_rss()
    timing = measure(lambda: read(q, state, top_k=k), "top-k @1M", min_run_time=2.0)
    peak = (torch.cuda.max_memory_allocated() // 1024 if device.type == "cuda" else _peak_rss()) - base
    store_mib = (state.keys.numel() + state.values.numel()) * 4 / 2**20
    scores_mib = B * H * n * m * 4 / 2**20
    print(
        f"top-k read at m={m:,} (B={B} H={H} n={n} d={d} k={k}): {timing.median * 1e3:.0f} ms; "
        f"peak extra resident memory {peak / 1024:.0f} MiB (store {store_mib:.0f} MiB; a materialised "
        f"score matrix would be {scores_mib:.0f} MiB; goal < 256 MiB)",
        flush=True,
    )


def naive_read(q, state, scale):
    scores = torch.matmul(q, state.keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~state.valid[:, :, None, :], float("-inf"))
    return torch.matmul(scores.softmax(-1), state.values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--huge", action="store_true", help="also the top-k read at m = 1M (fresh process)")
    parser.add_argument("--huge-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.huge_only:
        huge_top_k(device)
        return
    B, H, n, d, k = 8, 8, 256, 64, 32
    capacities = [1024] if args.quick else [1024, 4096, 16384, 65536]
    run_time = 0.2 if args.quick else 1.0
    gen = torch.Generator().manual_seed(0)
    check_correct(gen, device)
    print(machine_line())
    print(f"B={B} H={H} n={n} d={d} fp32 on {device}; top-k k={k}; ratios are same-run")
    header = (
        f"{'m':>6} | {'roofline GF/s':>13} | {'read GF/s':>9} {'÷roof':>6} | {'naive ÷roof':>11} | "
        f"{'top-k ÷ full':>12} | {'write ms':>8} {'÷copy':>7} {'÷@1k':>6} | {'in-place ms':>11} {'÷copy':>6} {'÷@1k':>6}"
    )
    print(header)
    print("-" * len(header))
    write_base = inplace_base = None
    training, training_reads = [], []
    for m in capacities:
        state = full_state(B, H, m, d, gen, device)
        q = torch.randn(B, H, n, d, generator=gen).to(device)
        flops = 4 * B * H * n * m * d
        kt = state.keys.transpose(-1, -2).reshape(B * H, d, m).contiguous()
        qf, vf = q.reshape(B * H, n, d), state.values.reshape(B * H, m, d)
        s_out, o_out = torch.empty(B * H, n, m, device=device), torch.empty(B * H, n, d, device=device)

        def roofline():
            torch.bmm(qf, kt, out=s_out)
            torch.bmm(s_out, vf, out=o_out)

        t_roof = measure(roofline, "roofline", min_run_time=run_time).median
        t_read = measure(lambda: read(q, state), "read", min_run_time=run_time).median
        t_naive = measure(lambda: naive_read(q, state, d**-0.5), "naive", min_run_time=run_time).median
        t_topk = measure(lambda: read(q, state, top_k=k), "top-k", min_run_time=run_time).median
        keys = torch.randn(B, H, n, d, generator=gen).to(device)
        values = torch.randn(B, H, n, d, generator=gen).to(device)
        g = torch.rand(B, H, n, generator=gen).to(device)
        t_write = measure(lambda: write(state, keys, values, g), "write", min_run_time=run_time).median
        t_inplace = measure(in_place_writer(state, keys, values, g), "write in place", min_run_time=run_time).median
        src = torch.randn(2 * B * H * n * d, device=device)
        dst = torch.empty_like(src)
        t_copy = measure(lambda: dst.copy_(src), "copy", min_run_time=run_time).median
        t_train_read = measure(
            training_read(lambda q_, s_: read(q_, s_), q, state), "read fwd+bwd", min_run_time=run_time
        ).median
        t_math = None
        if m <= 16384:
            t_math = measure(
                training_read(lambda q_, s_: math_path_read(q_, s_, d**-0.5), q, state),
                "math-path read fwd+bwd",
                min_run_time=run_time,
            ).median
        training_reads.append((m, t_train_read, t_math))
        grads = tuple(
            t.to(device)
            for t in (
                torch.randn(B, H, m, d, generator=gen),
                torch.randn(B, H, m, d, generator=gen),
                torch.randn(B, H, m, generator=gen),
            )
        )
        training.append(
            (
                m,
                t_copy,
                measure(autograd_writer(state, keys, values, g, grads), "autograd write", min_run_time=run_time).median,
                measure(
                    logged_writer(state, keys, values, g, grads, backward=False), "logged", min_run_time=run_time
                ).median,
                measure(
                    logged_writer(state, keys, values, g, grads, backward=True), "logged+bwd", min_run_time=run_time
                ).median,
            )
        )
        del grads
        write_base = write_base or t_write
        inplace_base = inplace_base or t_inplace
        roof = flops / t_roof / 1e9
        print(
            f"{m:>6} | {roof:>13.1f} | {flops / t_read / 1e9:>9.1f} {t_roof / t_read:>6.2f} | "
            f"{t_roof / t_naive:>11.2f} | {t_topk / t_read:>12.2f} | {t_write * 1e3:>8.2f} "
            f"{t_write / t_copy:>7.0f} {t_write / write_base:>6.1f} | {t_inplace * 1e3:>11.3f} "
            f"{t_inplace / t_copy:>6.2f} {t_inplace / inplace_base:>6.2f}",
            flush=True,
        )
        state = kt = s_out = None  # free this capacity's store before the next one allocates
    print("\nthe full read under autograd (training), forward + backward")
    header = f"{'m':>6} | {'read ms':>9} | {'math-path ms':>12} | {'math ÷ read':>11}"
    print(header)
    print("-" * len(header))
    for m, t_read, t_math in training_reads:
        math = f"{t_math * 1e3:>12.1f} | {t_math / t_read:>11.2f}" if t_math else f"{'(skipped)':>12} | {'':>11}"
        print(f"{m:>6} | {t_read * 1e3:>9.1f} | {math}", flush=True)
    print("\nthe write under autograd (training), forward + backward unless said; ÷copy: over the copy above")
    header = (
        f"{'m':>6} | {'out-of-place ms':>15} {'÷@1k':>6} | {'logged fwd ms':>13} {'÷copy':>6} {'÷@1k':>6} | "
        f"{'logged ms':>9} {'÷copy':>6} {'÷@1k':>6}"
    )
    print(header)
    print("-" * len(header))
    m0, _, a0, f0, b0 = training[0]
    for m, t_copy, t_auto, t_fwd, t_both in training:
        print(
            f"{m:>6} | {t_auto * 1e3:>15.2f} {t_auto / a0:>6.1f} | {t_fwd * 1e3:>13.3f} {t_fwd / t_copy:>6.2f} "
            f"{t_fwd / f0:>6.2f} | {t_both * 1e3:>9.3f} {t_both / t_copy:>6.2f} {t_both / b0:>6.2f}",
            flush=True,
        )
    if args.huge:  # a fresh process, so that its peak resident memory is this read's alone
        subprocess.run([sys.executable, __file__, "--huge-only", "--device", str(device)], check=True)


if __name__ == "__main__":
    main()
