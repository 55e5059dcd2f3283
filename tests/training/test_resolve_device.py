"""resolve_device: a CUDA device the machine lacks is one RuntimeError naming the cause (issue #18),
not torch's AssertionError from deep inside the first ``.to(device)``."""

from __future__ import annotations

import pytest
import torch

from memgpt.apps.demo import DemoConfig, run_demo
from memgpt.training.trainer import resolve_device


def test_auto_and_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")


def test_cuda_without_cuda_names_the_cause(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    want = r"^device 'cuda' asked for, but torch.cuda.is_available\(\) is False \(torch .*\): use 'cpu' or 'auto'$"
    with pytest.raises(RuntimeError, match=want):
        resolve_device("cuda")
    demo = DemoConfig()
    demo.train.device = "cuda"
    with pytest.raises(RuntimeError, match=want):  # the library entry point, before any model is built
        run_demo(demo, tmp_path / "out", progress=False)


def test_cuda_index_beyond_the_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(RuntimeError, match=r"^device 'cuda:2' asked for, but this machine has 2 CUDA device\(s\)$"):
        resolve_device("cuda:2")
