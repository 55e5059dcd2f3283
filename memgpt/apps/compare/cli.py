"""``python -m memgpt compare``: its flags, and the run that prints the tables and writes the files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..report import jsonable
from .report import format_tables, plot_results
from .runner import CompareConfig, builders, default_workers, run_compare
from .suite import TASKS

__all__ = ["add_parser", "config_from_args"]


def _csv(kind, what: str):
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what}: expected comma-separated {kind.__name__}s, got {text!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError(f"{what}: expected at least one value, got {text!r}")
        return values

    return parse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="memgpt's memory vs the no-memory baseline, full attention and peer libraries (recall, passkey, mqar)",
        description=(
            "Train every contender on the same data, steps, batch, optimizer and segment length, with its width "
            "matched to the reference's parameter count and the same learning-rate sweep (best of the sweep on "
            "held-out data at the training distances); then evaluate far beyond training, streamed segment by "
            "segment. Peers come from the optional extra: pip install -e '.[peers]'."
        ),
    )
    p.add_argument(
        "--tasks",
        type=_csv(str, "--tasks"),
        default=None,
        help=f"comma-separated, of {sorted(TASKS)} (default: {','.join(CompareConfig.tasks)}; with --quick: all)",
    )
    p.add_argument(
        "--contenders",
        type=_csv(str, "--contenders"),
        default=(),
        help="comma-separated names (default: all; `--list` shows them)",
    )
    p.add_argument("--list", action="store_true", help="list the contenders and whether each can be built, then stop")
    p.add_argument("--steps", type=int, default=CompareConfig.steps, help="training steps per run")
    p.add_argument("--lrs", type=_csv(float, "--lrs"), default=CompareConfig.lrs, help="the learning-rate sweep")
    p.add_argument("--batch-size", type=int, default=CompareConfig.batch_size)
    p.add_argument("--dim", type=int, default=CompareConfig.dim, help="width of the reference (memgpt-strength)")
    p.add_argument("--eval-samples", type=int, default=CompareConfig.eval_samples)
    p.add_argument("--eval-budget-min", type=float, default=CompareConfig.eval_budget_s / 60)
    p.add_argument("--workers", type=int, default=default_workers(), help="training processes at once (1 thread each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="seconds: a few steps, short evaluations (a pipeline check)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs and evaluations already in OUT/journal.jsonl (same steps) instead of redoing them",
    )
    p.add_argument(
        "--report", action="store_true", help="run nothing: the tables, JSON and plot of what OUT/journal.jsonl holds"
    )
    p.add_argument("--json", default=None, help="write every row here (default OUT/results.json)")
    p.add_argument("--plot", default=None, help="accuracy vs distance/length PNG (default OUT/compare.png)")
    p.add_argument("--out", default="out/compare", help="folder for results, plot and checkpoints")
    p.set_defaults(func=_run)


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    if args.tasks is None:
        args.tasks = tuple(TASKS) if args.quick else CompareConfig.tasks
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"memgpt compare: unknown tasks {unknown}; expected some of {sorted(TASKS)}")
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--dim", args.dim)):
        if value < 1:
            raise SystemExit(f"memgpt compare: {flag} must be >= 1, got {value}")
    cfg = CompareConfig(
        tasks=tuple(args.tasks),
        contenders=tuple(args.contenders),
        steps=args.steps,
        lrs=tuple(args.lrs),
        batch_size=args.batch_size,
        dim=args.dim,
        eval_samples=args.eval_samples,
        eval_budget_s=60 * args.eval_budget_min,
        workers=args.workers,
        seed=args.seed,
        quick=args.quick,
    )
    if args.quick:  # the pipeline end to end in seconds; the numbers mean nothing
        cfg.steps, cfg.batch_size, cfg.lrs = min(cfg.steps, 3), min(cfg.batch_size, 4), cfg.lrs[:2]
        cfg.val_samples, cfg.eval_samples, cfg.eval_batch_size = 4, 4, 4
    return cfg


def _list() -> int:
    from .contender import ModelShape

    shape = ModelShape(vocab_size=48, segment_len=16, dim=64)
    for name, build in builders().items():
        built = build(shape)
        print(f"{name:24s} {'ok' if not isinstance(built, str) else 'unavailable: ' + built}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.list:
        return _list()
    cfg = config_from_args(args)
    out = Path(args.out)
    results = run_compare(
        cfg, out, log=lambda s: print(s, file=sys.stderr, flush=True), resume=args.resume, report_only=args.report
    )
    json_path = Path(args.json) if args.json else out / "results.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(jsonable(results), indent=1))
    print(format_tables(results))
    plot_path = Path(args.plot) if args.plot else out / "compare.png"
    drew = plot_results(results, plot_path)
    if drew:
        print(f"\nwrote {json_path} and {plot_path}")
    elif all(res.get("metric") == "bpc" for res in results["tasks"].values()):
        print(f"\nwrote {json_path} (no plot: bits per character are a table only)")
    else:
        print(f"\nwrote {json_path} (no plot: pip install matplotlib)")
    return 0
