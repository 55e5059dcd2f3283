"""Training and evaluation on the synthetic tasks: ordinary PyTorch, checkpoints that resume exactly.

Three ways to run the same ``MemGPTModel`` on a task batch (``ModelKind``):

- ``memory``:   the whole sequence in one call; the model carries memory across segments;
- ``baseline``: one call per segment with a fresh state each time: nothing crosses a segment;
- ``oracle``:   a model whose single segment spans the whole sequence: plain full attention
                (its memory is never read before it is written, so it holds nothing useful).

Evaluation adds the **ablation**: the memory model with its memory stores emptied just before
the query segment (attention buffers, positions and the previous token kept).
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..models.config import MemGPTConfig
from ..models.model import MemGPTModel
from ..models.state import MemGPTState
from ..tasks import IGNORE_INDEX, PasskeyTask, RecallTask, TaskBatch
from ..tasks.text_windows import TextWindowTask
from .distributed import all_reduce_sum, world

__all__ = [
    "TrainConfig",
    "ModelKind",
    "Trainer",
    "TaskLoss",
    "backward_pass",
    "run_model",
    "evaluate",
    "resolve_device",
    "make_task",
    "lr_at",
]

ModelKind = Literal["memory", "baseline", "oracle"]
MODEL_KINDS = ("memory", "baseline", "oracle")


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; a CUDA device this machine lacks raises RuntimeError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
            raise RuntimeError(
                f"device {device!r} asked for, but torch.cuda.is_available() is False (torch {torch.__version__}, "
                f"{build}): use 'cpu' or 'auto'"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise RuntimeError(f"device {device!r} asked for, but this machine has {count} CUDA device(s)")
    return resolved


def make_task(name: str, **kwargs) -> RecallTask | PasskeyTask | TextWindowTask:
    if name == "recall":
        return RecallTask(**kwargs)
    if name == "passkey":
        return PasskeyTask(**kwargs)
    if name == "text":
        return TextWindowTask(**kwargs)
    raise ValueError(f"unknown task {name!r}: expected 'recall', 'passkey' or 'text'")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of one training run."""

    steps: int = 800
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    autocast_bf16: bool = False
    distances: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)  # sampled uniformly per batch
    num_pairs: tuple[int, ...] = (4,)  # recall only: sampled uniformly per batch
    bptt_segments: int | None = None  # truncated BPTT window in segments (memory model); None = whole sequence
    inplace_memory: bool = False  # memory model: logged in-place writes (no store copy per write)
    log_every: int = 50
    checkpoint_every: int = 0  # 0 = only at the end (when a path is given)
    extra: dict = field(default_factory=dict)


def answer_accuracy(logits: Tensor, targets: Tensor) -> tuple[int, int]:
    """(correct, total) over answer positions."""
    mask = targets != IGNORE_INDEX
    return int((logits.argmax(-1)[mask] == targets[mask]).sum()), int(mask.sum())


def _loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def _logits(
    model: MemGPTModel,
    kind: str,
    ids: Tensor,
    segment_len: int,
    state: MemGPTState | None = None,
    inplace_memory: bool = False,
) -> tuple[Tensor, MemGPTState | None]:
    """Logits (b n vocab) of ``model`` run as ``kind`` on ids (b n), and the memory kind's new state.

    ``inplace_memory``: the memory kind writes into ``state`` in place (donating it; under
    autograd the writes are logged, see :mod:`memgpt.memory.reversible`)."""
    if kind == "baseline":
        chunks = [model(ids[:, s : s + segment_len]).logits for s in range(0, ids.shape[1], segment_len)]
        return torch.cat(chunks, dim=1), None
    if kind == "oracle":
        return model(ids).logits, None
    if kind == "memory":
        out = model(ids, state, donate_state=inplace_memory)
        return out.logits, out.state
    raise ValueError(f"unknown model kind {kind!r}: expected one of {MODEL_KINDS}")


class TaskLoss(nn.Module):
    """The training loss of ``model`` run as ``kind``, as one module call.

    ``loss, logits, state = task_loss(input_ids (b n), targets (b n), segment_len, state=None,
    denominator=None)``: the cross-entropy summed over the answer positions and divided by
    ``denominator`` (default: their number, i.e. the mean). ``logits`` (b n vocab) and the new
    ``state`` (memory kind; else None) come back detached: the loss is the only output with a
    graph. That is what DistributedDataParallel needs: one forward per backward, and exactly the
    parameters the loss uses reachable from the outputs. ``state`` continues a stream (truncated
    BPTT windows; memory kind only). ``inplace_memory=True`` writes the memory in place (logged
    for backward) instead of copying each store per write; ``state`` is then consumed.
    """

    def __init__(self, model: MemGPTModel, kind: str, *, inplace_memory: bool = False) -> None:
        super().__init__()
        if kind not in MODEL_KINDS:
            raise ValueError(f"unknown model kind {kind!r}: expected one of {MODEL_KINDS}")
        if not isinstance(inplace_memory, bool):
            raise TypeError(f"inplace_memory must be a bool, got {type(inplace_memory).__name__}")
        self.model, self.kind, self.inplace_memory = model, kind, inplace_memory

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor,
        segment_len: int,
        state: MemGPTState | None = None,
        denominator: float | None = None,
    ) -> tuple[Tensor, Tensor, MemGPTState | None]:
        """input_ids, targets: (b n) -> (loss, logits (b n vocab) detached, the new state detached or None)."""
        if state is not None and self.kind != "memory":
            raise ValueError(f"only the memory kind carries a state between calls, got kind {self.kind!r}")
        logits, state = _logits(self.model, self.kind, input_ids, segment_len, state, self.inplace_memory)
        if denominator is None:
            loss = _loss(logits, targets)
        else:
            flat = logits.float().flatten(0, 1)
            loss = F.cross_entropy(flat, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum") / denominator
        return loss, logits.detach(), None if state is None else state.detach()


def backward_pass(
    task_loss: TaskLoss | DistributedDataParallel,
    batch: TaskBatch,
    *,
    bptt_segments: int | None = None,
    denominator: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Back-propagate ``task_loss`` on ``batch``; returns logits (b L vocab) and the loss, detached.

    In one piece, or (memory kind, ``bptt_segments``) window by window with the state detached
    between windows (truncated BPTT). Under DDP the gradients accumulate locally over the windows
    (``no_sync``) and are averaged over ranks once, in the last window's backward.
    """
    ids, targets, T = batch.input_ids, batch.targets, batch.segment_len
    inner = task_loss.module if isinstance(task_loss, DistributedDataParallel) else task_loss
    if bptt_segments is None or inner.kind != "memory":
        loss, logits, _ = task_loss(ids, targets, T, None, denominator)
        loss.backward()
        return logits, loss.detach()
    if denominator is None:
        denominator = int((targets != IGNORE_INDEX).sum())
    window = bptt_segments * T
    starts = range(0, ids.shape[1], window)
    state, pieces, total = None, [], torch.zeros((), device=ids.device)
    for s in starts:
        last = s == starts[-1]
        sync = task_loss.no_sync() if isinstance(task_loss, DistributedDataParallel) and not last else nullcontext()
        with sync:
            window_ids, window_targets = ids[:, s : s + window], targets[:, s : s + window]
            part, logits, state = task_loss(window_ids, window_targets, T, state, max(denominator, 1))
            if denominator:
                part.backward()
        total = total + part.detach()
        pieces.append(logits)  # the state came back detached: the next window starts a new graph
    return torch.cat(pieces, dim=1), total


def run_model(
    model: MemGPTModel,
    kind: str,
    batch: TaskBatch,
    *,
    ablate: bool = False,
    bptt_segments: int | None = None,
    backward: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Logits (b L vocab) of ``model`` on ``batch`` run as ``kind``; with ``backward``, the loss is
    back-propagated (chunk by chunk under truncated BPTT) and returned detached."""
    if backward:
        if ablate:
            raise ValueError("ablate=True is an evaluation mode; it cannot be combined with backward=True")
        return backward_pass(TaskLoss(model, kind), batch, bptt_segments=bptt_segments)
    ids, T = batch.input_ids, batch.segment_len
    if kind == "memory" and ablate:
        q0 = batch.query_segment * T
        state = model(ids[:, :q0]).state
        rest = model(ids[:, q0:], state.clear_memory()).logits
        return torch.cat([rest.new_zeros(ids.shape[0], q0, rest.shape[-1]), rest], 1), None
    return _logits(model, kind, ids, T)[0], None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Trainer:
    """AdamW + warm-up/cosine schedule + gradient clipping, on batches drawn from a task family.

    The data stream is a ``torch.Generator`` seeded by ``cfg.seed``; a checkpoint stores the
    model, the optimiser, both RNG states and the step, so a resumed run continues identically.

    Under ``torchrun`` (a process group initialised, see :mod:`memgpt.training.distributed`) the loss
    module is wrapped in DistributedDataParallel. ``cfg.batch_size`` is the *global* batch: every
    rank draws it from the same data stream and trains on its own slice of rows, with the loss
    normalised by the global number of answer tokens, so the gradient DDP averages is exactly the
    single-process gradient on the whole batch. Only rank 0 prints and writes checkpoints.
    """

    def __init__(self, model: MemGPTModel, kind: str, task_name: str, task_kwargs: dict, cfg: TrainConfig) -> None:
        if kind not in MODEL_KINDS:
            raise ValueError(f"unknown model kind {kind!r}: expected one of {MODEL_KINDS}")
        self.model, self.kind, self.cfg = model, kind, cfg
        self.task_name, self.task_kwargs = task_name, dict(task_kwargs)
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.world = world()
        if cfg.batch_size % self.world.size:
            raise ValueError(
                f"batch_size is the global batch and must be divisible by the {self.world.size} ranks, "
                f"got {cfg.batch_size}"
            )
        task_loss = TaskLoss(model, kind, inplace_memory=cfg.inplace_memory)
        # Some runs leave parameters without a gradient, which DDP must be told about: the baseline
        # and the oracle never read what the writer wrote, nor does a one-segment BPTT window. The
        # memory model over whole multi-segment sequences uses every parameter (and DDP warns on
        # every run if told to look for unused ones there).
        unused = kind != "memory" or cfg.bptt_segments is not None
        self.task_loss = (
            DistributedDataParallel(
                task_loss,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=unused,
            )
            if self.world.size > 1
            else task_loss
        )
        self.data_rng = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.history: list[dict] = []
        # Text has no per-batch settings and reads its files once: build it once, not per batch.
        self.fixed_task = make_task(task_name, **task_kwargs) if task_name == "text" else None

    def next_batch(self) -> TaskBatch:
        """The next global batch of the data stream (distance and, for recall, pair count drawn per batch)."""
        g = self.data_rng
        if self.fixed_task is not None:
            return self.fixed_task.sample(self.cfg.batch_size, g).to(self.device)
        kw = dict(self.task_kwargs)
        kw["distance"] = self.cfg.distances[int(torch.randint(len(self.cfg.distances), (1,), generator=g))]
        if self.task_name == "recall":
            kw["num_pairs"] = self.cfg.num_pairs[int(torch.randint(len(self.cfg.num_pairs), (1,), generator=g))]
        return make_task(self.task_name, **kw).sample(self.cfg.batch_size, g).to(self.device)

    def local_rows(self, batch: TaskBatch) -> TaskBatch:
        """This rank's slice of the global ``batch`` (all of it without a process group)."""
        if self.world.size == 1:
            return batch
        n = batch.input_ids.shape[0] // self.world.size
        rows = slice(self.world.rank * n, (self.world.rank + 1) * n)
        return replace(batch, input_ids=batch.input_ids[rows], targets=batch.targets[rows])

    def train_step(self) -> dict:
        """One optimiser step on the next batch; returns its record (step, loss, acc, tokens)."""
        cfg, model = self.cfg, self.model
        model.train()
        batch = self.next_batch()  # the global batch, the same on every rank
        local = self.local_rows(batch)
        # DDP averages the ranks' gradients; dividing each rank's summed loss by (global answers /
        # ranks) makes that average the gradient of the mean loss over the whole global batch.
        denominator = None
        if self.world.size > 1:
            denominator = max(int((batch.targets != IGNORE_INDEX).sum()), 1) / self.world.size
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
            logits, loss = backward_pass(
                self.task_loss, local, bptt_segments=cfg.bptt_segments, denominator=denominator
            )
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        correct, total = answer_accuracy(logits, local.targets)
        loss_sum, correct_sum, total_sum = all_reduce_sum([float(loss), correct, total], self.device)
        return {
            "step": self.step,
            "loss": loss_sum / self.world.size,
            "acc": correct_sum / max(total_sum, 1),
            "tokens": batch.input_ids.numel(),
        }

    def fit(
        self, *, until: int | None = None, checkpoint: str | Path | None = None, progress: bool = True
    ) -> list[dict]:
        """Train from the current step up to ``until`` (default ``cfg.steps``, which also sets the
        learning-rate schedule); returns the per-step records. Under DDP only rank 0 prints and
        writes the checkpoint (the ranks' models are identical)."""
        until = self.cfg.steps if until is None else min(until, self.cfg.steps)
        progress, checkpoint = (progress, checkpoint) if self.world.is_main else (False, None)
        start, tokens = time.perf_counter(), 0
        while self.step < until:
            rec = self.train_step()
            tokens += rec["tokens"]
            rec["tokens_per_s"] = tokens / (time.perf_counter() - start)
            self.history.append(rec)
            if progress and (self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps):
                _progress(self.kind, rec, self.cfg.steps)
            if checkpoint and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save(checkpoint)
        if progress:
            print(file=sys.stderr)
        if checkpoint:
            self.save(checkpoint)
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> None:
        """Write a checkpoint (model, optimiser, both RNG states, step, configs) atomically to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": "memgpt.checkpoint",
            "version": 1,
            "kind": self.kind,
            "task": self.task_name,
            "task_kwargs": self.task_kwargs,
            "model_config": self.model.config.to_dict(),
            "train_config": _plain(asdict(self.cfg)),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data_rng": self.data_rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
        }
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)  # never leave a half-written checkpoint behind

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto") -> Trainer:
        """Rebuild the trainer of a checkpoint written by :meth:`save`; ``fit()`` then continues the
        same run bit for bit."""
        payload = load_checkpoint(path)
        cfg = TrainConfig(**_tuples(payload["train_config"]))
        cfg.device = device
        model = MemGPTModel(MemGPTConfig(**payload["model_config"])).to(resolve_device(device))
        model.load_state_dict(payload["model"])
        trainer = cls(model, payload["kind"], payload["task"], payload["task_kwargs"], cfg)
        trainer.optimizer.load_state_dict(payload["optimizer"])
        trainer.data_rng.set_state(payload["data_rng"])
        torch.set_rng_state(payload["torch_rng"])
        trainer.step = payload["step"]
        return trainer


def load_checkpoint(path: str | Path) -> dict:
    """The payload of a checkpoint written by :meth:`Trainer.save` (``torch.load`` with
    ``weights_only=True``, on CPU): model and train configs, weights, optimiser and RNG states, step.

    A file that is not a memgpt checkpoint raises ValueError; a missing one FileNotFoundError.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{str(path)!r} is not a readable memgpt checkpoint: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != "memgpt.checkpoint":
        raise ValueError(f"{str(path)!r} is not a memgpt checkpoint")
    return payload


def _plain(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _progress(kind: str, rec: dict, total: int) -> None:
    done = rec["step"] / total
    bar = "#" * int(30 * done) + "-" * (30 - int(30 * done))
    print(
        f"\r{kind:>8} [{bar}] {rec['step']:>5}/{total} loss {rec['loss']:.3f} acc {rec['acc']:.3f} "
        f"{rec['tokens_per_s']:,.0f} tok/s",
        end="",
        file=sys.stderr,
        flush=True,
    )


@torch.no_grad()
def evaluate(
    model: MemGPTModel,
    kind: str,
    task: RecallTask | PasskeyTask,
    *,
    batches: int,
    batch_size: int,
    seed: int,
    ablate: bool = False,
) -> float:
    """Answer accuracy on ``batches`` held-out batches drawn with ``seed``."""
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    correct = total = 0
    for _ in range(batches):
        batch = task.sample(batch_size, g).to(device)
        logits, _ = run_model(model, kind, batch, ablate=ablate)
        c, t = answer_accuracy(logits, batch.targets)
        correct, total = correct + c, total + t
    return correct / max(total, 1)
