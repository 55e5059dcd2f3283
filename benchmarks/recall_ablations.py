"""Which design choices make the memory learn segmented recall: each default against its alternative.

Trains the demo's memory model (``memgpt.apps.demo.DemoConfig``) once per variant, same data and
budget, and prints held-out accuracy (4 pairs) at distances 2 and 8 halfway through training and
at its end: the first pair says how fast it learns, the second where it gets. One change per
row, everything else at the demo's defaults:

    default             token shift, gated scores, fusion bias -3, 4 memory heads, fan-in init
    no token shift      token_shift=False
    seed scores         gated_scores=False (the seed's softmax(q . g k))
    fusion bias 0       fusion_bias_init=0.0 (an even mix at initialisation)
    1 memory head       memory_heads=1
    GPT-2 init          every linear map N(0, 0.02) instead of N(0, 1/fan_in)

    python benchmarks/recall_ablations.py             # 400 steps per variant (~8 min on 2 cores)
    python benchmarks/recall_ablations.py --quick     # a few steps: checks the script runs
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from torch import nn

from memgpt.apps.demo import DemoConfig, build_model
from memgpt.training.trainer import Trainer, evaluate

VARIANTS = {
    "default": {},
    "no token shift": {"token_shift": False},
    "seed scores": {"gated_scores": False},
    "fusion bias 0": {"fusion_bias_init": 0.0},
    "1 memory head": {"memory_heads": 1},
    "GPT-2 init": {"init": "gpt2"},
}


def build(demo: DemoConfig, vocab: int, change: dict):
    change = dict(change)
    init = change.pop("init", None)
    model = build_model("memory", demo, vocab)
    if change:
        config = dataclasses.replace(model.config, **change)
        model = type(model)(config)
    if init == "gpt2":
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and "fusion" not in name and module.weight is not model.token_emb.weight:
                nn.init.normal_(module.weight, std=0.02)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    demo = DemoConfig()
    demo.train.device = "cpu"
    demo.train.seed = args.seed
    demo.train.steps = 3 if args.quick else args.steps
    demo.train.log_every = 10**9
    batches, batch_size = (1, 8) if args.quick else (4, 128)
    task_kwargs = {k: getattr(demo, k) for k in ("num_keys", "num_values", "num_filler", "segment_len")}
    vocab = demo.task(1, 1).vocab_size
    steps, half = demo.train.steps, demo.train.steps // 2
    print(f"{steps} steps, batch {demo.train.batch_size}, seed {args.seed}; held-out accuracy, 4 pairs, chance 0.062")
    print(
        f"{'variant':<16} {f'd=2 @{half}':>9} {f'd=8 @{half}':>9} {f'd=2 @{steps}':>9} {f'd=8 @{steps}':>9} {'seconds':>8}"
    )

    def accuracy(model) -> list[float]:
        return [
            evaluate(model, "memory", demo.task(d, 4), batches=batches, batch_size=batch_size, seed=demo.eval_seed)
            for d in (2, 8)
        ]

    for name, change in VARIANTS.items():
        torch.manual_seed(args.seed)
        model = build(demo, vocab, change)
        trainer = Trainer(model, "memory", "recall", task_kwargs, demo.train)
        t0 = time.perf_counter()
        trainer.fit(until=half, progress=False)  # the schedule spans all steps
        mid = accuracy(model)
        trainer.fit(progress=False)
        seconds = time.perf_counter() - t0
        end = accuracy(model)
        row = "".join(f"{a:>10.3f}" for a in mid + end)
        print(f"{name:<16}{row} {seconds:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
