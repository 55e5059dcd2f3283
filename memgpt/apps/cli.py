"""Command line: ``python -m memgpt demo | text | compare | train | eval`` (also installed as ``memgpt``)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..tasks import PasskeyTask, RecallTask
from ..training.distributed import init_from_env, shutdown, world
from ..training.trainer import MODEL_KINDS, TrainConfig, Trainer, evaluate, load_checkpoint, make_task, resolve_device

if TYPE_CHECKING:
    from .text import TextConfig

__all__ = ["main"]


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def top_k_arg(text: str) -> int | None:
    """argparse type: an int >= 0; 0 (read every slot) becomes None."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 (0: read every slot), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 (0: read every slot), got {value}")
    return value or None


def device_arg(text: str) -> str:
    """argparse type: ``auto`` or a torch device this machine has (``cuda`` only where
    ``torch.cuda.is_available()``); the text itself, for :func:`resolve_device`."""
    if text != "auto":
        try:
            torch.device(text)
        except RuntimeError:
            raise argparse.ArgumentTypeError(
                f"expected auto, cpu, cuda, cuda:N, ... (a torch device), got {text!r}"
            ) from None
    try:
        resolve_device(text)  # a CUDA device this machine lacks: the one line that says so
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def distance_list(text: str) -> tuple[int, ...]:
    """argparse type: distances in segments, ``1,2,4`` (one or more ints >= 1; repeats: :func:`distances_of`)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers >= 1 separated by commas (e.g. 1,2,4), got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1 separated by commas (e.g. 1,2,4), got {text!r}")
    return values


def distances_of(groups: list[tuple[int, ...]], parser: argparse.ArgumentParser) -> tuple[int, ...]:
    """``--distances 1,2 4`` (commas, spaces or both) as one tuple; a repeat is an error."""
    values = tuple(d for group in groups for d in group)
    repeated = sorted({d for d in values if values.count(d) > 1})
    if repeated:
        parser.error(
            f"argument --distances: each distance once, got {', '.join(map(str, values))} (repeats {repeated})"
        )
    return values


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    demo = DemoConfig()
    demo.train.device = args.device
    demo.train.seed = args.seed
    if args.steps is not None:
        demo.train.steps = args.steps
    demo.memory_capacity, demo.eviction, demo.top_k = args.capacity, args.eviction, args.top_k
    if args.quick:  # seconds, for CI: the pipeline runs end to end, the numbers mean nothing
        demo.train.steps = min(demo.train.steps, 10)
        demo.eval_batches, demo.eval_batch_size = 1, 16
        demo.eval_distances, demo.probe_distance, demo.probe_batch_size = (1, 4), 4, 4
        demo.eval_pairs = (1, 4)
    if args.distances is not None:
        demo.eval_distances = args.distances
    if args.threads:
        torch.set_num_threads(args.threads)
    run_demo(demo, args.out, progress=not args.quiet)
    return 0


def text_config(args: argparse.Namespace) -> TextConfig:
    """The TextConfig of a ``text`` command line (flags left out keep TextConfig's defaults)."""
    from .text import TextConfig

    cfg = TextConfig(eval_split=args.eval_split, eval_max_chars=args.eval_max_chars, fusion_bias_init=args.fusion_bias)
    cfg.train.device, cfg.train.seed = args.device, args.seed
    if args.steps is not None:
        cfg.train.steps = args.steps
    for name in ("qk_norm", "shift_keys", "top_k", "repeat_prob"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if cfg.top_k == 0:
        cfg.top_k = None
    if args.quick:  # seconds, for CI: a tiny model, a few steps, a few files; the numbers mean nothing
        cfg.dim, cfg.depth, cfg.segments, cfg.memory_capacity = 32, 1, 4, 512
        cfg.train.steps, cfg.train.batch_size = min(cfg.train.steps, 4), 2
        cfg.eval_files, cfg.eval_max_chars, cfg.probe_count = 3, 1024, 4
    return cfg


def _text(args: argparse.Namespace) -> int:
    from .text import format_table, run_text

    cfg = text_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_text(cfg, args.out, progress=not args.quiet, reuse=args.reuse, only=args.only)
    if args.only:
        print(f"saved {results['saved']}")
        return 0
    print(format_table(results))
    written = results["written"]
    note = (
        ""
        if any(w.endswith(".png") for w in written)
        else " (no plot: pip install 'memgpt-layers[plot]' for matplotlib)"
    )
    print(f"\nwrote {', '.join(written)}{note}")
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    # Under torchrun: join the process group (gloo on CPU, NCCL on CUDA, one GPU per rank); the
    # Trainer then trains with DDP. A group the caller set up is left to the caller to end.
    ours = world().size == 1
    rank, device = init_from_env(resolve_device(args.device))
    try:
        return _train_on(args, str(device), rank.is_main)
    finally:
        if ours:
            shutdown()


def _train_on(args: argparse.Namespace, device: str, is_main: bool) -> int:
    ckpt = Path(args.out) / f"{args.task}-{args.model}.pt"
    if args.resume:
        trainer = Trainer.load(args.resume, device=device)
        if args.steps is not None:
            trainer.cfg.steps = args.steps
    else:
        from .demo import DemoConfig, build_model

        distances = args.distances
        # Without --capacity: room for the longest training sequence (a fifo store then holds everything).
        capacity = args.capacity if args.capacity is not None else (max(distances) + 1) * args.segment_len
        demo = DemoConfig(
            dim=args.dim,
            depth=args.depth,
            segment_len=args.segment_len,
            memory_capacity=capacity,
            eviction=args.eviction,
            top_k=args.top_k,
        )
        cfg = TrainConfig(
            steps=args.steps or 800,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            device=device,
            autocast_bf16=args.bf16,
            distances=distances,
            checkpoint_every=args.checkpoint_every,
        )
        demo.train = cfg
        task_kwargs = {"segment_len": args.segment_len}
        vocab = make_task(args.task, **task_kwargs).vocab_size
        torch.manual_seed(args.seed)
        model = build_model(args.model, demo, vocab).to(device)
        trainer = Trainer(model, args.model, args.task, task_kwargs, cfg)
    trainer.fit(checkpoint=ckpt)
    if is_main:
        print(f"saved {ckpt} (step {trainer.step})")
    return 0


EVAL_DISTANCES = (1, 2, 4, 8)  # eval's default distances (recall and passkey checkpoints)
TEXT_EVAL_FLAGS = ("eval_split", "eval_max_chars", "eval_files")  # eval's flags for text checkpoints only


def _eval(args: argparse.Namespace) -> int:
    try:
        payload = load_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:  # one line: torch's own explanation runs to several
        raise SystemExit(f"memgpt eval: {str(e).splitlines()[0]}") from None
    task_name = payload["task"]
    if task_name == "text":
        if args.distances is not None:
            raise SystemExit(
                f"memgpt eval: {args.checkpoint} is a character-LM checkpoint (task 'text'), scored in bits per "
                "character; --distances is for recall and passkey checkpoints only"
            )
        return _eval_text(args, payload)
    if task_name not in ("recall", "passkey"):
        raise SystemExit(
            f"memgpt eval: {args.checkpoint} was trained on task {task_name!r}; eval scores recall and passkey "
            "checkpoints by distance and text checkpoints in bits per character"
        )
    given = [f"--{name.replace('_', '-')}" for name in TEXT_EVAL_FLAGS if getattr(args, name) is not None]
    if given:
        raise SystemExit(
            f"memgpt eval: {', '.join(given)}: for text checkpoints only; {args.checkpoint} was trained on task "
            f"{task_name!r} (scored by --distances)"
        )
    trainer = Trainer.load(args.checkpoint, device=args.device)
    results = {}
    for d in args.distances or EVAL_DISTANCES:
        task = make_task(payload["task"], **{**payload["task_kwargs"], "distance": d})
        assert isinstance(task, (RecallTask, PasskeyTask))  # the two tasks admitted above
        row = {trainer.kind: evaluate(trainer.model, trainer.kind, task, batches=4, batch_size=128, seed=args.seed)}
        if trainer.kind == "memory":
            row["ablation"] = evaluate(
                trainer.model, "memory", task, batches=4, batch_size=128, seed=args.seed, ablate=True
            )
        results[d] = row
    print(
        json.dumps(
            {"checkpoint": str(args.checkpoint), "step": trainer.step, "accuracy_by_distance": results}, indent=2
        )
    )
    return 0


def _eval_text(args: argparse.Namespace, payload: dict) -> int:
    """A checkpoint of the ``text`` command, scored as that command scores it: bits per character
    on held-out stdlib files (overall, far-copyable), the copy probe and, for the memory model,
    the probe with its memory cleared."""
    from ..models.config import MemGPTConfig
    from ..models.model import MemGPTModel
    from ..tasks.stdlib_text import StdlibCorpus
    from .text import KINDS, TextConfig, evaluate_text

    kind = payload["kind"]
    if kind not in KINDS:
        raise SystemExit(
            f"memgpt eval: {args.checkpoint} is a text checkpoint of model kind {kind!r}; text is scored for "
            f"{' and '.join(KINDS)} models"
        )
    task_kwargs = payload["task_kwargs"]
    model = MemGPTModel(MemGPTConfig(**payload["model_config"]))
    model.load_state_dict(payload["model"])
    model = model.to(resolve_device(args.device))
    cfg = TextConfig(
        segment_len=model.config.segment_len,
        segments=task_kwargs["segments"],
        root=task_kwargs.get("root"),
        eval_split=args.eval_split or "test",
        eval_max_chars=args.eval_max_chars or 0,
        eval_files=args.eval_files or 0,
    )
    results = evaluate_text({kind: model}, cfg, StdlibCorpus.scan(cfg.root))
    # JSON has no NaN: a mean over no characters (no far-copyable one in short files) is null
    row = {k: (v if math.isfinite(v) else None) for k, v in results[kind].items() if k != "eval_seconds"}
    print(
        json.dumps(
            {
                "checkpoint": str(args.checkpoint),
                "task": "text",
                "kind": kind,
                "step": payload["step"],
                "eval_split": cfg.eval_split,
                "files": len(results["files"]),
                "characters": results["characters"],
                "far_copyable_fraction": results["far_copyable_fraction"],
                "bits_per_character": row,
            },
            indent=2,
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memgpt", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--device", type=device_arg, default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ..."
        )
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--threads", type=int, default=0, help="torch.set_num_threads for this run (0: leave as is)")

    d = sub.add_parser(
        "demo",
        help="segmented recall far beyond the memory's capacity: strength vs fifo eviction, baseline, oracle "
        "(about 10 minutes on 2 CPU cores)",
    )
    common(d)
    d.add_argument(
        "--out", default="out/demo", help="folder for results.json, recall.png, write_gate.png, memory_slots.png"
    )
    d.add_argument("--steps", type=int, default=None, help="training steps per model (default 800)")
    d.add_argument("--quick", action="store_true", help="a few steps only: checks the pipeline, not the result")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    memory_flags(d, capacity=32, eviction="strength", contrast=True)
    d.add_argument(
        "--distances",
        type=distance_list,
        nargs="+",
        default=None,
        help="evaluation distances in segments: 1,2,4 or 1 2 4 (default 1,2,4,8,16,32,64,128)",
    )
    d.set_defaults(func=_demo)

    x = sub.add_parser("text", help="character LM on CPython's stdlib: memory vs baseline, bits per character")
    common(x)
    x.add_argument("--out", default="out/text", help="folder for results.json, manifest.json, the plot, checkpoints")
    x.add_argument("--steps", type=int, default=None, help="training steps per model (default 600)")
    x.add_argument("--eval-split", choices=("test", "validation"), default="test")
    x.add_argument("--eval-max-chars", type=int, default=0, help="characters per file, from its start (0: all)")
    x.add_argument("--fusion-bias", type=float, default=0.0, help="fusion gate bias at initialisation (both models)")
    x.add_argument(
        "--qk-norm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cosine-similarity memory reads with a learned scale (both models; default: TextConfig's)",
    )
    x.add_argument(
        "--shift-keys",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="key the memory slot of character t by character t-1 (induction-shaped writes)",
    )
    x.add_argument("--top-k", type=int, default=None, help="read only the k best memory slots (0: all)")
    x.add_argument(
        "--repeat-prob",
        type=float,
        default=None,
        help="fraction of training windows with one chunk repeated >= 1 segment later (both models)",
    )
    x.add_argument(
        "--only",
        choices=("memory", "baseline"),
        default=None,
        help="train this model only and stop (train the two at once, then evaluate with --reuse)",
    )
    x.add_argument("--reuse", action="store_true", help="evaluate OUT/text-*.pt when present instead of training")
    x.add_argument(
        "--quick", action="store_true", help="a tiny model, a few steps: checks the pipeline, not the result"
    )
    x.add_argument("--quiet", action="store_true", help="no progress bars")
    x.set_defaults(func=_text)

    from .compare.cli import add_parser as add_compare_parser

    add_compare_parser(sub)

    t = sub.add_parser(
        "train", help="train one model on one task; writes OUT/TASK-MODEL.pt (DDP under `torchrun -m memgpt train`)"
    )
    common(t)
    t.add_argument("--task", choices=("recall", "passkey"), default="recall")
    t.add_argument("--model", choices=MODEL_KINDS, default="memory")
    t.add_argument("--out", default="out/train")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=32, help="the global batch (split over torchrun's ranks)")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--dim", type=int, default=64)
    t.add_argument("--depth", type=int, default=2)
    t.add_argument("--segment-len", type=int, default=16)
    t.add_argument(
        "--distances",
        type=distance_list,
        nargs="+",
        default=[(1, 2, 3, 4, 5, 6, 7, 8)],
        help="training distances in segments, sampled per batch: 1,2,4 or 1 2 4 (default 1..8)",
    )
    memory_flags(t, capacity=None, eviction="fifo", contrast=False)
    t.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (slow on CPUs without bf16 units)")
    t.add_argument("--checkpoint-every", type=int, default=0)
    t.add_argument("--resume", default=None, help="a checkpoint to continue from (same data stream)")
    t.set_defaults(func=_train)

    e = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: recall/passkey by distance (and its ablation), text in bits per character",
    )
    common(e)
    e.add_argument("checkpoint", help="OUT/TASK-MODEL.pt of `train`, or OUT/text-KIND.pt of `text`")
    e.add_argument(
        "--distances",
        type=distance_list,
        nargs="+",
        default=None,
        help="recall/passkey: 1,2,4 or 1 2 4 (default " + ",".join(map(str, EVAL_DISTANCES)) + ")",
    )
    e.add_argument(
        "--eval-split", choices=("test", "validation"), default=None, help="text: held-out split (default test)"
    )
    e.add_argument(
        "--eval-max-chars",
        type=positive_int,
        default=None,
        help="text: characters per file, from its start (default all)",
    )
    e.add_argument(
        "--eval-files", type=positive_int, default=None, help="text: the split's first N files (default all)"
    )
    e.set_defaults(func=_eval)
    return p


def memory_flags(sp: argparse.ArgumentParser, *, capacity: int | None, eviction: str, contrast: bool) -> None:
    """``--capacity``, ``--eviction``, ``--top-k``: the memory of the model(s) a command trains."""
    from ..memory import EVICTION_POLICIES

    room = "room for the longest training sequence" if capacity is None else str(capacity)
    sp.add_argument(
        "--capacity", type=positive_int, default=capacity, help=f"memory slots per layer and head (default {room})"
    )
    also = "; the contrast model uses fifo (strength when this is fifo)" if contrast else ""
    sp.add_argument(
        "--eviction",
        choices=EVICTION_POLICIES,
        default=eviction,
        help=f"which slot a full memory overwrites (default {eviction}){also}",
    )
    sp.add_argument("--top-k", type=top_k_arg, default=None, help="read only the k best memory slots (default 0: all)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line, ``--distances`` flattened to one tuple (exits with a message on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "distances", None) is not None:
        args.distances = distances_of(args.distances, parser)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
