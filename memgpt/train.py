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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import MemGPTConfig
from .model import MemGPTModel
from .tasks import IGNORE_INDEX, PasskeyTask, RecallTask, TaskBatch
from .tasks.text_windows import TextWindowTask

__all__ = ["TrainConfig", "ModelKind", "Trainer", "run_model", "evaluate", "resolve_device", "make_task", "lr_at"]

ModelKind = Literal["memory", "baseline", "oracle"]
MODEL_KINDS = ("memory", "baseline", "oracle")


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    log_every: int = 50
    checkpoint_every: int = 0  # 0 = only at the end (when a path is given)
    extra: dict = field(default_factory=dict)


def answer_accuracy(logits: Tensor, targets: Tensor) -> tuple[int, int]:
    """(correct, total) over answer positions."""
    mask = targets != IGNORE_INDEX
    return int((logits.argmax(-1)[mask] == targets[mask]).sum()), int(mask.sum())


def _loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def run_model(
    model: MemGPTModel, kind: str, batch: TaskBatch, *, ablate: bool = False, bptt_segments: int | None = None,
    backward: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Logits (b L vocab) of ``model`` on ``batch`` run as ``kind``; with ``backward``, the loss is
    back-propagated (chunk by chunk under truncated BPTT) and returned detached."""
    ids, T = batch.input_ids, batch.segment_len
    if kind == "baseline":
        chunks = [model(ids[:, s : s + T]).logits for s in range(0, ids.shape[1], T)]
        logits = torch.cat(chunks, dim=1)
    elif kind == "oracle":
        logits = model(ids).logits
    elif kind == "memory" and ablate:
        q0 = batch.query_segment * T
        state = model(ids[:, :q0]).state
        rest = model(ids[:, q0:], state.clear_memory()).logits
        logits = torch.cat([torch.zeros(ids.shape[0], q0, rest.shape[-1], dtype=rest.dtype, device=rest.device), rest], 1)
    elif kind == "memory" and bptt_segments is not None and backward:
        window = bptt_segments * T
        state, pieces, total = None, [], torch.zeros((), device=ids.device)
        n_answers = int((batch.targets != IGNORE_INDEX).sum())
        for s in range(0, ids.shape[1], window):
            out = model(ids[:, s : s + window], state)
            tgt = batch.targets[:, s : s + window]
            part = F.cross_entropy(
                out.logits.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            if n_answers:
                (part / n_answers).backward()
            total = total + part.detach()
            pieces.append(out.logits.detach())
            state = out.state.detach()  # truncated BPTT: the next window starts a new graph
        return torch.cat(pieces, dim=1), total / max(n_answers, 1)
    elif kind == "memory":
        logits = model(ids).logits
    else:
        raise ValueError(f"unknown model kind {kind!r}: expected one of {MODEL_KINDS}")
    if not backward:
        return logits, None
    loss = _loss(logits, batch.targets)
    loss.backward()
    return logits.detach(), loss.detach()


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
    """

    def __init__(self, model: MemGPTModel, kind: str, task_name: str, task_kwargs: dict, cfg: TrainConfig) -> None:
        if kind not in MODEL_KINDS:
            raise ValueError(f"unknown model kind {kind!r}: expected one of {MODEL_KINDS}")
        self.model, self.kind, self.cfg = model, kind, cfg
        self.task_name, self.task_kwargs = task_name, dict(task_kwargs)
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.data_rng = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.history: list[dict] = []
        # Text has no per-batch settings and reads its files once: build it once, not per batch.
        self.fixed_task = make_task(task_name, **task_kwargs) if task_name == "text" else None

    def next_batch(self) -> TaskBatch:
        g = self.data_rng
        if self.fixed_task is not None:
            return self.fixed_task.sample(self.cfg.batch_size, g).to(self.device)
        kw = dict(self.task_kwargs)
        kw["distance"] = self.cfg.distances[int(torch.randint(len(self.cfg.distances), (1,), generator=g))]
        if self.task_name == "recall":
            kw["num_pairs"] = self.cfg.num_pairs[int(torch.randint(len(self.cfg.num_pairs), (1,), generator=g))]
        return make_task(self.task_name, **kw).sample(self.cfg.batch_size, g).to(self.device)

    def train_step(self) -> dict:
        cfg, model = self.cfg, self.model
        model.train()
        batch = self.next_batch()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
            logits, loss = run_model(model, self.kind, batch, bptt_segments=cfg.bptt_segments, backward=True)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        correct, total = answer_accuracy(logits, batch.targets)
        return {"step": self.step, "loss": float(loss), "acc": correct / max(total, 1), "tokens": batch.input_ids.numel()}

    def fit(
        self, *, until: int | None = None, checkpoint: str | Path | None = None, progress: bool = True
    ) -> list[dict]:
        """Train from the current step up to ``until`` (default ``cfg.steps``, which also sets the
        learning-rate schedule); returns the per-step records."""
        until = self.cfg.steps if until is None else min(until, self.cfg.steps)
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
    def load(cls, path: str | Path, *, device: str = "auto") -> "Trainer":
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
    model: MemGPTModel, kind: str, task: RecallTask | PasskeyTask, *, batches: int, batch_size: int, seed: int,
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
