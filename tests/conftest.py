"""Shared fixtures: a ``device`` over cpu/cuda, a seeded RNG, and hypothesis profiles.

CUDA tests are the CPU tests parametrised on ``device`` and skipped without a GPU; nothing here
touches the GPU beyond ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Hypothesis tests build their tensors from a drawn seed, so sharing a function-scoped fixture
# (``device``, the seeding below) across examples is safe.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("default", max_examples=25, **_common)
settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **_common)
settings.register_profile("thorough", max_examples=500, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

_CUDA = torch.cuda.is_available()


@pytest.fixture(
    params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _CUDA, reason="CUDA is not available"))]
)
def device(request) -> torch.device:
    """Run the test on every available device."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
