"""DDP on 2 CPU ranks (gloo) against one process on the whole global batch: how close they stay.

Launches itself under ``torchrun --standalone --nproc_per_node 2``; every rank trains the same
tiny recall model with memgpt's Trainer (global batch 8, 4 rows per rank) and saves its
parameters after every step. Then this process trains the same run alone and prints, per run
(memory; memory with one-segment truncated BPTT; baseline), whether the ranks' parameters are
bit-identical at every step, the largest loss difference to the single process (absolute and
relative) and the largest parameter difference.

    python benchmarks/ddp_equivalence.py            # 20 steps per run (about a minute on 2 cores)
    python benchmarks/ddp_equivalence.py --quick    # 2 steps (CI runs this so it never rots)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from memgpt import MemGPTConfig, MemGPTModel
from memgpt.training.distributed import init_from_env, shutdown
from memgpt.training.trainer import TrainConfig, Trainer

MODEL = dict(vocab_size=24, dim=32, depth=1, heads=2, segment_len=8, memory_capacity=32, memory_heads=2)
TASK = dict(num_keys=8, num_values=8, num_filler=8, segment_len=8)
TRAIN = dict(steps=100, batch_size=8, lr=3e-3, warmup_steps=2, distances=(1, 2), num_pairs=(2,), device="cpu")
RUNS = {"memory": ("memory", None), "memory, BPTT 1 segment": ("memory", 1), "baseline": ("baseline", None)}


def train(kind: str, bptt: int | None, steps: int) -> tuple[list[float], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = MemGPTModel(MemGPTConfig(**MODEL))
    trainer = Trainer(model, kind, "recall", TASK, TrainConfig(**TRAIN, bptt_segments=bptt))
    losses, params = [], []
    for _ in range(steps):
        losses.append(trainer.train_step()["loss"])  # reduced over the ranks under DDP
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return losses, params


def worker(out: str, steps: int) -> None:
    world, _ = init_from_env(torch.device("cpu"))
    for i, (kind, bptt) in enumerate(RUNS.values()):
        losses, params = train(kind, bptt, steps)
        torch.save({"losses": losses, "params": params}, f"{out}/run{i}.rank{world.rank}.pt")
    shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    steps = 2 if args.quick else args.steps
    torch.set_num_threads(1)
    if args.worker:
        return worker(args.worker, steps)
    with tempfile.TemporaryDirectory() as out:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        subprocess.run(
            [*launch, __file__, "--worker", out, "--steps", str(steps)],
            env=os.environ | {"OMP_NUM_THREADS": "1"},
            check=True,
        )
        batch, version = TRAIN["batch_size"], torch.__version__
        print(f"2 ranks (gloo, CPU) vs 1 process, global batch {batch}, {steps} steps, torch {version}")
        print(
            "| run | ranks' parameters bit-identical every step | max abs loss diff | max rel loss diff "
            "| max abs param diff |"
        )
        print("| --- | --- | ---: | ---: | ---: |")
        for i, (name, (kind, bptt)) in enumerate(RUNS.items()):
            ranks = [torch.load(Path(out) / f"run{i}.rank{r}.pt") for r in (0, 1)]
            losses, params = train(kind, bptt, steps)
            same = all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))
            dl = [abs(a - b) for a, b in zip(ranks[0]["losses"], losses)]
            rl = max(d / abs(b) for d, b in zip(dl, losses))
            dp = max(float((a - b).abs().max()) for a, b in zip(ranks[0]["params"], params))
            print(f"| {name} | {'yes' if same else 'NO'} | {max(dl):.1e} | {rl:.1e} | {dp:.1e} |")


if __name__ == "__main__":
    main()
