"""One block, forward + backward: MemGPTBlock against a plain block and the peer libraries' blocks.

Shape (issue #4): width 512, 8 heads (64 wide), segment 512, batch 8, fp32; MemGPT's memory
has 8 heads and 4,096 slots per row, pre-filled to capacity (every call reads a full store and
writes its 512 tokens, evicting the oldest); the top-k variant reads k = 32 slots. Measured
side by side in one run:

- plain: a pre-norm block of memgpt's own parts (``MemGPTBlock`` minus its memory layer);
- MemGPT, full read and top-k read;
- x-transformers ``Decoder(depth=1)`` (flash attention);
- memorizing-transformers-pytorch KNN block (memory 4,096 per row, search + add); each timed step
  starts from a freshly refilled index (untimed), because its add resets the index at capacity:
  the timed add inserts into an empty index, which favours the peer;
- infini-transformer-pytorch block, one segment with a pre-filled compressive memory.

Reported: ms per step (median, IQR), tokens/s, GFLOP/s from the formulas in ``_flops.py``
(projections, attention, read over m slots, FFN; x3 for fwd+bwd except where no backward runs),
and the same-run ratios of the issue's goals. Before timing: fast read == reference read, the plain
block == MemGPTBlock with its memory gated off, the dense FLOP formula == FlopCounterMode, and
each peer's state is what we claim (a full KNN index that finds stored keys, a memory that
changes the infini output).

    python benchmarks/bench_block.py                  # the issue's shape (a few minutes on 2 cores)
    python benchmarks/bench_block.py --quick          # tiny shapes (seconds; CI never asserts speed)
    python benchmarks/bench_block.py --device cuda --json out/block.json
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import _flops
import _peers
import torch
from _models import PlainBlock
from _report import measure_steps, measure_with_setup, parser, print_table, setup_run, write_json
from harness import machine_line
from torch.utils.flop_counter import FlopCounterMode

from memgpt import BlockState, MemGPTBlock, MemoryLayer
from memgpt.memory import MemoryState, read, reference


@dataclass
class Shape:
    batch: int
    seq: int
    dim: int
    heads: int
    capacity: int
    top_k: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


FULL = Shape(batch=8, seq=512, dim=512, heads=8, capacity=4096, top_k=32)
QUICK = Shape(batch=2, seq=64, dim=128, heads=4, capacity=256, top_k=32)


@dataclass
class Variant:
    name: str
    step: Callable[[], object]  # one forward + backward
    parts: list | None = None  # FLOP formula, if defined
    setup: Callable[[], None] | None = None  # untimed, before every timed step
    note: str = ""


def full_memory(layer: MemoryLayer, batch: int, device, gen: torch.Generator) -> MemoryState:
    """A store filled to capacity: random keys/values, every slot valid, write gates in [0.1, 1]."""
    s = layer.empty_state(batch, device=device)
    b, h, m, dk = s.keys.shape
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    return s.replace(
        keys=rand(b, h, m, dk),
        values=rand(b, h, m, s.values.shape[-1]),
        valid=torch.ones_like(s.valid),
        strength=(torch.rand(b, h, m, generator=gen) * 0.9 + 0.1).to(device, s.strength.dtype),
        step=torch.arange(m, device=device).expand(b, h, m).contiguous(),
        count=torch.full((b,), m, device=device),
    )


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor, call) -> Callable[..., object]:
    """A step: y = call(x), then gradients of <y, grad_out> for x and every parameter (no accumulation).

    ``step(counting=True)`` uses ``backward()`` instead, which FlopCounterMode can follow.
    """
    inputs = [x] + [p for p in module.parameters() if p.requires_grad]

    def step(counting: bool = False):
        y = call(x)
        if not counting:
            return torch.autograd.grad(y, inputs, grad_out, allow_unused=True)
        y.backward(grad_out)
        for t in inputs:
            t.grad = None

    return step


def check_memgpt(shape: Shape, device, gen: torch.Generator) -> None:
    """Fast reads == reference reads, and MemGPTBlock with its memory gated off == the plain block."""
    layer = MemoryLayer(shape.dim, heads=shape.heads, capacity=min(shape.capacity, 300))
    state = full_memory(layer, 2, device, gen)
    q = torch.randn(2, shape.heads, 7, layer.reader.key_dim, generator=gen).to(device)
    for k in (None, shape.top_k):
        torch.testing.assert_close(read(q, state, top_k=k), reference.read(q, state, top_k=k), rtol=1e-4, atol=1e-5)
    plain = PlainBlock(shape.dim, shape.heads).to(device)
    gated_off = MemoryLayer(shape.dim, heads=shape.heads, capacity=layer.capacity, fusion_bias_init=30.0)
    block = MemGPTBlock(shape.dim, shape.heads, gated_off).to(device)  # lambda = sigmoid(30) = 1.0 in fp32
    missing, _ = block.load_state_dict(plain.state_dict(), strict=False)
    assert all(name.startswith(("memory.", "memory_norm.")) for name in missing), missing
    x = torch.randn(2, 16, shape.dim, generator=gen).to(device)
    torch.testing.assert_close(block(x, BlockState(state))[0], plain(x)[0], rtol=0, atol=0)


def check_flops(name: str, step, parts: list, tokens: int) -> None:
    """The formula's Linear-layer FLOPs == what FlopCounterMode counts for one fwd+bwd (also a warm-up)."""
    with FlopCounterMode(display=False) as counter:
        step(counting=True)
    counts = counter.get_flop_counts()["Global"]
    dense = sum(v for op, v in counts.items() if str(op).split(".")[-1] in ("mm", "addmm"))
    expected = _flops.dense_per_token(parts) * tokens
    if abs(dense - expected) > 1e-6 * expected:
        raise AssertionError(f"{name}: FlopCounterMode counts {dense:.4g} Linear FLOPs, the formula {expected:.4g}")


def memgpt_variants(shape: Shape, device, gen, x, grad_out) -> list[Variant]:
    out = []
    f = 4 * shape.dim
    plain = PlainBlock(shape.dim, shape.heads).to(device)
    plain_parts = _flops.plain_block(shape.dim, shape.seq, f)
    out.append(Variant("plain block", fwd_bwd(plain, x, grad_out, lambda x: plain(x)[0]), plain_parts))
    for top_k in (None, shape.top_k):
        layer = MemoryLayer(shape.dim, heads=shape.heads, capacity=shape.capacity, top_k=top_k)
        block = MemGPTBlock(shape.dim, shape.heads, layer).to(device)
        state = BlockState(full_memory(layer, shape.batch, device, gen))
        r = layer.reader
        parts = plain_parts + _flops.memory_parts(shape.dim, r.heads, r.key_dim, r.value_dim, shape.capacity, top_k)
        name = "MemGPT, full read" if top_k is None else f"MemGPT, top-{top_k} read"
        step = fwd_bwd(block, x, grad_out, lambda x, block=block, state=state: block(x, state)[0])
        out.append(Variant(name, step, parts, note=f"m={shape.capacity}/row, full store"))
    return out


def peer_variants(shape: Shape, device, gen, x, grad_out, tmpdir: str) -> list[Variant]:
    out = []
    xt = _peers.xtransformers_block(shape.dim, shape.heads)
    if isinstance(xt, str):
        print(f"skipped x-transformers: {xt}")
    else:
        xt = xt.to(device)
        xb = x.detach()[:1].clone()
        y0 = xt(xb)
        xb[:, -1] += 1.0
        torch.testing.assert_close(xt(xb)[:, :-1], y0[:, :-1])  # causal: the last token changes nothing before it
        parts = _flops.plain_block(shape.dim, shape.seq, 4 * shape.dim)
        out.append(Variant("x-transformers Decoder block", fwd_bwd(xt, x, grad_out, xt), parts, note="flash"))

    knn = _peers.knn_block(shape.dim, shape.heads, shape.top_k)
    if isinstance(knn, str):
        print(f"skipped memorizing-transformers KNN block: {knn}")
    else:
        knn = knn.to(device)
        dh = shape.dim // shape.heads
        memory = _peers.knn_memory(dh, shape.capacity, shape.batch, os.path.join(tmpdir, "knn.memmap"))
        keys = torch.randn(shape.batch, shape.capacity, dh, generator=gen)
        values = torch.randn(shape.batch, shape.capacity, dh, generator=gen)
        refill = lambda: _peers.fill_knn_memory(memory, keys, values)  # noqa: E731
        refill()
        sizes = [memory.knns[i].index.ntotal for i in range(shape.batch)]
        assert sizes == [shape.capacity] * shape.batch, f"KNN index sizes {sizes}, expected {shape.capacity} per row"
        probe = torch.nn.functional.normalize(keys[:, :32], dim=-1)
        found, mask = memory.search(probe, shape.top_k)
        hit = (found[:, :, 0, 0] - probe).abs().amax(-1).lt(1e-5).float().mean().item()
        assert mask.all() and hit >= 0.9, f"KNN search finds a stored key as its own top-1 in {hit:.0%} of probes"
        step = fwd_bwd(knn, x, grad_out, lambda x: knn(x, memory))
        note = f"faiss HNSW, m={shape.capacity}/row, search+add, top-1 self-hit {hit:.0%}"
        out.append(Variant("memorizing-transformers KNN block", step, setup=refill, note=note))

    inf = _peers.infini_block(shape.dim, shape.heads)
    if isinstance(inf, str):
        print(f"skipped infini-transformer block: {inf}")
    else:
        inf = inf.to(device)
        with torch.no_grad():
            _, memories = inf(torch.randn(shape.batch, shape.seq, shape.dim, generator=gen).to(device))
            y_mem, _ = inf(x.detach(), memories)
            y_none, _ = inf(x.detach())
        assert torch.isfinite(y_mem).all() and not torch.equal(y_mem, y_none), "infini: memory changes nothing"
        step = fwd_bwd(inf, x, grad_out, lambda x: inf(x, memories)[0])
        out.append(Variant("infini-transformer block", step, note="one segment, compressive memory"))
    return out


COLUMNS = [
    ("name", "block", "s"),
    ("ms", "ms/step", ".1f"),
    ("iqr_ms", "IQR", ".1f"),
    ("runs", "runs", "d"),
    ("tokens_per_s", "tokens/s", ",.0f"),
    ("gflop_per_step", "GFLOP/step", ".1f"),
    ("gflops", "GFLOP/s", ".1f"),
    ("vs_plain_tokens", "tok/s ÷ plain", ".2f"),
    ("note", "note", "s"),
]


def time_variant(v: Variant, shape: Shape, quick: bool, device) -> dict:
    """Check the FLOP formula (also a warm-up), time the step, derive tokens/s and GFLOP/s."""
    if v.parts is not None:
        check_flops(v.name, v.step, v.parts, shape.tokens)
    if v.setup is None:
        t = measure_steps(v.step, v.name, min_run_time=0.2 if quick else 5.0, min_runs=3, device=device)
    else:
        t = measure_with_setup(v.step, v.setup, v.name, runs=3 if quick else 5, device=device)
    print(f"  {t}", flush=True)
    flops = None if v.parts is None else _flops.fwd_bwd_per_token(v.parts) * shape.tokens
    return dict(
        name=v.name,
        ms=t.median * 1e3,
        iqr_ms=t.iqr * 1e3,
        runs=t.runs,
        tokens_per_s=shape.tokens / t.median,
        gflops=None if flops is None else flops / t.median / 1e9,
        gflop_per_step=None if flops is None else flops / 1e9,
        note=v.note,
    )


def goal_ratios(rows: list[dict]) -> list[dict]:
    """The issue's same-run goals, for whichever rows this run has."""
    by = {r["name"]: r for r in rows}
    full = by["MemGPT, full read"]
    topk = next(r for r in rows if r["name"].startswith("MemGPT, top-"))
    out = []
    knn = by.get("memorizing-transformers KNN block")
    if knn is not None:
        for r, goal in ((full, 1.5), (topk, 2.0)):
            out.append(
                dict(what=f"{r['name']} tokens/s ÷ KNN block", value=r["tokens_per_s"] / knn["tokens_per_s"], goal=goal)
            )
    for r in (full, topk):
        out.append(dict(what=f"{r['name']} GFLOP/s ÷ plain block", value=r["gflops"] / rows[0]["gflops"], goal=0.8))
    return out


def main() -> None:
    args = parser(__doc__).parse_args()
    device = setup_run(args)
    shape = QUICK if args.quick else FULL
    gen = torch.Generator().manual_seed(0)
    check_memgpt(shape, device, gen)
    x = torch.randn(shape.batch, shape.seq, shape.dim, generator=gen).to(device).requires_grad_()
    grad_out = torch.randn(shape.batch, shape.seq, shape.dim, generator=gen).to(device)
    print(machine_line())
    print(f"{shape}; fp32, forward + backward per step")
    with tempfile.TemporaryDirectory() as tmpdir:
        variants = memgpt_variants(shape, device, gen, x, grad_out)
        variants += peer_variants(shape, device, gen, x, grad_out, tmpdir)
        rows = [time_variant(v, shape, args.quick, device) for v in variants]
    for r in rows:
        r["vs_plain_tokens"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    print()
    print_table(rows, COLUMNS)
    ratios = goal_ratios(rows)
    print()
    for line in ratios:
        print(f"{line['what']}: {line['value']:.2f} (goal >= {line['goal']})")
    print(machine_line())
    write_json(args.json, "bench_block", args, {"shape": vars(shape), "rows": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
