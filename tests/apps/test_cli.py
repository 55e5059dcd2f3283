"""The command line's errors name the real cause (issue #18), and ``eval`` scores text checkpoints.

- ``--device cuda`` without CUDA: argparse's usage and one line naming the device and
  ``torch.cuda.is_available()``, exit status 2, before anything is built;
- ``eval`` on a checkpoint of the ``text`` command: the bits per character that command reports
  for the same model and evaluation settings (it used to fail on a ``distance`` argument);
- ``eval`` on a missing or foreign file, or with flags of the other kind of checkpoint: one line.
"""

from __future__ import annotations

import json

import pytest
import torch

from memgpt import MemGPTConfig, MemGPTModel
from memgpt.apps.cli import main, parse_args
from memgpt.apps.text import TextConfig, run_text
from memgpt.training.trainer import TrainConfig, Trainer, resolve_device

# ------------------------------------------------------------------------------ --device


def no_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def one_line_exit(argv: list[str], capsys) -> str:
    """Run the command line; it must exit with status 2 and end in one line: that line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: memgpt") and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize("command", ["demo", "text", "train", "eval"])
def test_cuda_without_cuda_is_a_usage_error(command, monkeypatch, capsys, tmp_path):
    no_cuda(monkeypatch)
    argv = [command, "--device", "cuda", "--out", str(tmp_path)] if command != "eval" else [command, "x.pt"]
    if command == "eval":
        argv += ["--device", "cuda"]
    if command == "demo":
        argv.append("--quick")
    line = one_line_exit(argv, capsys)
    assert line.startswith(f"memgpt {command}: error: argument --device: device 'cuda' asked for, but ")
    assert "torch.cuda.is_available() is False" in line and line.endswith("use 'cpu' or 'auto'")
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_cuda_index_beyond_the_devices(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    line = one_line_exit(["demo", "--device", "cuda:1"], capsys)
    assert line.endswith("argument --device: device 'cuda:1' asked for, but this machine has 1 CUDA device(s)")
    assert parse_args(["demo", "--device", "cuda:0"]).device == "cuda:0"  # there, it parses


def test_not_a_device_is_a_usage_error(capsys):
    line = one_line_exit(["demo", "--device", "gpu"], capsys)
    assert line.endswith("argument --device: expected auto, cpu, cuda, cuda:N, ... (a torch device), got 'gpu'")


def test_usable_devices_parse_as_given(monkeypatch):
    no_cuda(monkeypatch)
    assert parse_args(["demo"]).device == "auto" and parse_args(["demo", "--device", "cpu"]).device == "cpu"
    assert resolve_device("auto") == torch.device("cpu")


# ------------------------------------------------------------------------------ eval


def tiny_tree(root) -> str:
    """Five files: m0, m1, m3 land in the train split, m6 and m13 in test (by the hash of their
    path); two test files, as the copy probe needs."""
    lines = "".join(
        f"def handler_{i % 7}(request, value):\n    return request.send(value + {i % 5})\n" for i in range(60)
    )
    root.mkdir()
    for name in ("m0.py", "m1.py", "m3.py", "m6.py", "m13.py"):
        (root / name).write_text(lines)
    return str(root)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """The ``text`` command's own run (2 steps per model) and its results: what eval must reproduce."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("text")
    cfg = TextConfig(
        segment_len=8,
        segments=3,
        dim=16,
        depth=1,
        heads=2,
        memory_heads=2,
        memory_capacity=32,
        root=tiny_tree(tmp / "lib"),
        eval_max_chars=300,
        eval_files=1,
        train=TrainConfig(steps=2, batch_size=2, warmup_steps=1, device="cpu", log_every=100),
    )
    return tmp / "out", run_text(cfg, tmp / "out", progress=False)


@pytest.mark.parametrize("kind", ["memory", "baseline"])
def test_eval_scores_a_text_checkpoint_as_the_text_command_does(kind, text_run, capsys):
    out, results = text_run
    ckpt = out / f"text-{kind}.pt"
    assert main(["eval", str(ckpt), "--eval-max-chars", "300", "--eval-files", "1", "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["task"], got["kind"], got["step"], got["eval_split"], got["files"]) == ("text", kind, 2, "test", 1)
    assert got["characters"] == results["characters"]
    want = {k: v for k, v in results[kind].items() if k != "eval_seconds"}
    assert set(got["bits_per_character"]) == set(want)
    for name, value in want.items():
        assert got["bits_per_character"][name] == pytest.approx(value, abs=1e-5), name


def test_eval_refuses_distances_on_a_text_checkpoint(text_run):
    out, _ = text_run
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(out / "text-memory.pt"), "--distances", "1,2"])
    assert str(exc.value) == (
        f"memgpt eval: {out / 'text-memory.pt'} is a character-LM checkpoint (task 'text'), scored in bits per "
        "character; --distances is for recall and passkey checkpoints only"
    )


def test_eval_refuses_text_flags_on_a_recall_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = MemGPTModel(MemGPTConfig(vocab_size=24, dim=16, depth=1, heads=2, segment_len=8, memory_capacity=16))
    task = dict(num_keys=8, num_values=8, num_filler=8, segment_len=8)
    Trainer(model, "memory", "recall", task, TrainConfig(steps=0, device="cpu")).save(tmp_path / "r.pt")
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tmp_path / "r.pt"), "--eval-split", "validation", "--eval-files", "2"])
    assert str(exc.value) == (
        f"memgpt eval: --eval-split, --eval-files: for text checkpoints only; {tmp_path / 'r.pt'} was trained on "
        "task 'recall' (scored by --distances)"
    )


def test_eval_of_a_missing_or_foreign_file_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tmp_path / "nope.pt")])
    assert str(exc.value) == f"memgpt eval: [Errno 2] No such file or directory: '{tmp_path / 'nope.pt'}'"
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tmp_path / "plain.pt")])
    assert str(exc.value) == f"memgpt eval: {str(tmp_path / 'plain.pt')!r} is not a memgpt checkpoint"
