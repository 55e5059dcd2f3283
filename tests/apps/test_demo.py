"""The demo and train commands: the memory flags (parsing, errors) and the quick demo's outputs."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from memgpt.apps.cli import main, parse_args
from memgpt.apps.demo import DemoConfig, build_model, format_table

HAVE_PLOT = importlib.util.find_spec("matplotlib") is not None


# ------------------------------------------------------------------------------ parsing


def test_demo_memory_flags_parse():
    args = parse_args(["demo", "--capacity", "8", "--eviction", "fifo", "--top-k", "4", "--distances", "1,2,16"])
    assert (args.capacity, args.eviction, args.top_k, args.distances) == (8, "fifo", 4, (1, 2, 16))


def test_demo_defaults_are_the_headline():
    args = parse_args(["demo"])
    assert (args.capacity, args.eviction, args.top_k, args.distances) == (32, "strength", None, None)
    demo = DemoConfig()
    assert demo.eval_distances == (1, 2, 4, 8, 16, 32, 64, 128) and demo.contrast_eviction == "fifo"


def test_train_memory_flags_parse():
    args = parse_args(
        ["train", "--capacity", "16", "--eviction", "strength", "--top-k", "0", "--distances", "1", "2,3"]
    )
    assert (args.capacity, args.eviction, args.top_k, args.distances) == (16, "strength", None, (1, 2, 3))
    args = parse_args(["train"])
    assert (args.capacity, args.eviction, args.distances) == (None, "fifo", (1, 2, 3, 4, 5, 6, 7, 8))
    assert parse_args(["eval", "x.pt", "--distances", "1,4", "8"]).distances == (1, 4, 8)


@pytest.mark.parametrize("command", ["demo", "train"])
@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--distances", "1,x"],
            "argument --distances: expected integers >= 1 separated by commas (e.g. 1,2,4), got '1,x'",
        ),
        (
            ["--distances", "0,2"],
            "argument --distances: expected integers >= 1 separated by commas (e.g. 1,2,4), got '0,2'",
        ),
        (["--distances", "1,"], "argument --distances: expected integers >= 1 separated by commas"),
        (["--distances", "2,4,2"], "argument --distances: each distance once, got 2, 4, 2 (repeats [2])"),
        (["--capacity", "0"], "argument --capacity: expected an integer >= 1, got 0"),
        (["--capacity", "many"], "argument --capacity: expected an integer >= 1, got 'many'"),
        (["--top-k", "-1"], "argument --top-k: expected an integer >= 0 (0: read every slot), got -1"),
        (["--eviction", "lru"], "argument --eviction: invalid choice: 'lru'"),
    ],
)
def test_bad_flags_exit_with_one_line(command, flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args([command, *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("memgpt")  # usage, then one line that names the value


# ------------------------------------------------------------------------------ models


def test_build_model_uses_the_memory_settings():
    demo = DemoConfig(memory_capacity=24, eviction="usage", top_k=3)
    model = build_model("memory", demo, 48)
    c = model.config
    assert (c.memory_capacity, c.eviction, c.top_k, c.segment_len) == (24, "usage", 3, 16)
    assert build_model("memory", demo, 48, eviction="fifo").config.eviction == "fifo"
    assert build_model("oracle", demo, 48).config.segment_len == (8 + 1) * 16  # as long as training goes
    assert DemoConfig(memory_capacity=None).capacity == (128 + 1) * 16  # room for the longest evaluation
    with pytest.raises(ValueError, match="eviction must be one of .* got 'lru'"):
        DemoConfig(eviction="lru")
    with pytest.raises(ValueError, match="memory_capacity must be an int >= 1 or None, got 0"):
        DemoConfig(memory_capacity=0)


def test_train_writes_a_checkpoint_with_the_memory_flags(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--steps", "2", "--out", str(out), "--dim", "16", "--depth", "1", "--distances", "1,2"]
    assert main([*argv, "--capacity", "8", "--eviction", "strength", "--top-k", "4"]) == 0
    config = torch.load(out / "recall-memory.pt", weights_only=True)["model_config"]
    assert (config["memory_capacity"], config["eviction"], config["top_k"]) == (8, "strength", 4)
    assert main(argv) == 0  # defaults: room for the longest training sequence, fifo, every slot read
    config = torch.load(out / "recall-memory.pt", weights_only=True)["model_config"]
    assert (config["memory_capacity"], config["eviction"], config["top_k"]) == ((2 + 1) * 16, "fifo", None)


# ------------------------------------------------------------------------------ the quick demo


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--quiet", "--out", str(out), "--distances", "1,10"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_demo_writes_the_tables(quick):
    out, results = quick
    assert set(results["accuracy_by_distance"]) == {"memory", "baseline", "oracle", "ablation"}
    assert list(results["accuracy_by_distance"]["memory"]) == ["1", "10"]
    assert results["accuracy_by_distance"]["oracle"]["10"] is None  # beyond the oracle's one segment
    assert results["memory_capacity"] == 32 and results["eviction"] == "strength"
    contrast = results["contrast"]
    assert contrast["name"] == "memory_fifo" and contrast["eviction"] == "fifo"
    assert list(contrast["accuracy_by_distance"]) == ["1", "10"] and list(contrast["accuracy_by_pairs"]) == ["1", "4"]
    assert set(results["train_seconds"]) == {"memory", "memory_fifo", "baseline", "oracle"}
    assert results["eval_answers_by_distance"] == {"1": 64, "10": 64}


def test_quick_demo_writes_the_introspection(quick):
    out, results = quick
    intro = results["introspection"]
    assert intro["distance"] == 4 and set(intro["models"]) == {"strength", "fifo"}
    for report in intro["models"].values():
        assert report["capacity"] == 32 and len(report["layers"]) == 2
        for layer in report["layers"]:
            for key in (
                "write_gate_pairs",
                "write_gate_filler",
                "write_gate_queries",
                "pair_tokens_stored_at_query",
                "read_weight_on_pair_slots_at_query",
            ):
                assert len(layer[key]) == 4 and all(0 <= v <= 1 for v in layer[key]), key
            store = layer["final_store"]
            assert store["fill"] == [1.0] * 4  # 5 segments of 16 tokens written into 32 slots
            assert store["evictions"] == [5 * 16 - 32] * 4
    # fifo keeps the last 32 tokens: the pairs (segment 0) are gone when the queries (segment 4) read
    assert all(v == 0 for layer in intro["models"]["fifo"]["layers"] for v in layer["pair_tokens_stored_at_query"])


@pytest.mark.skipif(not HAVE_PLOT, reason="matplotlib is not installed")
def test_quick_demo_writes_the_plots(quick):
    out, results = quick
    for name in ("results.json", "recall.png", "write_gate.png", "memory_slots.png"):
        assert (out / name).stat().st_size > 0, name
        assert str(out / name) in results["written"]


def test_format_table_shows_the_headline(quick):
    out, results = quick
    results = json.loads((out / "results.json").read_text())
    table = format_table(results)
    assert "Held-out accuracy" in table and "memory (strength)" in table and "memory (fifo)" in table
    assert "Inside the memory" in table and "oracle (full attn)" in table
    oracle = next(line for line in table.splitlines() if line.startswith("oracle"))
    assert oracle.split()[-1] == "-"  # d = 10 does not fit the oracle


def test_token_kinds_mark_pairs_queries_and_filler():
    from memgpt.apps.demo_probe import KINDS, token_kinds
    from memgpt.tasks import RecallTask

    kinds = token_kinds(RecallTask(num_pairs=2, segment_len=8, distance=2))
    names = [KINDS[k] for k in kinds.tolist()]
    assert names[:5] == ["pair key", "pair value", "pair key", "pair value", "filler"]
    assert names[16:19] == ["query", "query", "filler"] and len(names) == 24
    assert names.count("filler") == 24 - 4 - 2
