"""``memgpt compare``: width matching, the training/evaluation runs, the suite end to end (a few
steps: a pipeline check, the numbers mean nothing) and its command line."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from memgpt.apps.cli import build_parser
from memgpt.apps.compare.cli import config_from_args
from memgpt.apps.compare.contender import Contender, ModelShape, build_matched, check_logits, n_params
from memgpt.apps.compare.ours import OURS
from memgpt.apps.compare.report import format_tables
from memgpt.apps.compare.runner import CompareConfig, eval_run, run_compare, train_run
from memgpt.apps.compare.suite import TASKS, segments_of

SHAPE = ModelShape(vocab_size=48, segment_len=16, dim=32)


def _linear(shape: ModelShape) -> Contender:
    model = nn.Linear(shape.dim, shape.dim)  # dim**2 + dim parameters
    return Contender("linear", model, lambda ids, s: (ids, s), lambda s: s)


def test_build_matched_takes_the_closest_width():
    # multiples of 4: dim 28 -> 812 parameters, dim 32 -> 1056; the target 1000 is nearer 32
    built = build_matched(_linear, SHAPE, 1000)
    assert not isinstance(built, str)
    contender, width = built
    assert (width, n_params(contender.model)) == (32, 1056)
    contender, width = build_matched(_linear, SHAPE, 850)  # type: ignore[misc]
    assert (width, n_params(contender.model)) == (28, 812)


def test_build_matched_passes_on_why_a_contender_cannot_be_built():
    assert build_matched(lambda shape: "peer-x is not installed", SHAPE, 1000) == "peer-x is not installed"


def test_check_logits_names_the_expected_shape():
    ids = torch.zeros(2, 16, dtype=torch.long)
    check_logits("ok", torch.zeros(2, 16, 48), ids, 48)
    with pytest.raises(ValueError, match=r"peer: step must return float logits \(2, 16, 48\), got \(2, 16, 47\)"):
        check_logits("peer", torch.zeros(2, 16, 47), ids, 48)


def test_our_contenders_match_the_reference_width_within_ten_percent():
    target = n_params(OURS["memgpt-strength"](SHAPE).model)
    for name, build in OURS.items():
        built = build_matched(build, SHAPE, target)
        assert not isinstance(built, str), name
        assert abs(n_params(built[0].model) / target - 1) <= 0.10, name


def test_segments_of_a_task_cover_its_sample():
    task = TASKS["recall"].make(3)
    whole = task.sample(2, torch.Generator().manual_seed(5))
    parts = list(segments_of(task, 2, torch.Generator().manual_seed(5)))
    assert len(parts) == 4
    assert torch.equal(torch.cat([ids for ids, _ in parts], dim=1), whole.input_ids)
    assert torch.equal(torch.cat([t for _, t in parts], dim=1), whole.targets)


def _tiny(**kw) -> CompareConfig:
    base = dict(steps=2, batch_size=4, lrs=(1e-3,), val_samples=4, eval_samples=4, eval_batch_size=4, workers=1)
    return CompareConfig(**(base | kw))


def test_a_run_trains_saves_and_is_evaluated_within_its_budget(tmp_path):
    cfg = _tiny()
    ckpt = str(tmp_path / "m.pt")
    run = train_run("recall", "memgpt-fifo", 1e-3, 32, cfg, ckpt)
    assert run["failure"] is None and run["steps"] == 2 and run["params"] > 0
    assert 0 <= run["val_acc"] <= 1 and run["val_loss"] > 0
    out = eval_run("recall", "memgpt-fifo", 32, _tiny(eval_budget_s=0.0), ckpt, (1, 2, 64))
    first, *rest = out["points"]
    assert first["x"] == 1 and 0 <= first["acc"] <= 1 and first["answers"] == 16  # 4 samples x 4 pairs
    assert [p["x"] for p in rest] == [2, 64] and all("would take" in p["skipped"] for p in rest)


def test_compare_end_to_end(tmp_path):
    cfg = _tiny(tasks=("recall",), contenders=("memgpt-strength", "baseline"), lrs=(1e-3, 3e-3), quick=True)
    results = run_compare(cfg, tmp_path)
    res = results["tasks"]["recall"]
    assert {(r["contender"], r["lr"]) for r in res["runs"]} == {
        (n, lr) for n in ("memgpt-strength", "baseline") for lr in (1e-3, 3e-3)
    }
    assert sum(r["best"] for r in res["runs"]) == 2  # one best learning rate per contender
    assert set(res["evals"]) == {"memgpt-strength", "baseline"}
    assert [p["x"] for p in res["evals"]["baseline"]] == list(TASKS["recall"].quick_eval_x)
    json.dumps(results)  # every row is plain JSON
    table = format_tables(results)
    assert "| memgpt-strength | " in table and "| baseline | " in table


def test_unknown_contender_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown contenders \['nope'\]"):
        run_compare(_tiny(contenders=("nope",)), tmp_path)


def test_command_line_flags_are_checked():
    parser = build_parser()
    args = parser.parse_args(["compare", "--tasks", "recall", "--lrs", "1e-3,3e-3", "--quick"])
    cfg = config_from_args(args)
    assert cfg.tasks == ("recall",) and cfg.lrs == (1e-3, 3e-3) and cfg.steps <= 3
    with pytest.raises(SystemExit, match=r"unknown tasks \['nope'\]"):
        config_from_args(parser.parse_args(["compare", "--tasks", "nope"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["compare", "--lrs", "fast"])


def test_a_resumed_compare_keeps_what_the_journal_holds(tmp_path):
    cfg = _tiny(tasks=("recall",), contenders=("baseline",), quick=True)
    first = run_compare(cfg, tmp_path)
    journal = (tmp_path / "journal.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in journal] == ["train", "eval"]
    logged: list[str] = []
    again = run_compare(cfg, tmp_path, log=logged.append, resume=True)
    assert (tmp_path / "journal.jsonl").read_text().splitlines() == journal  # nothing was run again
    assert any("taken from" in line for line in logged)
    assert again["tasks"]["recall"]["evals"] == first["tasks"]["recall"]["evals"]
    fresh = run_compare(cfg, tmp_path)  # without resume the journal starts over
    assert len((tmp_path / "journal.jsonl").read_text().splitlines()) == 2
    assert fresh["tasks"]["recall"]["runs"][0]["val_acc"] == first["tasks"]["recall"]["runs"][0]["val_acc"]
