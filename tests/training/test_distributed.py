"""DDP training (memgpt/training/distributed.py, the Trainer under torchrun), on CPU with gloo.

One ``torchrun --standalone --nproc_per_node 2`` launch of tests/ddp_worker.py trains three
runs (memory; memory with one-segment truncated BPTT; baseline) for a few steps, then the CLI.
Checked against it: the ranks' parameters are identical after every step, their memory states
differ (each rank saw its own rows), and the per-step loss equals a single-process run on the
whole global batch within the float32 tolerance of memgpt.testing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import memgpt.training.trainer
from memgpt import MemGPTConfig, MemGPTModel
from memgpt.tasks import RecallTask
from memgpt.testing import TOLERANCES
from memgpt.training.distributed import World, all_reduce_sum, init_from_env, launched_by_torchrun, world
from memgpt.training.trainer import TaskLoss, TrainConfig, Trainer

WORKER = Path(__file__).with_name("ddp_worker.py")
SPEC = {
    "seed": 0,
    "steps": 3,
    "model": dict(vocab_size=24, dim=32, depth=1, heads=2, segment_len=8, memory_capacity=32, memory_heads=2),
    "task": dict(num_keys=8, num_values=8, num_filler=8, segment_len=8),
    "train": dict(steps=30, batch_size=8, lr=3e-3, warmup_steps=2, distances=[1, 2], num_pairs=[2], device="cpu"),
    "runs": [
        {"name": "memory", "kind": "memory", "bptt_segments": None},
        {"name": "bptt", "kind": "memory", "bptt_segments": 1},
        {"name": "baseline", "kind": "baseline", "bptt_segments": None},
    ],
    "cli": ["--steps", "2", "--dim", "16", "--depth", "1", "--distances", "1", "--batch-size", "4"],
}
F32 = TOLERANCES[torch.float32]


def read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*cmd, str(WORKER), str(out), json.dumps(SPEC)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out, done.stdout


def single_process(run: dict) -> tuple[list[dict], list[torch.Tensor]]:
    """The same run in this process, on the whole global batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(SPEC["seed"])
        model = MemGPTModel(MemGPTConfig(**SPEC["model"]))
        cfg = TrainConfig(**(SPEC["train"] | {"bptt_segments": run["bptt_segments"]}))
        trainer = Trainer(model, run["kind"], "recall", SPEC["task"], cfg)
        records, params = [], []
        for _ in range(SPEC["steps"]):
            records.append(trainer.train_step())
            params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        return records, params
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("run", SPEC["runs"], ids=[r["name"] for r in SPEC["runs"]])
def test_ddp_ranks_agree_and_match_one_process(launched, run):
    out, _ = launched
    ranks = [read(out / f"{run['name']}.rank{r}.safetensors") for r in (0, 1)]
    records = [json.loads((out / f"{run['name']}.rank{r}.json").read_text()) for r in (0, 1)]
    for step in range(SPEC["steps"]):
        assert torch.equal(ranks[0][f"params.{step}"], ranks[1][f"params.{step}"]), f"ranks differ after step {step}"
    assert records[0] == records[1]  # loss and accuracy are reduced over the ranks
    single, single_params = single_process(run)
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in records[0]]), torch.tensor([r["loss"] for r in single]), **F32
    )
    assert [r["acc"] for r in records[0]] == [r["acc"] for r in single]
    for step in range(SPEC["steps"]):  # AdamW from identical weights with gradients equal up to roundoff
        torch.testing.assert_close(ranks[0][f"params.{step}"], single_params[step], **F32)
    if run["kind"] == "memory":  # each rank's model returned the memory of its own rows
        keys = [r["state.layers.0.memory.keys"] for r in ranks]
        assert keys[0].shape == (4, 2, 32, 16) and not torch.equal(keys[0], keys[1])


def test_cli_trains_with_ddp_and_rank_0_writes(launched):
    out, stdout = launched
    assert stdout.count("saved ") == 1  # rank 0 only
    trainer = Trainer.load(out / "cli" / "recall-memory.pt", device="cpu")
    assert trainer.step == 2 and trainer.cfg.batch_size == 4


def test_half_batches_with_the_global_denominator_average_to_the_whole_batch_gradient():
    """What DDP computes, in one process: each half's summed loss over (answers / 2), gradients
    averaged, equals the gradient of the mean loss over the whole batch."""
    torch.manual_seed(0)
    model = MemGPTModel(MemGPTConfig(**SPEC["model"])).double()
    batch = RecallTask(num_pairs=2, distance=2, **SPEC["task"]).sample(6, torch.Generator().manual_seed(1))
    loss = TaskLoss(model, "memory")
    params = list(model.parameters())
    whole = torch.autograd.grad(loss(batch.input_ids, batch.targets, 8)[0], params)
    denominator = int(batch.answer_mask.sum()) / 2
    halves = [
        torch.autograd.grad(loss(batch.input_ids[rows], batch.targets[rows], 8, None, denominator)[0], params)
        for rows in (slice(0, 3), slice(3, 6))
    ]
    for w, a, b in zip(whole, *halves):
        torch.testing.assert_close((a + b) / 2, w, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("kw", [dict(), dict(eviction="usage", top_k=2, token_shift=False, dropout=0.1)])
def test_the_model_has_no_buffers_for_ddp_to_broadcast(kw):
    """DDP broadcasts module buffers from rank 0; memory is a returned value, never a buffer."""
    model = MemGPTModel(MemGPTConfig(**(SPEC["model"] | kw)))
    assert list(model.buffers()) == [] and list(TaskLoss(model, "memory").buffers()) == []


def test_without_torchrun_nothing_is_initialised(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not launched_by_torchrun()
    assert init_from_env(torch.device("cpu")) == (World(0, 1), torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not launched_by_torchrun() and world() == World(0, 1) and world().is_main
    assert all_reduce_sum([1.5, 2.0], torch.device("cpu")) == [1.5, 2.0]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ValueError, match="torchrun sets LOCAL_RANK to a non-negative integer; got 'x'"):
        init_from_env(torch.device("cpu"))


def test_global_batch_is_split_by_rank(monkeypatch):
    model = MemGPTModel(MemGPTConfig(**SPEC["model"]))
    cfg = TrainConfig(**SPEC["train"])
    monkeypatch.setattr(memgpt.training.trainer, "world", lambda: World(0, 3))
    with pytest.raises(ValueError, match="must be divisible by the 3 ranks, got 8"):
        Trainer(model, "memory", "recall", SPEC["task"], cfg)
    monkeypatch.undo()
    trainer = Trainer(model, "memory", "recall", SPEC["task"], cfg)
    batch = trainer.next_batch()
    trainer.world = World(1, 2)  # what rank 1 of 2 takes
    local = trainer.local_rows(batch)
    assert torch.equal(local.input_ids, batch.input_ids[4:]) and torch.equal(local.targets, batch.targets[4:])
