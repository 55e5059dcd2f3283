"""The ``text`` task of ``memgpt compare``: streamed bits per character, the far-copyable split,
learning-rate choice by loss, and its table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memgpt.apps.compare.contender import ModelShape
from memgpt.apps.compare.ours import OURS, full_attention_contender
from memgpt.apps.compare.report import format_tables, plot_results
from memgpt.apps.compare.runner import CompareConfig, _best_lr, eval_run, train_run
from memgpt.apps.compare.suite import TASKS, segments_of
from memgpt.apps.compare.text_task import TEXT_POINTS, text_bits, text_points, windows
from memgpt.tasks.stdlib_text import CharVocab

SHAPE = ModelShape(vocab_size=CharVocab.size, segment_len=16, dim=32)
TINY = CompareConfig(steps=2, batch_size=4, lrs=(1e-3,), val_samples=4, eval_batch_size=4, workers=1, quick=True)


def _files(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(CharVocab.size, (n,), generator=g) for n in lengths)


def test_streamed_bits_of_full_attention_equal_one_call_on_the_whole_file():
    """Streaming one segment at a time, padding a batch's shorter files and the last segment,
    gives every file exactly the bits of the model run once on the whole file."""
    torch.manual_seed(0)
    c = full_attention_contender(SHAPE, max_tokens=256)
    c.model.eval()
    files = _files([200, 37, 129, 2])  # lengths that are not multiples of the segment
    streamed = text_bits(c, files, batch_size=3)
    with torch.no_grad():
        for f, bits in zip(files, streamed):
            logits = c.model(f[None, :-1]).logits[0]
            want = F.cross_entropy(logits, f[1:], reduction="none") / math.log(2)
            assert bits.shape == (len(f) - 1,)
            torch.testing.assert_close(bits, want, atol=1e-4, rtol=1e-4)


def test_streamed_bits_do_not_depend_on_the_batch_a_file_shares():
    torch.manual_seed(1)
    c = OURS["memgpt-strength"](SHAPE)
    c.model.eval()
    files = _files([90, 300, 47])
    together = text_bits(c, files, batch_size=3)
    alone = [text_bits(c, (f,), batch_size=1)[0] for f in files]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_text_points_split_every_character_into_far_copyable_or_not():
    torch.manual_seed(2)
    c = OURS["baseline"](SHAPE)
    c.model.eval()
    points = text_points(c, batch_size=4, quick=True)
    assert [p["x"] for p in points] == list(TEXT_POINTS)
    overall, far, rest = points
    assert overall["characters"] == far["characters"] + rest["characters"] > 0
    assert overall["bpc"] > 0 and rest["bpc"] > 0
    assert math.log2(CharVocab.size) / 2 < overall["bpc"] < 2 * math.log2(CharVocab.size)  # untrained: ~uniform


def test_a_contender_that_cannot_attend_that_far_gets_skipped_points():
    c = full_attention_contender(SHAPE, max_tokens=32)  # quick excerpts are 64 characters
    points = text_points(c, batch_size=4, quick=True)
    assert [p["x"] for p in points] == list(TEXT_POINTS)
    assert all("exceed what it can attend to (32)" in p["skipped"] for p in points)


def test_training_windows_come_from_the_train_split_and_validation_from_its_own():
    task = TASKS["text"]
    train, val = task.make(8), task.make_val(8)  # type: ignore[misc]
    assert train is windows("train") and val is windows("validation")
    assert train.files is not val.files and len(train.files) > len(val.files) > 0
    parts = list(segments_of(train, 2, torch.Generator().manual_seed(0)))
    assert len(parts) == 8 and all(ids.shape == (2, 16) for ids, _ in parts)
    assert all(bool((t >= 0).all()) for _, t in parts)  # a target at every character


def test_the_best_learning_rate_of_a_bpc_task_has_the_lowest_validation_loss():
    runs = [
        dict(lr=1e-3, failure=None, val_acc=0.60, val_loss=1.2),
        dict(lr=3e-3, failure=None, val_acc=0.55, val_loss=1.1),  # less accurate, lower loss
        dict(lr=1e-2, failure="non-finite loss at step 3"),
    ]
    assert _best_lr(runs, "bpc") == 3e-3
    assert _best_lr(runs, "acc") == 1e-3


def test_a_text_run_trains_and_is_evaluated_in_bits_per_character(tmp_path):
    cfg = TINY
    ckpt = str(tmp_path / "m.pt")
    run = train_run("text", "memgpt-fifo", 1e-3, 32, cfg, ckpt)
    assert run["failure"] is None and run["val_loss"] > 0
    out = eval_run("text", "memgpt-fifo", 32, cfg, ckpt, TEXT_POINTS)
    assert [p["x"] for p in out["points"]] == list(TEXT_POINTS) and out["chance"] is None
    assert all(p["peak_rss_mb"] is None or p["peak_rss_mb"] > 0 for p in out["points"])
    results = {
        "tasks": {
            "text": dict(
                x_label="characters",
                eval_x=list(TEXT_POINTS),
                chance=None,
                metric="bpc",
                runs=[run | {"best": True}],
                evals={"memgpt-fifo": out["points"][:1] + [dict(x="far-copyable", bpc=None, characters=0)]},
                unavailable={},
            )
        }
    }
    table = format_tables(results)
    assert "bits per character, lower is better" in table and "val bpc by lr" in table
    row = next(line for line in table.splitlines() if line.startswith("| memgpt-fifo"))
    assert f"{run['val_loss'] / math.log(2):.3f}" in row and f"{out['points'][0]['bpc']:.3f}" in row
    assert "| — |" in row  # no far-copyable characters: a dash, not nan
    assert plot_results(results, tmp_path / "p.png") is False  # bits per character: a table only


@pytest.mark.parametrize("name", ["memgpt-strength", "baseline"])
def test_text_evaluation_is_repeatable(name):
    torch.manual_seed(3)
    c = OURS[name](SHAPE)
    c.model.eval()
    a, b = text_points(c, 4, quick=True), text_points(c, 4, quick=True)
    assert [p["bpc"] for p in a] == [p["bpc"] for p in b]
