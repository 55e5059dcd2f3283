"""The trainer: the loss falls, checkpoints resume bit-identically, the ablation empties memory."""

from __future__ import annotations

import json

import pytest
import torch

from memgpt import MemGPTConfig, MemGPTModel
from memgpt.apps.cli import main
from memgpt.tasks import RecallTask
from memgpt.training.trainer import TrainConfig, Trainer, evaluate, lr_at, run_model

TASK = dict(num_keys=8, num_values=8, num_filler=8, segment_len=8)


def tiny_model(kind: str = "memory", seed: int = 0) -> MemGPTModel:
    torch.manual_seed(seed)
    seg = 8 if kind != "oracle" else 32
    return MemGPTModel(MemGPTConfig(vocab_size=24, dim=32, depth=1, heads=2, segment_len=seg, memory_capacity=32))


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(steps=30, batch_size=8, lr=3e-3, warmup_steps=5, distances=(1, 2), num_pairs=(2,), device="cpu")
    return TrainConfig(**(base | kw))


@pytest.mark.parametrize("kind", ["memory", "baseline", "oracle"])
def test_loss_falls(kind):
    trainer = Trainer(tiny_model(kind), kind, "recall", TASK, tiny_cfg())
    history = trainer.fit(progress=False)
    first = sum(r["loss"] for r in history[:5]) / 5
    last = sum(r["loss"] for r in history[-5:]) / 5
    assert last < first - 0.3, (first, last)


def test_truncated_bptt_trains_and_detaches():
    trainer = Trainer(tiny_model(), "memory", "recall", TASK, tiny_cfg(steps=12, bptt_segments=1))
    history = trainer.fit(progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)


@pytest.mark.parametrize("bptt_segments", [None, 2])
def test_inplace_memory_trains_like_the_copying_writes(bptt_segments):
    """Logged in-place writes give the same steps (up to fp32 rounding: fused vs math read kernel)."""
    runs = []
    for inplace in (False, True):
        trainer = Trainer(
            tiny_model(),
            "memory",
            "recall",
            TASK,
            tiny_cfg(steps=4, bptt_segments=bptt_segments, inplace_memory=inplace),
        )
        runs.append((trainer.fit(progress=False), trainer.model.state_dict()))
    (hist_a, params_a), (hist_b, params_b) = runs
    for a, b in zip(hist_a, hist_b, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    for name in params_a:
        torch.testing.assert_close(params_b[name], params_a[name], rtol=1e-3, atol=1e-4)


def test_task_loss_checks_inplace_memory():
    from memgpt.training.trainer import TaskLoss

    with pytest.raises(TypeError, match="inplace_memory must be a bool, got str"):
        TaskLoss(tiny_model(), "memory", inplace_memory="yes")


def test_resume_is_bit_identical(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    a = Trainer(tiny_model(), "memory", "recall", TASK, tiny_cfg(steps=6))
    a.fit(progress=False)
    a.save(ckpt)
    a.cfg.steps = 12
    rest_a = [r["loss"] for r in a.fit(progress=False)[6:]]
    b = Trainer.load(ckpt, device="cpu")
    assert b.step == 6
    b.cfg.steps = 12
    rest_b = [r["loss"] for r in b.fit(progress=False)]
    assert rest_a == rest_b
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable memgpt checkpoint"):
        Trainer.load(bad)


def test_ablation_clears_memory_only():
    model = tiny_model()
    out = model(torch.randint(0, 24, (2, 20)))
    cleared = out.state.clear_memory()
    for before, after in zip(out.state.layers, cleared.layers):
        assert not after.memory.valid.any() and after.memory.count.eq(0).all()
        assert after.buffer is before.buffer
    assert torch.equal(cleared.position, out.state.position) and torch.equal(cleared.previous, out.state.previous)


def test_ablated_and_baseline_runs_see_no_earlier_segment():
    """Changing the pairs segment never changes the ablated or the baseline answers."""
    model = tiny_model().eval()
    task = RecallTask(num_pairs=2, distance=2, **TASK)
    batch = task.sample(4, torch.Generator().manual_seed(0))
    other = task.sample(4, torch.Generator().manual_seed(0))
    other.input_ids[:, :8] = torch.randint(0, 24, (4, 8))
    q0 = 16
    with torch.no_grad():
        for kw in (dict(kind="memory", ablate=True), dict(kind="baseline")):
            a, _ = run_model(model, batch=batch, **kw)
            b, _ = run_model(model, batch=other, **kw)
            torch.testing.assert_close(a[:, q0:], b[:, q0:], rtol=0, atol=0)
        a, _ = run_model(model, "memory", batch)
        b, _ = run_model(model, "memory", other)
        assert not torch.equal(a[:, q0:], b[:, q0:])  # the memory model does see it


def test_schedule_warms_up_then_decays():
    cfg = tiny_cfg(steps=100, warmup_steps=10, lr=1.0)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3) and lr_at(50, cfg) < 1.0


def test_evaluate_is_deterministic():
    model, task = tiny_model(), RecallTask(num_pairs=2, distance=1, **TASK)
    a = evaluate(model, "memory", task, batches=2, batch_size=8, seed=3)
    assert a == evaluate(model, "memory", task, batches=2, batch_size=8, seed=3)


def test_cli_demo_quick_writes_results(tmp_path, capsys):
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["accuracy_by_distance"]) == {"memory", "baseline", "oracle", "ablation"}
    assert "Held-out accuracy" in capsys.readouterr().out


def test_cli_train_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "3", "--out", str(out), "--dim", "16", "--depth", "1", "--distances", "1"]) == 0
    ckpt = out / "recall-memory.pt"
    assert ckpt.exists()
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--distances", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 3 and set(report["accuracy_by_distance"]["1"]) == {"memory", "ablation"}


def test_fit_until_pauses_without_changing_the_run():
    """Stopping at ``until`` and continuing gives exactly the uninterrupted run (same schedule)."""
    whole = Trainer(tiny_model(), "memory", "recall", TASK, tiny_cfg(steps=8)).fit(progress=False)
    paused = Trainer(tiny_model(), "memory", "recall", TASK, tiny_cfg(steps=8))
    assert len(paused.fit(until=3, progress=False)) == 3
    assert [r["loss"] for r in paused.fit(progress=False)] == [r["loss"] for r in whole]
