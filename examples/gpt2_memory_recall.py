"""A small GPT-2 with memory inserted by ``memgpt.integrations.hf``, trained on segmented recall
against the same GPT-2 without memory.

    python examples/gpt2_memory_recall.py                 # the documented run (about 2 minutes)
    python examples/gpt2_memory_recall.py --pairs 4       # the harder variant (docs/how-to/hugging-face.md)
    python examples/gpt2_memory_recall.py --quick         # seconds: a pipeline check, not a result

Both models start from one randomly initialised GPT-2 (no pretrained weights ship offline) and
see the same batches. Each call of the model is one segment of 16 tokens; GPT-2's attention
spans that call only. The memory model passes ``memory_state`` from one segment to the next;
GPT-2 alone cannot carry anything across a segment boundary, so on the query segment of
``memgpt.tasks.RecallTask`` it can only guess (chance = 1/16).

Insertion. ``MemoryModel``'s default gate (fusion bias 6 + ln 2 here, two inserted layers)
starts the memory as nearly the identity, which is what a *pretrained* model needs; the script
prints that change. This GPT-2 is untrained, so there is nothing to preserve, and the memory it
trains starts with an open gate (``--fusion-bias 0``, an even mix): from a near-identity start an
untrained GPT-2 did not learn to use its memory within these 400 steps (``--fusion-bias 6``
reproduces that; docs/how-to/hugging-face.md).

Printed: the insertion change (relative norm of the logits, before training), then held-out
accuracy at the query positions for GPT-2 alone, GPT-2 with memory, and GPT-2 with memory
emptied just before the query segment (the ablation: the gain must flow through the memory).
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F

from memgpt.tasks import IGNORE_INDEX, RecallTask

try:
    import transformers

    from memgpt.integrations.hf import MemoryModel
except ImportError as e:  # the example needs the hf extra
    raise SystemExit(f"this example needs the Hugging Face extra: pip install 'memgpt-layers[hf]' ({e})") from e


def run(model, batch, *, memory: bool, clear_before_query: bool = False) -> torch.Tensor:
    """Feed a TaskBatch one segment per call; logits (b L V) for the whole sequence."""
    T, state, pieces = batch.segment_len, None, []
    for s in range(batch.input_ids.shape[1] // T):
        ids = batch.input_ids[:, s * T : (s + 1) * T]
        if not memory:
            pieces.append(model(ids, use_cache=False).logits)
            continue
        if clear_before_query and s == batch.query_segment:
            state = state.reset_rows(torch.ones(ids.shape[0], dtype=torch.bool))
        out = model(ids, memory_state=state, use_cache=False)
        pieces.append(out.logits)
        state = out.memory_state  # not detached: gradients flow across the segments of a sample
    return torch.cat(pieces, dim=1)


def train(model, task, args, *, memory: bool, label: str) -> float:
    """AdamW, linear warm-up then cosine decay, clipping at 1; returns the wall time in seconds."""
    gen = torch.Generator().manual_seed(args.seed)  # the same batches for every model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        warm = min(1.0, (step + 1) / args.warmup)
        for group in opt.param_groups:
            group["lr"] = args.lr * warm * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        batch = task.sample(args.batch_size, gen)
        logits = run(model, batch, memory=memory)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if not args.quiet and (step % max(1, args.steps // 8) == 0 or step == args.steps - 1):
            print(f"  [{label}] step {step:4d}  loss {loss.item():.3f}", flush=True)
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(model, task, args, *, memory: bool, clear_before_query: bool = False) -> float:
    """Accuracy at the answer positions over ``eval_batches`` held-out batches (another seed)."""
    model.eval()
    gen = torch.Generator().manual_seed(10_000 + args.seed)
    correct = total = 0
    for _ in range(args.eval_batches):
        batch = task.sample(args.batch_size, gen)
        logits = run(model, batch, memory=memory, clear_before_query=clear_before_query)
        mask = batch.targets != IGNORE_INDEX
        correct += int((logits.argmax(-1)[mask] == batch.targets[mask]).sum())
        total += int(mask.sum())
    return correct / total


@torch.no_grad()
def insertion_change(plain, with_memory, task, args) -> tuple[float, float]:
    """Relative norm of the logit change at insertion: first segment (empty memory), later ones."""
    plain.eval(), with_memory.eval()
    batch = task.sample(args.batch_size, torch.Generator().manual_seed(20_000 + args.seed))
    ref, ins = run(plain, batch, memory=False), run(with_memory, batch, memory=True)
    T = task.segment_len
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    return rel(ins[:, :T], ref[:, :T]), rel(ins[:, T:], ref[:, T:])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--pairs", type=int, default=1, help="key-value pairs to recall")
    p.add_argument("--distance", type=int, default=2, help="segments between the pairs and the queries")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--after", type=int, nargs="+", default=None, help="layers followed by memory (default: all)")
    p.add_argument("--capacity", type=int, default=64, help="memory slots per inserted layer")
    p.add_argument("--memory-heads", type=int, default=4)
    p.add_argument("--fusion-bias", type=float, default=0.0, help="fusion gate bias of the trained memory")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    # One thread: the model is tiny, and on a shared CPU spinning OpenMP threads cost more than they give.
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--quick", action="store_true", help="a few steps: checks the pipeline, the numbers mean nothing")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.eval_batches, args.warmup = 4, 4, 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    task = RecallTask(num_pairs=args.pairs, distance=args.distance)
    torch.manual_seed(args.seed)
    config = transformers.GPT2Config(
        vocab_size=task.vocab_size,
        n_positions=task.segment_len,
        n_embd=args.dim,
        n_layer=args.layers,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    plain = transformers.GPT2LMHeadModel(config)
    after = args.after or list(range(args.layers))
    memory = dict(after=after, capacity=args.capacity, heads=args.memory_heads)

    drop_in = MemoryModel(copy.deepcopy(plain), **memory)  # the default, near-identity gate
    first, later = insertion_change(plain, drop_in, task, args)
    print(
        f"insertion with the default gate (before training): logits change by {first:.2e} (first segment, "
        f"empty memory) and {later:.2e} (later segments, memory holding the earlier ones), relative norm"
    )

    with_memory = MemoryModel(copy.deepcopy(plain), fusion_bias_init=args.fusion_bias, **memory)
    t_plain = train(plain, task, args, memory=False, label="GPT-2")
    t_mem = train(with_memory, task, args, memory=True, label="GPT-2 + memory")
    acc_plain = evaluate(plain, task, args, memory=False)
    acc_mem = evaluate(with_memory, task, args, memory=True)
    acc_ablation = evaluate(with_memory, task, args, memory=True, clear_before_query=True)
    print(
        f"held-out accuracy at the queries ({args.pairs} pair(s), distance {args.distance}, {args.steps} steps, "
        f"fusion bias {args.fusion_bias:g}, chance {task.chance:.4f}):"
    )
    print(f"  GPT-2 alone                          {acc_plain:.3f}   (training {t_plain:.0f} s)")
    print(f"  GPT-2 + memory                       {acc_mem:.3f}   (training {t_mem:.0f} s)")
    print(f"  GPT-2 + memory, emptied at queries   {acc_ablation:.3f}")


if __name__ == "__main__":
    main()
