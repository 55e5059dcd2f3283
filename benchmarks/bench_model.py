"""Whole models: training tokens/s, decoding tokens/s with and without memory, torch.compile speed-ups.

1. Training (forward, cross-entropy, backward, AdamW step; random tokens, fp32): ``MemGPTModel``
   streaming through its input with the detached state carried from step to step (truncated
   BPTT, the memory full after the first step) against a same-size plain transformer (memgpt's
   own attention/FFN blocks, causal attention over the whole sequence, ``_models.PlainLM``) and an
   x-transformers ``TransformerWrapper`` (flash attention), all with the same width, depth,
   heads, FFN, vocabulary and tied embeddings; then MemGPT with its writes logged in place
   (``donate_state=True`` under autograd: no copy of the store per write, each read recomputed
   in backward), and both kinds of MemGPT again with 8x the memory.
2. Decoding (greedy ``generate``, one token per call, after an untimed prompt): ``MemGPTModel``
   against (a) the plain KV-cache decoder of the same size, attending over the whole context:
   what you would run without memory; and (b) the same weights with ``memory_capacity=1``:
   the same code path, with the memory's read and write over m slots reduced to one slot, which
   isolates what the memory store costs. (A model whose memory is cleared every step is no
   baseline: its read still scores all m slots of the empty store.)
3. torch.compile: the memory ops (``read`` full and top-k, ``write``) under
   ``fullgraph=True`` (falling back to graph breaks if that fails, and saying so) and one
   ``MemGPTBlock`` forward + backward; compiled ÷ eager time, compile time (the first call)
   reported apart (a cold compile: a fresh inductor cache for the run), compiled output checked
   against eager first.

    python benchmarks/bench_model.py                 # all three sections (many minutes on 2 cores)
    python benchmarks/bench_model.py --quick         # tiny models; compiles the read op only
    python benchmarks/bench_model.py --only decode --device cuda
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from _models import PlainLM
from _report import measure_steps, parser, print_table, setup_run, sync, write_json
from harness import machine_line

from memgpt import BlockState, MemGPTBlock, MemGPTConfig, MemGPTModel, MemoryLayer
from memgpt.memory import MemoryState, read, write


@dataclass(frozen=True)
class Sizes:
    vocab: int
    dim: int
    depth: int
    heads: int
    seq: int  # training sequence per call
    batch: int
    segment_len: int
    capacity: int
    prompt: int
    new_tokens: int
    decode_batches: tuple[int, ...]


FULL = Sizes(
    vocab=256,
    dim=256,
    depth=4,
    heads=4,
    seq=512,
    batch=8,
    segment_len=128,
    capacity=1024,
    prompt=512,
    new_tokens=64,
    decode_batches=(1, 8),
)
QUICK = Sizes(
    vocab=64,
    dim=64,
    depth=2,
    heads=2,
    seq=64,
    batch=2,
    segment_len=16,
    capacity=64,
    prompt=32,
    new_tokens=8,
    decode_batches=(1,),
)


def memgpt_config(s: Sizes, capacity: int | None = None) -> MemGPTConfig:
    return MemGPTConfig(
        vocab_size=s.vocab,
        dim=s.dim,
        depth=s.depth,
        heads=s.heads,
        segment_len=s.segment_len,
        memory_capacity=capacity or s.capacity,
        memory_heads=s.heads,
    )


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------------------------------- training
def check_models(s: Sizes, memgpt: MemGPTModel, plain: PlainLM, device, gen) -> None:
    """Streaming == one call for MemGPT (split off the segment grid); incremental == full for the plain LM.

    Checked on float64 copies: the semantics are exact (differences ~1e-12), while in float32 a
    random 4-layer model amplifies rounding at a few positions to ~3e-3 (1 thread) or ~3e-2
    (2 threads) of logits of size ~1.5, which says nothing about the code.
    """
    memgpt, plain = copy.deepcopy(memgpt).double(), copy.deepcopy(plain).double()
    ids = torch.randint(0, s.vocab, (2, 2 * s.segment_len + 3), generator=gen).to(device)
    cut = s.segment_len // 2 + 1
    with torch.no_grad():
        whole = memgpt(ids).logits
        first = memgpt(ids[:, :cut])
        second = memgpt(ids[:, cut:], first.state).logits
        torch.testing.assert_close(torch.cat([first.logits, second], dim=1), whole, rtol=1e-9, atol=1e-9)
        full, _ = plain(ids)
        head, caches = plain(ids[:, :cut])
        tail, _ = plain(ids[:, cut:], caches)
        torch.testing.assert_close(torch.cat([head, tail], dim=1), full, rtol=1e-9, atol=1e-9)


def train_step_fn(model, kind: str, ids, targets):
    """One optimiser step; MemGPT carries its detached state into the next call."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    carry = [None]

    def logits_of(ids):
        if kind in ("memgpt", "memgpt_logged"):
            # logged: the memory writes go in place, logged for backward (donate_state under autograd)
            out = model(ids, carry[0], donate_state=kind == "memgpt_logged")
            carry[0] = out.state.detach()
            return out.logits
        if kind == "plain":
            return model(ids)[0]
        return model(ids)

    def step():
        loss = F.cross_entropy(logits_of(ids).flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def xtransformers_lm(s: Sizes):
    try:
        from x_transformers import Decoder, TransformerWrapper
    except Exception as err:  # noqa: BLE001 - any import failure: skip the peer
        return f"x-transformers is not installed ({type(err).__name__}: {err}); pip install -e '.[bench]'"
    layers = Decoder(dim=s.dim, depth=s.depth, heads=s.heads, attn_dim_head=s.dim // s.heads, attn_flash=True)
    return TransformerWrapper(num_tokens=s.vocab, max_seq_len=s.seq, attn_layers=layers, tie_embedding=True)


def bench_training(s: Sizes, device, gen, run_time: float) -> list[dict]:
    memgpt = MemGPTModel(memgpt_config(s)).to(device)
    plain = PlainLM(s.vocab, s.dim, s.depth, s.heads, max_len=max(s.seq, 2 * s.segment_len + 3)).to(device)
    check_models(s, memgpt, plain, device, gen)
    models = [("MemGPTModel", "memgpt", memgpt), ("plain transformer (same size)", "plain", plain)]
    xt = xtransformers_lm(s)
    if isinstance(xt, str):
        print(f"skipped x-transformers: {xt}")
    else:
        models.append(("x-transformers TransformerWrapper", "xt", xt.to(device)))
    models.append(("MemGPTModel, logged in-place writes", "memgpt_logged", memgpt))
    big = MemGPTModel(memgpt_config(s, capacity=8 * s.capacity)).to(device)
    models.append((f"MemGPTModel, memory {8 * s.capacity} per row", "memgpt", big))
    models.append((f"MemGPTModel, memory {8 * s.capacity}, logged writes", "memgpt_logged", big))
    ids = torch.randint(0, s.vocab, (s.batch, s.seq), generator=gen).to(device)
    targets = torch.randint(0, s.vocab, (s.batch, s.seq), generator=gen).to(device)
    rows = []
    for name, kind, model in models:
        step = train_step_fn(model, kind, ids, targets)
        loss = step()  # warm-up; also fills MemGPT's memory
        if not torch.isfinite(loss):
            raise AssertionError(f"{name}: non-finite training loss {loss.item()}")
        t = measure_steps(step, name, min_run_time=run_time, min_runs=3, device=device)
        print(f"  {t}", flush=True)
        rows.append(
            dict(
                name=name,
                params=n_params(model),
                ms=t.median * 1e3,
                iqr_ms=t.iqr * 1e3,
                runs=t.runs,
                tokens_per_s=s.batch * s.seq / t.median,
            )
        )
    for r in rows:
        r["vs_plain"] = r["tokens_per_s"] / rows[1]["tokens_per_s"]
    return rows


# ---------------------------------------------------------------------------------------- decoding
def bench_decoding(s: Sizes, device, gen, run_time: float) -> list[dict]:
    memgpt = MemGPTModel(memgpt_config(s)).to(device).eval()
    tiny = MemGPTModel(memgpt_config(s, capacity=1)).to(device).eval()
    tiny.load_state_dict(memgpt.state_dict())  # capacity shapes no parameter: the same weights
    plain = PlainLM(s.vocab, s.dim, s.depth, s.heads, max_len=s.prompt + s.new_tokens + 1).to(device).eval()
    rows = []
    for b in s.decode_batches:
        prompt = torch.randint(0, s.vocab, (b, s.prompt), generator=gen).to(device)
        with torch.no_grad():
            states = {"m": memgpt(prompt[:, :-1]).state, "t": tiny(prompt[:, :-1]).state}
            _, caches = plain(prompt[:, :-1])
        last = prompt[:, -1:]
        # A prefilled state continues exactly like a generation from the whole prompt.
        resumed = memgpt.generate(last, s.new_tokens, states["m"]).sequences[:, 1:]
        torch.testing.assert_close(resumed, memgpt.generate(prompt, s.new_tokens).sequences[:, s.prompt :])
        resumed = plain.generate(last, s.new_tokens, caches)[0][:, 1:]
        torch.testing.assert_close(resumed, plain.generate(prompt, s.new_tokens)[0][:, s.prompt :])
        runs = [
            (f"MemGPTModel, m={s.capacity}", lambda: memgpt.generate(last, s.new_tokens, states["m"])),
            ("same weights, m=1", lambda: tiny.generate(last, s.new_tokens, states["t"])),
            ("plain KV-cache decoder", lambda: plain.generate(last, s.new_tokens, caches)),
        ]
        base = None
        for name, fn in runs:
            t = measure_steps(fn, name, min_run_time=run_time, min_runs=3, device=device)
            print(f"  batch {b}: {t}", flush=True)
            tps = b * s.new_tokens / t.median
            base = base or tps
            rows.append(
                dict(
                    name=name,
                    batch=b,
                    ms_per_token=t.median * 1e3 / s.new_tokens,
                    tokens_per_s=tps,
                    memgpt_vs_this=base / tps,
                    runs=t.runs,
                )
            )
    return rows


# ---------------------------------------------------------------------------------------- compile
def _full_state(b, h, m, d, device, gen) -> MemoryState:
    s = MemoryState.empty(b, h, m, d, d, device=device)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    return s.replace(
        keys=rand(b, h, m, d),
        values=rand(b, h, m, d),
        valid=torch.ones_like(s.valid),
        strength=(torch.rand(b, h, m, generator=gen) * 0.9 + 0.1).to(device, s.strength.dtype),
        step=torch.arange(m, device=device).expand(b, h, m).contiguous(),
        count=torch.full((b,), m, device=device),
    )


def _compiled(make, args, device):
    """(compiled fn, compile seconds, mode): fullgraph=True, else graph breaks with the reason."""
    reason = ""
    for fullgraph in (True, False):
        torch._dynamo.reset()
        fn = make(lambda f: torch.compile(f, fullgraph=fullgraph))
        start = time.perf_counter()
        try:
            fn(*args)
            sync(device)
        except Exception as err:  # noqa: BLE001 - report why, then try without fullgraph
            why = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
            if not fullgraph:
                return None, None, f"compile failed ({why}); fullgraph: {reason}"
            reason = why
            continue
        return fn, time.perf_counter() - start, "fullgraph" if fullgraph else f"graph breaks (fullgraph: {reason})"


def bench_compile(quick: bool, device, gen, run_time: float) -> list[dict]:
    """Each case is (name, make, args): make(transform) builds the callable with transform applied to
    the compiled part (the op itself, or the block module inside an eager forward + backward)."""
    b, h, n, d, m = (2, 2, 32, 16, 256) if quick else (8, 8, 256, 64, 4096)
    state = _full_state(b, h, m, d, device, gen)
    q = torch.randn(b, h, n, d, generator=gen).to(device)
    k, v = (torch.randn(b, h, n, d, generator=gen).to(device) for _ in range(2))
    g = torch.rand(b, h, n, generator=gen).to(device)
    cases = [(f"read, full (m={m})", lambda t: t(lambda q, s: read(q, s)), (q, state))]
    if not quick:
        cases += [
            (f"read, top-32 (m={m})", lambda t: t(lambda q, s: read(q, s, top_k=32)), (q, state)),
            (f"write {n} tokens (m={m})", lambda t: t(lambda s, k, v, g: write(s, k, v, g).keys), (state, k, v, g)),
            ("MemGPTBlock fwd+bwd (d=256, m=1024)", *block_case(device, gen)),
        ]
    else:
        print("--quick: compiling the full read only (a block compiles for minutes on 2 cores)")
    rows = []
    for name, make, args in cases:
        eager = make(lambda f: f)
        eager_out = eager(*args)
        compiled, compile_s, mode = _compiled(make, args, device)
        t_eager = measure_steps(lambda: eager(*args), "eager", min_run_time=run_time, min_runs=3, device=device).median
        row = dict(name=name, eager_ms=t_eager * 1e3, compiled_ms=None, speedup=None, compile_s=compile_s, mode=mode)
        if compiled is not None:
            torch.testing.assert_close(compiled(*args), eager_out, rtol=1e-4, atol=1e-4)
            t_comp = measure_steps(
                lambda: compiled(*args), "compiled", min_run_time=run_time, min_runs=3, device=device
            ).median
            row.update(compiled_ms=t_comp * 1e3, speedup=t_eager / t_comp)
        print(f"  {name}: {row}", flush=True)
        rows.append(row)
    torch._dynamo.reset()
    return rows


def block_case(device, gen):
    """MemGPTBlock forward + backward (d=256, 4 heads, segment 256, batch 4, m=1024): (make, args)."""
    dim, heads, n, b, m = 256, 4, 256, 4, 1024
    layer = MemoryLayer(dim, heads=heads, capacity=m)
    block = MemGPTBlock(dim, heads, layer).to(device)
    state = BlockState(_full_state(b, heads, m, layer.reader.key_dim, device, gen))
    x = torch.randn(b, n, dim, generator=gen).to(device).requires_grad_()
    params = list(block.parameters())

    def make(transform):
        module = transform(block)

        def fwd_bwd(x, state):
            y, _ = module(x, state)
            grads = torch.autograd.grad(y.square().mean(), [x, *params], allow_unused=True)
            return y.detach(), grads[0]

        return fwd_bwd

    return make, (x, state)


TRAIN_COLUMNS = [
    ("name", "model", "s"),
    ("params", "params", ",d"),
    ("ms", "ms/step", ".1f"),
    ("iqr_ms", "IQR", ".1f"),
    ("runs", "runs", "d"),
    ("tokens_per_s", "tokens/s", ",.0f"),
    ("vs_plain", "÷ plain", ".2f"),
]
DECODE_COLUMNS = [
    ("name", "decoder", "s"),
    ("batch", "batch", "d"),
    ("ms_per_token", "ms/token", ".2f"),
    ("tokens_per_s", "tokens/s", ",.0f"),
    ("memgpt_vs_this", "MemGPT tok/s ÷ this", ".2f"),
    ("runs", "runs", "d"),
]
COMPILE_COLUMNS = [
    ("name", "what", "s"),
    ("eager_ms", "eager ms", ".2f"),
    ("compiled_ms", "compiled ms", ".2f"),
    ("speedup", "speed-up", ".2f"),
    ("compile_s", "compile s", ".1f"),
    ("mode", "mode", "s"),
]


def main() -> None:
    p = parser(__doc__)
    p.add_argument(
        "--only",
        choices=["train", "decode", "compile"],
        action="append",
        help="run only these sections (repeatable; default all)",
    )
    args = p.parse_args()
    device = setup_run(args)
    sections = args.only or ["train", "decode", "compile"]
    s = QUICK if args.quick else FULL
    run_time = 0.2 if args.quick else 4.0
    gen = torch.Generator().manual_seed(0)
    print(machine_line())
    print(f"{s}; fp32")
    out = {"sizes": asdict(s)}
    if "train" in sections:
        out["training"] = rows = bench_training(s, device, gen, run_time)
        print(
            f"\nTraining, {s.batch} x {s.seq} tokens per step "
            f"(MemGPT: segments of {s.segment_len}, memory {s.capacity}/row)"
        )
        print_table(rows, TRAIN_COLUMNS)
    if "decode" in sections:
        out["decoding"] = rows = bench_decoding(s, device, gen, run_time)
        print(f"\nDecoding {s.new_tokens} tokens after a {s.prompt}-token prompt (greedy, one token per call)")
        print_table(rows, DECODE_COLUMNS)
    if "compile" in sections:
        # Cold compiles: a fresh inductor cache for this run. A warm cache would report a fraction
        # of the compile time, and on torch 2.13 a warm AOTAutograd cache hit breaks the compiled
        # block when a state is passed in (garbage view sizes; docs/results/benchmarks.md).
        with tempfile.TemporaryDirectory() as cache:
            saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            try:
                out["compile"] = rows = bench_compile(args.quick, device, gen, run_time)
            finally:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
                if saved is not None:
                    os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved
        print("\ntorch.compile (inductor): eager ÷ compiled time; compile time is the first call, cold cache")
        print_table(rows, COMPILE_COLUMNS)
    print(machine_line())
    write_json(args.json, "bench_model", args, out)


if __name__ == "__main__":
    main()
