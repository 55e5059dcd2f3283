"""Real text: a character language model on CPython's own standard library, memory vs baseline.

Trains two identical models on the same windows and budget (``TextWindowTask``: windows of
``segments * segment_len`` characters of the ``train`` split, memory empty at each window start;
by default each window has one chunk of 32-256 characters repeated 128-512 characters further on,
``repeat_prob``, a curriculum for copying through memory that only the memory model can use):

- memory:   one call per window; memory carries the window's earlier segments;
- baseline: one call per segment with a fresh state: nothing crosses a segment boundary;

then measures, in bits per character, on held-out files (``test`` split by default):

- (a) ``overall``: every character of the evaluated files, each file streamed from its first
  character (the memory model in chunks of one window, its state carried; memory empty at each
  file start; the baseline one segment at a time, state dropped);
- (b) ``far_copyable``: the characters whose preceding ``context`` characters last occurred more
  than ``segment_len`` characters back in the same file (:func:`far_copyable_mask`);
- (c) the copy probe ``[A][filler][A]`` (:func:`copy_probe`): bits on the second ``A``, and the
  ablation: the memory model with its memory stores emptied just before the second ``A``.

Writes ``results.json``, ``manifest.json`` (Python version, every file's split and sha256) and
``bpc_by_position.png`` (bpc vs position in file, memory vs baseline).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.config import MemGPTConfig
from ..models.model import MemGPTModel
from ..tasks.base import IGNORE_INDEX
from ..tasks.stdlib_text import CharVocab, StdlibCorpus
from ..tasks.text_windows import copy_probe, far_copyable_mask
from ..training.trainer import TrainConfig, Trainer, resolve_device, run_model
from .report import jsonable, pyplot

__all__ = ["TextConfig", "build_text_model", "stream_bits", "probe_bits", "evaluate_text", "run_text"]

KINDS = ("memory", "baseline")


@dataclass
class TextConfig:
    segment_len: int = 128
    segments: int = 8
    dim: int = 128
    depth: int = 2
    heads: int = 4
    memory_heads: int = 4
    memory_capacity: int = 512
    fusion_bias_init: float = 0.0  # an even mix at the start: most of a character's prediction is local
    qk_norm: bool = True  # cosine-similarity memory reads with a learned scale (MemGPTConfig.qk_norm)
    top_k: int | None = None  # read only the top_k best slots (MemGPTConfig.top_k)
    shift_keys: bool = True  # induction-shaped writes: token t's slot keyed by token t-1 (MemGPTConfig.shift_keys)
    # Training data: this fraction of windows gets one chunk repeated >= 1 segment further on
    # (TextWindowTask.repeat_prob); both models train on the same windows. Evaluation never has it.
    repeat_prob: float = 1.0
    repeat_len: tuple[int, int] = (32, 256)
    repeat_distance: tuple[int, int] | None = None  # None: (segment_len, memory_capacity), what memory can copy from
    context: int = 16  # far-copyable: this many preceding characters
    eval_split: str = "test"
    eval_files: int = 0  # 0 = every file of the split
    eval_max_chars: int = 0  # per file, from its first character; 0 = whole files
    eval_batch_size: int = 16
    probe_count: int = 128
    probe_chunk: int = 256
    probe_filler: int = 256
    eval_seed: int = 1234
    root: str | None = None  # the stdlib tree; None = the running interpreter's
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=600, batch_size=8, lr=3e-3, warmup_steps=50, log_every=25)
    )

    @property
    def task_kwargs(self) -> dict:
        kw = {"segment_len": self.segment_len, "segments": self.segments, "split": "train", "root": self.root}
        if self.repeat_prob:  # only when used: older checkpoints' task_kwargs stay as they were
            kw.update(repeat_prob=self.repeat_prob, repeat_len=tuple(self.repeat_len))
            far = (self.segment_len, self.memory_capacity) if self.repeat_distance is None else self.repeat_distance
            kw["repeat_distance"] = tuple(far)
        return kw


def build_text_model(cfg: TextConfig) -> MemGPTModel:
    """The memory and the baseline model are the same network; only how it is run differs."""
    return MemGPTModel(
        MemGPTConfig(
            vocab_size=CharVocab.size,
            dim=cfg.dim,
            depth=cfg.depth,
            heads=cfg.heads,
            segment_len=cfg.segment_len,
            memory_capacity=cfg.memory_capacity,
            memory_heads=cfg.memory_heads,
            fusion_bias_init=cfg.fusion_bias_init,
            qk_norm=cfg.qk_norm,
            top_k=cfg.top_k,
            shift_keys=cfg.shift_keys,
        )
    )


def _bits(logits: Tensor, targets: Tensor) -> Tensor:
    """logits (... V), targets (...) -> bits (...) = -log2 p(target)."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none").view(
        targets.shape
    ) / math.log(2)


@torch.no_grad()
def stream_bits(
    model: MemGPTModel, kind: str, files: list[Tensor], *, batch_size: int = 16, chunk: int | None = None
) -> list[Tensor]:
    """Per file ``ids (n,)``, the bits (n-1,) of characters 2..n, each predicted from its file's
    start: ``memory`` streams the file ``chunk`` characters (default 8 segments) at a time,
    carrying the state (empty at the file start); ``baseline`` sees each segment alone."""
    model.eval()
    device = next(model.parameters()).device
    T = model.config.segment_len
    if kind == "baseline":
        segs, owners = [], []
        for i, ids in enumerate(files):
            for s in range(0, len(ids) - 1, T):
                segs.append(ids[s : s + T + 1].long())
                owners.append(i)
        pieces: list[list[Tensor]] = [[] for _ in files]
        for b0 in range(0, len(segs), 16 * batch_size):
            group = segs[b0 : b0 + 16 * batch_size]
            ids, mask = _pad([c[:-1] for c in group], T), _pad([torch.ones(len(c) - 1) for c in group], T).bool()
            tgt = _pad([c[1:] for c in group], T)
            bits = _bits(model(ids.to(device), attention_mask=mask.to(device)).logits, tgt.to(device)).cpu()
            for r, c in enumerate(group):
                pieces[owners[b0 + r]].append(bits[r, : len(c) - 1])
        return [torch.cat(p) if p else torch.zeros(0) for p in pieces]
    if kind != "memory":
        raise ValueError(f"unknown kind {kind!r}: expected one of {KINDS}")
    chunk_len = chunk or 8 * T
    out: dict[int, Tensor] = {}
    order = sorted(range(len(files)), key=lambda i: len(files[i]))  # similar lengths share a batch
    for b0 in range(0, len(order), batch_size):
        rows = order[b0 : b0 + batch_size]
        lengths = torch.tensor([len(files[i]) - 1 for i in rows])
        width = int(lengths.max())
        inputs = _pad([files[i][:-1].long() for i in rows], width)
        targets = _pad([files[i][1:].long() for i in rows], width)
        state, row_bits = None, []
        for s in range(0, width, chunk_len):
            cols = torch.arange(s, min(s + chunk_len, width))
            mask = (cols[None, :] < lengths[:, None]).to(device)
            # no_grad and the old state is never used again: let the writes go into it in place
            o = model(inputs[:, cols].to(device), state, attention_mask=mask, donate_state=True)
            state = o.state
            row_bits.append(_bits(o.logits, targets[:, cols].to(device)).cpu())
        bits = torch.cat(row_bits, dim=1)
        for r, i in enumerate(rows):
            out[i] = bits[r, : int(lengths[r])]
    return [out[i] for i in range(len(files))]  # order covers every file


def _pad(rows: list[Tensor], width: int) -> Tensor:
    out = torch.zeros(len(rows), width, dtype=rows[0].dtype)
    for r, x in enumerate(rows):
        out[r, : len(x)] = x
    return out.long() if not out.is_floating_point() else out


@torch.no_grad()
def probe_bits(model: MemGPTModel, kind: str, files: list[Tensor], cfg: TextConfig, *, ablate: bool = False) -> Tensor:
    """Bits (probes, chunk-1) on the second ``A`` of the copy probe (the same probes for every call)."""
    model.eval()
    device = next(model.parameters()).device
    batch = copy_probe(
        files,
        cfg.probe_count,
        chunk_len=cfg.probe_chunk,
        filler_len=cfg.probe_filler,
        segment_len=cfg.segment_len,
        generator=torch.Generator().manual_seed(cfg.eval_seed),
    ).to(device)
    logits, _ = run_model(model, kind, batch, ablate=ablate)
    scored = batch.targets != IGNORE_INDEX
    bits = _bits(logits, batch.targets.clamp_min(0))
    return bits[scored].view(batch.targets.shape[0], -1).cpu()


def position_bins(n: int, first: int) -> list[tuple[int, int]]:
    """[0, first), [first, 2 first), [2 first, 4 first), ... covering positions < n."""
    bins, lo, hi = [(0, first)], first, 2 * first
    while lo < n:
        bins.append((lo, hi))
        lo, hi = hi, 2 * hi
    return bins


def evaluate_text(models: dict[str, MemGPTModel], cfg: TextConfig, corpus: StdlibCorpus) -> dict:
    """The three metrics for each model, the ablation, and bpc by position in file."""
    probe_files = files = [ids for _, ids in corpus.load(cfg.eval_split)]
    names = list(corpus.files[cfg.eval_split])
    if cfg.eval_files:
        files, names = files[: cfg.eval_files], names[: cfg.eval_files]
    if cfg.eval_max_chars:
        files = [f[: cfg.eval_max_chars] for f in files]
    # Targets are characters 2..n of each file; the mask, like the bits, starts at character 2.
    far = torch.cat([far_copyable_mask(f, context=cfg.context, distance=cfg.segment_len)[1:] for f in files])
    pos = torch.cat([torch.arange(1, len(f)) for f in files])
    bins = position_bins(int(pos.max()) + 1, 16)  # doubling bins: fine near the file start
    results: dict = {
        "characters": int(pos.numel()),
        "far_copyable_characters": int(far.sum()),
        "far_copyable_fraction": float(far.float().mean()),
        "files": names,
        "by_position": {},
    }
    results["position_bins"] = [[lo, hi] for lo, hi in bins]
    results["position_bin_characters"] = [int(((pos >= lo) & (pos < hi)).sum()) for lo, hi in bins]
    for kind, model in models.items():
        t0 = time.perf_counter()
        bits = torch.cat(
            stream_bits(model, kind, files, batch_size=cfg.eval_batch_size, chunk=cfg.segments * cfg.segment_len)
        )
        row = {
            "overall": float(bits.mean()),
            "far_copyable": float(bits[far].mean()),
            "not_far_copyable": float(bits[~far].mean()),
            "copy_probe": float(probe_bits(model, kind, probe_files, cfg).mean()),
        }
        if kind == "memory":
            row["copy_probe_ablation"] = float(probe_bits(model, kind, probe_files, cfg, ablate=True).mean())
        row["eval_seconds"] = time.perf_counter() - t0
        results[kind] = row
        results["by_position"][kind] = [
            float(bits[(pos >= lo) & (pos < hi)].mean()) if bool(((pos >= lo) & (pos < hi)).any()) else None
            for lo, hi in bins
        ]
    return results


def train_text_model(cfg: TextConfig, kind: str, out: Path, *, progress: bool = True) -> MemGPTModel:
    """Train ``kind`` from scratch; writes OUT/text-KIND.pt and OUT/train-KIND.json (wall time,
    steps, training bpc every ``log_every`` steps)."""
    torch.manual_seed(cfg.train.seed)
    model = build_text_model(cfg).to(resolve_device(cfg.train.device))
    trainer = Trainer(model, kind, "text", cfg.task_kwargs, cfg.train)
    t0 = time.perf_counter()
    trainer.fit(checkpoint=out / f"text-{kind}.pt", progress=progress)
    seconds = time.perf_counter() - t0
    hist = trainer.history
    tail = hist[-max(1, len(hist) // 10) :]
    record = {
        "kind": kind,
        "steps": trainer.step,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "train_config": jsonable(asdict(cfg.train)),
        "final_train_bpc": sum(r["loss"] for r in tail) / len(tail) / math.log(2),
        "train_bpc": {r["step"]: r["loss"] / math.log(2) for r in hist if r["step"] % cfg.train.log_every == 0},
    }
    (out / f"train-{kind}.json").write_text(json.dumps(record, indent=1))
    return model


def run_text(
    cfg: TextConfig, out_dir: str | Path, *, progress: bool = True, reuse: bool = False, only: str | None = None
) -> dict:
    """Train both models (with ``reuse``, load OUT/text-KIND.pt where present), evaluate, write the
    outputs; returns the results, with ``written`` listing the files. ``only`` trains that one
    model and stops (run the two at once, then ``reuse``), returning ``{"saved": path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    if only is not None:
        if only not in KINDS:
            raise ValueError(f"only must be one of {KINDS}, got {only!r}")
        train_text_model(cfg, only, out, progress=progress)
        return {"saved": str(out / f"text-{only}.pt")}
    corpus = StdlibCorpus.scan(cfg.root)
    manifest = corpus.manifest()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    models, training = {}, {}
    for kind in KINDS:
        ckpt = out / f"text-{kind}.pt"
        if reuse and ckpt.exists():
            models[kind] = Trainer.load(ckpt, device=cfg.train.device).model
        else:
            models[kind] = train_text_model(cfg, kind, out, progress=progress)
        record = out / f"train-{kind}.json"
        training[kind] = (
            {k: v for k, v in json.loads(record.read_text()).items() if k != "train_bpc"} if record.exists() else None
        )
    results = evaluate_text(models, cfg, corpus)
    results.update(
        training=training,
        device=str(device),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        parameters=sum(p.numel() for p in models["memory"].parameters()),
        python=manifest["python"],
        model_config=models["memory"].config.to_dict(),
        config=jsonable(asdict(cfg)),
    )
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot = save_plot(results, out / "bpc_by_position.png")
    results["written"] = [str(out / "results.json"), str(out / "manifest.json")] + ([str(plot)] if plot else [])
    return results


def format_table(r: dict) -> str:
    m, b = r["memory"], r["baseline"]
    lines = [
        f"Bits per character on held-out stdlib files ({r['characters']:,} characters, "
        f"{r['far_copyable_fraction']:.1%} far-copyable); copy probe: second A of [A][filler][A]",
        f"{'':<26}{'memory':>10}{'baseline':>10}{'mem - base':>12}",
    ]
    for key, label in (
        ("overall", "(a) overall"),
        ("far_copyable", "(b) far-copyable"),
        ("not_far_copyable", "    not far-copyable"),
        ("copy_probe", "(c) copy probe"),
    ):
        lines.append(f"{label:<26}{m[key]:>10.3f}{b[key]:>10.3f}{m[key] - b[key]:>+12.3f}")
    lines.append(f"{'    probe, memory cleared':<26}{m['copy_probe_ablation']:>10.3f}")
    lines.append(
        f"\ncopy probe memory / baseline = {m['copy_probe'] / b['copy_probe']:.2f}; "
        f"cleared / baseline = {m['copy_probe_ablation'] / b['copy_probe']:.2f}"
    )
    lines.append(
        "training: "
        + ", ".join(
            f"{k} {t['steps']} steps in {t['seconds']:.0f}s ({t['threads']} threads), final train bpc {t['final_train_bpc']:.3f}"
            if t
            else f"{k}: no training record"
            for k, t in r["training"].items()
        )
    )
    return "\n".join(lines)


def save_plot(r: dict, path: Path) -> Path | None:
    """bpc vs position in file (log scale), memory vs baseline; None if matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return None
    bins = r["position_bins"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style in (("memory", "o-"), ("baseline", "^-")):
        pts = [(math.sqrt(max(lo, 1) * hi), v) for (lo, hi), v in zip(bins, r["by_position"][kind]) if v is not None]
        ax.plot([p for p, _ in pts], [v for _, v in pts], style, label=kind)
    T = r["config"]["segment_len"]
    ax.axvline(T, color="gray", lw=0.8, ls="--", label=f"segment length ({T})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in file (characters, log scale; bins double)")
    ax.set_ylabel("bits per character (held out)")
    ax.set_title("memgpt: character LM on CPython's stdlib")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
