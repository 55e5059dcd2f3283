"""memory_stats: fill level, evictions, ages and strengths read from a store's metadata."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from memgpt.memory import MemoryState, memory_stats, write
from memgpt.memory.reference import write as write_ref

B, H, DK, DV = 2, 3, 4, 5


def written(capacity: int, sizes: list[int], eviction: str = "fifo", *, device="cpu", seed: int = 0, reference=False):
    """A store after writes of ``sizes`` tokens each; returns it and the gates (b h total) in order."""
    gen = torch.Generator().manual_seed(seed)
    state = MemoryState.empty(B, H, capacity, DK, DV, device=device)
    gates = []
    for n in sizes:
        k = torch.randn(B, H, n, DK, generator=gen).to(device)
        v = torch.randn(B, H, n, DV, generator=gen).to(device)
        g = torch.rand(B, H, n, generator=gen).to(device) * 0.98 + 0.01
        state = (write_ref if reference else write)(state, k, v, g, eviction=eviction)
        gates.append(g)
    return state, torch.cat(gates, dim=2) if gates else torch.zeros(B, H, 0, device=device)


def test_empty_store(device):
    s = memory_stats(MemoryState.empty(B, H, 6, DK, DV, device=device))
    assert s.capacity == 6 and s.writes.tolist() == [0, 0]
    for name in ("stored", "evictions", "age_min", "age_max"):
        assert getattr(s, name).shape == (B, H) and not getattr(s, name).any(), name
    assert not s.fill.any() and not s.age_mean.any() and not s.strength_mean.any()
    assert s.age.shape == (B, H, 6) and bool((s.age == -1).all())
    assert not s.strength.any()


@given(capacity=st.integers(1, 7), sizes=st.lists(st.integers(0, 9), max_size=4))
def test_fifo_fill_evictions_and_ages(capacity, sizes):
    state, g = written(capacity, sizes)
    k = sum(sizes)
    s = memory_stats(state)
    kept = min(k, capacity)
    assert s.writes.tolist() == [k] * B
    assert s.stored.tolist() == [[kept] * H] * B
    torch.testing.assert_close(s.fill, torch.full((B, H), kept / capacity))
    assert s.evictions.tolist() == [[max(0, k - capacity)] * H] * B
    # A ring buffer holds the last `kept` tokens: ages 0 .. kept-1, each once.
    ages = s.age.sort(dim=-1).values
    expected = torch.cat([torch.full((capacity - kept,), -1), torch.arange(kept)]).expand(B, H, capacity)
    assert torch.equal(ages, expected)
    if kept:
        assert s.age_min.tolist() == [[0] * H] * B and s.age_max.tolist() == [[kept - 1] * H] * B
        torch.testing.assert_close(s.age_mean, torch.full((B, H), (kept - 1) / 2))
        last = g[..., k - kept :]  # the strengths of the stored tokens
        torch.testing.assert_close(s.strength_mean, last.mean(-1))
        torch.testing.assert_close(s.strength_min, last.amin(-1))
        torch.testing.assert_close(s.strength_max, last.amax(-1))


@pytest.mark.parametrize("eviction", ["strength", "usage"])
@given(capacity=st.integers(1, 6), sizes=st.lists(st.integers(1, 8), min_size=1, max_size=3))
def test_priority_policies_agree_with_the_reference(eviction, capacity, sizes):
    """Ages and strengths of the stored slots, and the eviction count, match the token-by-token twin."""
    fast, _ = written(capacity, sizes, eviction)
    ref, _ = written(capacity, sizes, eviction, reference=True)
    a, r = memory_stats(fast), memory_stats(ref)
    k = sum(sizes)
    assert a.evictions.tolist() == [[max(0, k - capacity)] * H] * B
    for name in ("stored", "evictions", "age_min", "age_max"):
        assert torch.equal(getattr(a, name), getattr(r, name)), name
    for name in ("age_mean", "strength_mean", "strength_min", "strength_max"):
        torch.testing.assert_close(getattr(a, name), getattr(r, name), msg=name)
    # Slot positions may differ between the two; the sets of (age, strength) may not.
    assert torch.equal(a.age.sort(-1).values, r.age.sort(-1).values)


def test_strength_keeps_the_strongest_and_the_newest():
    """Under `strength` the store keeps the newest token and the m-1 strongest of the others."""
    m = 3
    state = MemoryState.empty(1, 1, m, 2, 2)
    g = torch.tensor([[[0.9, 0.1, 0.8, 0.2, 0.7, 0.05]]])
    state = write(state, torch.randn(1, 1, 6, 2), torch.randn(1, 1, 6, 2), g, eviction="strength")
    s = memory_stats(state)
    assert sorted(s.age[0, 0].tolist()) == [0, 3, 5]  # tokens 5 (newest), 2 (0.8), 0 (0.9)
    assert s.evictions.tolist() == [[3]] and s.strength_min.item() == pytest.approx(0.05)


def test_ages_match_write_steps():
    state, _ = written(5, [3, 4, 2], "strength", seed=3)
    s = memory_stats(state)
    steps = torch.where(state.valid, state.step, torch.full_like(state.step, -1))
    want = torch.where(state.valid, (state.count - 1)[:, None, None] - steps, torch.full_like(steps, -1))
    assert torch.equal(s.age, want)


def test_padding_and_reset_rows_diverge_per_row():
    state = MemoryState.empty(2, 1, 4, 2, 2)
    mask = torch.tensor([[True] * 6, [True, False, True, False, False, False]])
    state = write(state, torch.randn(2, 1, 6, 2), torch.randn(2, 1, 6, 2), torch.rand(2, 1, 6), mask=mask)
    s = memory_stats(state)
    assert s.writes.tolist() == [6, 2] and s.stored.tolist() == [[4], [2]] and s.evictions.tolist() == [[2], [0]]
    assert s.fill.tolist() == [[1.0], [0.5]]
    s = memory_stats(state.reset_rows(torch.tensor([True, False])))
    assert s.writes.tolist() == [0, 2] and s.stored.tolist() == [[0], [2]] and s.evictions.tolist() == [[0], [0]]


def test_no_graph_and_a_snapshot():
    """Stats never carry autograd; the count they report does not move with a later in-place write."""
    state = MemoryState.empty(1, 1, 4, 2, 2)
    g = torch.rand(1, 1, 3, requires_grad=True)
    state = write(state, torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2), g)
    s = memory_stats(state)
    assert not any(t.requires_grad for t in s.to_dict().values() if isinstance(t, torch.Tensor))
    with torch.no_grad():
        later = state.detach().clone()
        stats = memory_stats(later)
        write(later, torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2), torch.rand(1, 1, 1), inplace=True)
    assert stats.writes.tolist() == [3]


def test_bad_input():
    with pytest.raises(TypeError, match="expects a MemoryState, got Tensor"):
        memory_stats(torch.zeros(1))


def test_float64_store_keeps_float64_metadata():
    s = memory_stats(MemoryState.empty(1, 1, 2, 2, 2, dtype=torch.float64))
    assert s.fill.dtype == torch.float64 and s.strength_mean.dtype == torch.float64
