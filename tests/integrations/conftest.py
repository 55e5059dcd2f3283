"""One intra-op thread for the integration tests: their models are tiny, and on a shared CPU two
spinning OpenMP threads made a MiniLM forward 25x slower than one (1.35 s against 0.05 s,
measured with load average 8 on 2 cores)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
