"""Train and evaluate every contender alike: the heart of ``python -m memgpt compare``.

Per (task, contender, learning rate) a **training run**: the same seeded data for everyone,
AdamW with linear warm-up and cosine decay, gradient clipping, batch 32; a sample is fed one
segment at a time and the loss (cross-entropy at the answer positions) is back-propagated
through all of its segments. Each run is scored on held-out samples at the training distances
(the validation set, another seed); the best learning rate per contender (validation accuracy,
then loss) is then **evaluated** by streaming held-out samples far beyond training under
``torch.no_grad()``, recording accuracy, seconds and the peak resident memory per point.

Runs go to a pool of worker processes (``workers``, one thread each) so that two cores train
two models at once; every run prints a one-line progress bar to stderr.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...tasks import IGNORE_INDEX
from ...training.trainer import TrainConfig, lr_at
from .contender import Builder, Contender, ModelShape, build_matched, check_logits, n_params
from .ours import OURS
from .suite import TASKS, SuiteTask, segments_of

__all__ = ["CompareConfig", "builders", "match_widths", "train_run", "eval_run", "run_compare"]


@dataclass
class CompareConfig:
    tasks: tuple[str, ...] = ("recall",)  # passkey and mqar when asked for: each about as long again
    contenders: tuple[str, ...] = ()  # empty: every contender but those in NOT_BY_DEFAULT
    steps: int = 500
    batch_size: int = 32
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    warmup_steps: int = 50
    grad_clip: float = 1.0
    dim: int = 64  # of the reference contender (memgpt-strength); the others are matched to it
    depth: int = 2
    heads: int = 4
    reference: str = "memgpt-strength"
    val_samples: int = 32  # per training distance
    eval_samples: int = 64  # per evaluation point
    long_tokens: int = 65536  # points longer than this are scored on long_eval_samples samples
    long_eval_samples: int = 16
    eval_batch_size: int = 32
    eval_budget_s: float = 900.0  # per contender and task; points that would exceed it are skipped
    seed: int = 0
    workers: int = 2
    quick: bool = False
    extra: dict = field(default_factory=dict)


# Contenders left out of a run that names none, with the reason (they run when named).
NOT_BY_DEFAULT = {
    "titans": "not in the default run: ~1.8 s per training step at 1 thread on an idle core (7 s beside "
    "another job), ~12x memgpt-strength's, as its adapter re-runs the whole prefix at every segment; "
    "name it with --contenders to run it",
}


def builders() -> dict[str, Builder]:
    """Every contender by name: ours first, then the peers (whose packages may be missing)."""
    from .peers import PEERS

    return OURS | PEERS


def match_widths(cfg: CompareConfig, task: SuiteTask, names: list[str]) -> tuple[dict, dict[str, str]]:
    """name -> (dim, params) for every buildable contender, its width matched to the reference's
    parameter count; and name -> reason for those that cannot be built."""
    every = builders()
    base = ModelShape(task.vocab_size, task.make(task.train_x[0]).segment_len, cfg.dim, cfg.depth, cfg.heads)
    ref = every[cfg.reference](base)
    if isinstance(ref, str):
        raise RuntimeError(f"the reference contender {cfg.reference} cannot be built: {ref}")
    target = n_params(ref.model)
    dims: dict[str, tuple[int, int]] = {}
    missing: dict[str, str] = {}
    for name in names:
        built = (ref, cfg.dim) if name == cfg.reference else build_matched(every[name], base, target)
        if isinstance(built, str):
            missing[name] = built
        else:
            dims[name] = (built[1], n_params(built[0].model))
    return dims, missing


# ---------------------------------------------------------------------------------------- runs


def _build(name: str, task: SuiteTask, cfg: CompareConfig, dim: int, seed: int) -> Contender:
    torch.manual_seed(seed)
    shape = ModelShape(task.vocab_size, task.make(task.train_x[0]).segment_len, dim, cfg.depth, cfg.heads)
    built = builders()[name](shape)
    if isinstance(built, str):
        raise RuntimeError(f"{name} cannot be built: {built}")
    return built


def _sample_loss(c: Contender, task, batch_size: int, gen: torch.Generator, vocab: int, checked: list[bool]):
    """Feed one batch of ``task`` segment by segment; (summed answer loss, correct, answers)."""
    state = None
    loss = torch.zeros(())
    correct = total = 0
    for ids, targets in segments_of(task, batch_size, gen):
        logits, state = c.step(ids, state)
        if not checked[0]:
            check_logits(c.name, logits, ids, vocab)
            checked[0] = True
        answer = targets != IGNORE_INDEX
        if answer.any():
            picked = logits[answer].float()
            loss = loss + F.cross_entropy(picked, targets[answer], reduction="sum")
            correct += int((picked.argmax(-1) == targets[answer]).sum())
            total += int(answer.sum())
    return loss, correct, total


PROGRESS = logging.getLogger("memgpt.compare")  # one progress line per run; silence it with its level


def _progress_to_stderr() -> None:
    """In a worker process: send the progress lines to stderr unless the caller routed them already."""
    if not PROGRESS.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        PROGRESS.addHandler(handler)
        PROGRESS.setLevel(logging.INFO)
        PROGRESS.propagate = False


class _Progress:
    """One line per run on the ``memgpt.compare`` logger, at most every ``every`` seconds."""

    def __init__(self, label: str, total: int, every: float = 10.0) -> None:
        self.label, self.total, self.every = label, total, every
        self.start = self.last = time.perf_counter()

    def update(self, done: int, note: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every and done < self.total:
            return
        self.last = now
        filled = int(20 * done / max(1, self.total))
        bar = "#" * filled + "." * (20 - filled)
        PROGRESS.info(f"[{self.label}] [{bar}] {done}/{self.total} {note} ({now - self.start:.0f}s)")


def train_run(task_name: str, name: str, lr: float, dim: int, cfg: CompareConfig, ckpt: str) -> dict:
    """Train one contender at one learning rate; validate; save its weights to ``ckpt``."""
    torch.set_num_threads(1)
    task = TASKS[task_name]
    c = _build(name, task, cfg, dim, cfg.seed)
    opt = torch.optim.AdamW(c.model.parameters(), lr=lr, weight_decay=0.0)
    schedule = TrainConfig(steps=cfg.steps, lr=lr, warmup_steps=cfg.warmup_steps)  # the trainer's warm-up + cosine
    gen = torch.Generator().manual_seed(cfg.seed)  # the same data for every contender and lr
    _progress_to_stderr()
    progress = _Progress(f"{task_name} {name} lr={lr:g}", cfg.steps)
    checked = [False]
    times, losses, failure = [], [], None
    c.model.train()
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        x = task.train_x[int(torch.randint(len(task.train_x), (1,), generator=gen))]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule)
        loss, _, total = _sample_loss(c, task.make(x), cfg.batch_size, gen, task.vocab_size, checked)
        loss = loss / max(1, total)
        if not torch.isfinite(loss):
            failure = f"non-finite loss at step {step}"
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(c.model.parameters(), cfg.grad_clip)
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        progress.update(step + 1, f"loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    record: dict[str, Any] = dict(
        task=task_name,
        contender=name,
        lr=lr,
        dim=dim,
        params=n_params(c.model),
        config=c.config,
        steps=len(times),
        ms_per_step=1e3 * statistics.median(times) if times else None,
        train_s=sum(times),
        final_loss=sum(losses[-50:]) / max(1, len(losses[-50:])) if losses else None,
        failure=failure,
    )
    if failure is None:
        record |= _validate(c, task, cfg)
        torch.save(c.model.state_dict(), ckpt)
    val_acc, val_loss = float(record.get("val_acc", math.nan)), float(record.get("val_loss", math.nan))
    note = f"val bpc {val_loss / math.log(2):.3f}" if task.metric == "bpc" else f"val acc {val_acc:.3f}"
    progress.update(cfg.steps, note, force=True)
    return record


@torch.no_grad()
def _validate(c: Contender, task: SuiteTask, cfg: CompareConfig) -> dict:
    c.model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)  # held out: another seed
    loss = 0.0
    correct = total = 0
    make = task.make_val or task.make
    for x in task.train_x:
        left = cfg.val_samples
        while left > 0:
            b = min(left, cfg.eval_batch_size)
            sl, sc, st = _sample_loss(c, make(x), b, gen, task.vocab_size, [True])
            loss, correct, total, left = loss + float(sl), correct + sc, total + st, left - b
    return dict(val_acc=correct / max(1, total), val_loss=loss / max(1, total))


def _peak_rss_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux)
    except OSError:
        pass


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            found = re.search(r"VmHWM:\s+(\d+) kB", f.read())
    except OSError:
        return None
    return None if found is None else int(found.group(1)) / 1024


@torch.no_grad()
def _accuracy_points(c: Contender, task: SuiteTask, cfg: CompareConfig, eval_x: tuple, progress: _Progress) -> list:
    """Accuracy on held-out samples at each evaluation point, streamed; the points that its
    ``max_tokens`` or the evaluation budget cannot fit are rows that say so."""
    gen = torch.Generator().manual_seed(cfg.seed + 2_000_003)
    points: list[dict] = []
    spent, per_segment = 0.0, None
    for i, x in enumerate(eval_x):
        segments = task.segments(x)
        tokens = segments * task.make(x).segment_len
        samples = cfg.eval_samples if tokens <= cfg.long_tokens else min(cfg.eval_samples, cfg.long_eval_samples)
        batches = -(-samples // cfg.eval_batch_size)
        if c.max_tokens is not None and tokens > c.max_tokens:
            points.append(dict(x=x, skipped=f"{tokens} tokens exceed what it can attend to ({c.max_tokens})"))
            continue
        if per_segment is not None and spent + per_segment * segments * batches > cfg.eval_budget_s:
            need = per_segment * segments * batches
            points.append(
                dict(
                    x=x,
                    skipped=f"would take ~{need / 60:.0f} min (budget {cfg.eval_budget_s / 60:.0f} min)",
                    why="budget",
                )
            )
            continue
        _peak_rss_reset()
        t0 = time.perf_counter()
        correct = total = 0
        left = samples
        while left > 0:
            b = min(left, cfg.eval_batch_size)
            _, sc, st = _sample_loss(c, task.make(x), b, gen, task.vocab_size, [True])
            correct, total, left = correct + sc, total + st, left - b
        seconds = time.perf_counter() - t0
        spent += seconds
        per_segment = seconds / (segments * batches)
        points.append(
            dict(x=x, acc=correct / max(1, total), answers=total, seconds=seconds, peak_rss_mb=_peak_rss_mb())
        )
        progress.update(i + 1, f"x={x} acc {points[-1]['acc']:.3f}", force=True)
    return points


@torch.no_grad()
def eval_run(task_name: str, name: str, dim: int, cfg: CompareConfig, ckpt: str, eval_x: tuple) -> dict:
    """Evaluate one trained contender: stream held-out samples at every evaluation point (or the
    task's own evaluation); skip the points its budget cannot fit."""
    torch.set_num_threads(1)
    task = TASKS[task_name]
    c = _build(name, task, cfg, dim, cfg.seed)
    c.model.load_state_dict(torch.load(ckpt, weights_only=True))
    c.model.eval()
    _progress_to_stderr()
    progress = _Progress(f"{task_name} {name} eval", len(eval_x), every=0.0)
    if task.evaluate is not None:  # a task with its own evaluation (text: bits per character)
        _peak_rss_reset()
        points = [p | dict(peak_rss_mb=_peak_rss_mb()) for p in task.evaluate(c, cfg.eval_batch_size, cfg.quick)]
        done = [f"{p['x']} {p[task.metric]:.3f}" for p in points if p.get(task.metric) is not None]
        progress.update(len(eval_x), ", ".join(done) or points[0].get("skipped", ""), force=True)
    else:
        points = _accuracy_points(c, task, cfg, eval_x, progress)
    return dict(
        task=task_name,
        contender=name,
        points=points,
        chance=_chance(task),
        budget_s=cfg.eval_budget_s,
    )


def _chance(task: SuiteTask) -> float | None:
    """Accuracy by guessing (None for a task scored in bits per character)."""
    return getattr(task.make(task.train_x[0]), "chance", None)


# ---------------------------------------------------------------------------------------- suite


def _journal_read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _journal_add(path: Path, entry: dict) -> None:
    with path.open("a") as f:  # one line per finished run: a killed compare keeps what it finished
        f.write(json.dumps(entry) + "\n")


def _best_lr(runs: list[dict], metric: str = "acc") -> float | None:
    """The learning rate with the best validation accuracy, then loss (``metric`` ``bpc``: loss only)."""
    ok = [r for r in runs if r["failure"] is None]
    if not ok:
        return None
    if metric == "bpc":
        return min(ok, key=lambda r: r["val_loss"])["lr"]
    return max(ok, key=lambda r: (r["val_acc"], -r["val_loss"]))["lr"]


def run_compare(
    cfg: CompareConfig,
    out_dir: str | Path,
    log: Callable[[str], None] = lambda s: None,
    *,
    resume: bool = False,
    report_only: bool = False,
) -> dict:
    """Every task, contender and learning rate; returns (and the caller may write) all rows.

    Each finished run is appended to ``OUT/journal.jsonl`` at once; with ``resume`` the runs and
    evaluations found there (for this configuration, with their checkpoints) are not run again.
    A contender is evaluated as soon as its whole learning-rate sweep has finished.
    ``report_only``: run nothing, report what the journal holds (a stopped or unfinished compare).
    """
    resume = resume or report_only
    out = Path(out_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    journal = out / "journal.jsonl"
    every = builders()
    names = list(cfg.contenders) or [n for n in every if n not in NOT_BY_DEFAULT]
    unknown = [n for n in names if n not in every]
    if unknown:
        raise ValueError(f"unknown contenders {unknown}; expected names from {sorted(every)}")
    if not resume and journal.exists():
        journal.unlink()
    done = {
        (e["kind"], e["task"], e["contender"], e.get("lr"), e["steps_planned"]): e
        for e in _journal_read(journal)
        if e.get("kind") in ("train", "eval")
    }
    results: dict = dict(config=asdict(cfg), tasks={})
    ctx = get_context("spawn")  # workers start clean: one thread each, no inherited state
    with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx) as pool:
        for task_name in cfg.tasks:
            task = TASKS[task_name]
            eval_x = task.quick_eval_x if cfg.quick else task.eval_x
            dims, missing = match_widths(cfg, task, names)
            for name, reason in missing.items():
                log(f"{task_name}: {name} not run: {reason}")
            for name, (dim, params) in dims.items():
                log(f"{task_name}: {name} width {dim}, {params:,} parameters")

            def ckpt(name: str, lr: float, task_name: str = task_name) -> str:
                return str(out / "checkpoints" / f"{task_name}-{name}-{lr:g}.pt")

            runs: dict[tuple[str, float], dict] = {}
            pending: dict = {}
            todo: list[tuple[str, float]] = []
            for name in dims:
                for lr in cfg.lrs:
                    key = ("train", task_name, name, lr, cfg.steps)
                    if key in done and (done[key]["failure"] is not None or Path(ckpt(name, lr)).exists()):
                        runs[(name, lr)] = done[key]["record"] if "record" in done[key] else done[key]
                        log(f"{task_name}: {name} lr={lr:g} taken from {journal}")
                        continue
                    todo.append((name, lr))
            evals: dict[str, list[dict]] = {}
            best: dict[str, float] = {}

            def sweep_done(name: str) -> bool:
                return all((name, lr) in runs for lr in cfg.lrs)

            def submit_eval(name: str) -> None:
                lr = _best_lr([runs[(name, lr)] for lr in cfg.lrs], task.metric)
                if lr is None:
                    return
                best[name] = lr
                key = ("eval", task_name, name, lr, cfg.steps)
                old = done.get(key)
                if old is not None and [p["x"] for p in old["points"]] == list(eval_x):
                    # kept unless it skipped points that a larger budget may now reach
                    over_budget = any(
                        p.get("why") == "budget" or "would take" in p.get("skipped", "") for p in old["points"]
                    )
                    if report_only or not over_budget or old.get("budget_s", 0) >= cfg.eval_budget_s:
                        evals[name] = old["points"]
                        return
                evals_todo.append((name, lr))

            # At most one job per worker in flight, evaluations first: a contender's results land as
            # soon as its sweep is done, and a compare stopped early has whole rows, not half ones.
            evals_todo: list[tuple[str, float]] = []

            def fill() -> None:
                while not report_only and len(pending) < cfg.workers and (evals_todo or todo):
                    kind, (name, lr) = ("eval", evals_todo.pop(0)) if evals_todo else ("train", todo.pop(0))
                    if kind == "eval":
                        job = pool.submit(eval_run, task_name, name, dims[name][0], cfg, ckpt(name, lr), eval_x)
                    else:
                        job = pool.submit(train_run, task_name, name, lr, dims[name][0], cfg, ckpt(name, lr))
                    pending[job] = (kind, name, lr)

            for name in dims:
                if sweep_done(name):
                    submit_eval(name)
            fill()
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for job in finished:
                    kind, name, lr = pending.pop(job)
                    result = job.result()
                    _journal_add(
                        journal,
                        dict(kind=kind, task=task_name, contender=name, lr=lr, steps_planned=cfg.steps)
                        | (dict(record=result, failure=result["failure"]) if kind == "train" else result),
                    )
                    if kind == "train":
                        runs[(name, lr)] = result
                        if sweep_done(name):
                            submit_eval(name)
                    else:
                        evals[name] = result["points"]
                fill()
            results["tasks"][task_name] = dict(
                x_label=task.x_label,
                eval_x=list(eval_x),
                chance=_chance(task),
                metric=task.metric,
                runs=[runs[(n, lr)] | {"best": best.get(n) == lr} for n in dims for lr in cfg.lrs if (n, lr) in runs],
                evals={name: evals[name] for name in dims if name in evals},
                unavailable=missing | ({} if cfg.contenders else NOT_BY_DEFAULT),
            )
    return results


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))
