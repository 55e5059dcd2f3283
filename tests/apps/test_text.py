"""The stdlib character-LM driver: streaming evaluation, the copy probe's ablation, a tiny run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from memgpt.apps.text import TextConfig, build_text_model, position_bins, probe_bits, run_text, stream_bits
from memgpt.tasks.stdlib_text import CharVocab
from memgpt.tasks.text_windows import copy_probe
from memgpt.testing import assert_close_dtype
from memgpt.training.trainer import TrainConfig

V = CharVocab()


def tiny(**kw) -> TextConfig:
    base = dict(segment_len=8, segments=3, dim=16, depth=1, heads=2, memory_heads=2, memory_capacity=32)
    return TextConfig(**{**base, **kw})


def files() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 98, (n,), generator=g, dtype=torch.uint8) for n in (50, 17, 33, 9)]


def bits_alone(model, ids: torch.Tensor, state=None) -> tuple[torch.Tensor, object]:
    out = model(ids[None, :-1].long(), state)
    return F.cross_entropy(out.logits[0], ids[1:].long(), reduction="none") / math.log(2), out.state


def test_memory_stream_is_the_whole_file_in_one_call_whatever_the_chunk():
    model = build_text_model(tiny()).eval()
    fs = files()
    with torch.no_grad():
        want = [bits_alone(model, f)[0] for f in fs]
    for chunk, batch_size in ((24, 16), (7, 2), (1000, 3)):
        got = stream_bits(model, "memory", fs, batch_size=batch_size, chunk=chunk)
        for g, w in zip(got, want):
            assert_close_dtype(g, w)


def test_baseline_stream_sees_each_segment_alone():
    model = build_text_model(tiny()).eval()
    fs = files()
    got = stream_bits(model, "baseline", fs, batch_size=1)
    with torch.no_grad():
        for g, f in zip(got, fs):
            want = torch.cat([bits_alone(model, f[s : s + 9])[0] for s in range(0, len(f) - 1, 8)])
            assert g.shape == (len(f) - 1,)
            assert_close_dtype(g, want)


def test_probe_ablation_empties_memory_before_the_second_chunk():
    cfg = tiny(probe_count=3, probe_chunk=16, probe_filler=16)
    model = build_text_model(cfg).eval()
    fs = [torch.randint(0, 98, (80,), dtype=torch.uint8) for _ in range(3)]
    batch = copy_probe(fs, 3, chunk_len=16, filler_len=16, segment_len=8, generator=torch.Generator().manual_seed(1234))
    q0 = 32
    with torch.no_grad():
        state = model(batch.input_ids[:, :q0]).state
        kept = model(batch.input_ids[:, q0:-1], state).logits
        cleared = model(batch.input_ids[:, q0:-1], state.clear_memory()).logits
    tgt = batch.input_ids[:, q0 + 1 :]

    def mean_bits(logits):
        return F.cross_entropy(logits.transpose(1, 2), tgt, reduction="none") / math.log(2)

    assert_close_dtype(probe_bits(model, "memory", fs, cfg), mean_bits(kept))
    assert_close_dtype(probe_bits(model, "memory", fs, cfg, ablate=True), mean_bits(cleared))
    assert not torch.allclose(mean_bits(kept), mean_bits(cleared))  # the memory is read


def test_position_bins():
    assert position_bins(1000, 128) == [(0, 128), (128, 256), (256, 512), (512, 1024)]
    assert position_bins(100, 128) == [(0, 128)]


def test_tiny_training_run(tmp_path):
    """Train both models a few steps on a small repetitive tree: the pipeline runs end to end,
    training lowers the loss, and every output is written."""
    torch.set_num_threads(1)
    lines = "".join(
        f"def handler_{i % 7}(request, value):\n    return request.send(value + {i % 5})\n" for i in range(60)
    )
    for name in ("a.py", "b.py", "c.py", "d.py", "e.py", "f.py", "g.py"):  # a,c,e,f,g train; b test; ...
        (tmp_path / "lib" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "lib" / name).write_text(lines)
    cfg = tiny(
        root=str(tmp_path / "lib"),
        eval_max_chars=600,
        probe_count=2,
        probe_chunk=16,
        probe_filler=16,
        train=TrainConfig(steps=40, batch_size=4, lr=1e-2, warmup_steps=5, device="cpu", log_every=100),
    )
    cfg.eval_split = "train"  # the tiny tree has one test file; the probe needs two
    r = run_text(cfg, tmp_path / "out", progress=False)
    for kind in ("memory", "baseline"):
        assert r["training"][kind]["steps"] == 40
        assert r[kind]["overall"] < math.log2(98)  # better than uniform after training
        assert r["training"][kind]["final_train_bpc"] < math.log2(98) - 1.5  # uniform is 6.6 bits
    assert set(r["memory"]) >= {"overall", "far_copyable", "copy_probe", "copy_probe_ablation"}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["memory"] == pytest.approx(r["memory"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["files"]) == 7
    assert (tmp_path / "out" / "text-memory.pt").exists() and (tmp_path / "out" / "text-baseline.pt").exists()
    again = run_text(cfg, tmp_path / "out", progress=False, reuse=True)  # evaluates the saved models
    assert again["memory"]["overall"] == pytest.approx(r["memory"]["overall"], abs=1e-5)


def test_config_options_reach_the_model_and_the_task(tmp_path):
    """qk_norm and top_k build the memory readers; repeat_prob reaches the training windows (and
    is absent from the task's arguments when off, so older checkpoints' task_kwargs are unchanged)."""
    cfg = tiny(qk_norm=True, top_k=4, shift_keys=True, repeat_prob=0.5, repeat_len=(4, 8))
    model = build_text_model(cfg)
    readers = [b.memory.reader for b in model.blocks]
    assert all(r.qk_norm and r.top_k == 4 for r in readers)
    assert model.config.qk_norm and model.config.top_k == 4 and model.config.shift_keys
    assert cfg.task_kwargs["repeat_prob"] == 0.5 and cfg.task_kwargs["repeat_len"] == (4, 8)
    off = tiny(qk_norm=False, shift_keys=False, repeat_prob=0.0)
    assert "repeat_prob" not in off.task_kwargs and not build_text_model(off).config.qk_norm
    for name in ("a.py", "b.py", "c.py"):
        (tmp_path / name).write_text("".join(f"x_{i} = {i}\n" for i in range(40)))
    from memgpt.training.trainer import make_task

    task = make_task("text", **{**cfg.task_kwargs, "root": str(tmp_path)})
    assert task.repeat_prob == 0.5 and task.repeat_len == (4, 8) and task.repeat_distance == (8, 32)


def test_cli_text_flags():
    from memgpt.apps.cli import build_parser, text_config

    parse = build_parser().parse_args
    default = text_config(parse(["text"]))
    assert default == TextConfig(fusion_bias_init=default.fusion_bias_init)  # no flag: TextConfig's defaults
    cfg = text_config(
        parse(["text", "--no-qk-norm", "--no-shift-keys", "--top-k", "8", "--repeat-prob", "0.25", "--steps", "7"])
    )
    assert (cfg.qk_norm, cfg.shift_keys, cfg.top_k, cfg.repeat_prob, cfg.train.steps) == (False, False, 8, 0.25, 7)
    assert text_config(parse(["text", "--shift-keys"])).shift_keys is True
    assert text_config(parse(["text", "--qk-norm", "--top-k", "0"])).qk_norm is True
    assert text_config(parse(["text", "--top-k", "0"])).top_k is None
