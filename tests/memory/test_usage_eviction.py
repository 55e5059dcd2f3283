"""What ``eviction="usage"`` promises: it keeps the most read slots, and a new write survives until
it has had a chance to be read (a new slot starts at the row's lower median usage: the fair start).

With a full row of ``m`` slots, ``(m - 1) // 2 + 1`` old slots are at or below the median, so a
write of at most that many tokens evicts only old slots; these tests hold the policy to that.
Before the fair start a new slot began at usage 1 while read slots grew past it, so every new
write was the next victim and the store froze with its first writes (issue #18).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memgpt import MemoryLayer
from memgpt.memory import USAGE_DECAY, MemoryState, read_usage, write

seeds = st.integers(0, 2**31 - 1)


def _tokens(b, h, n, dk, gen, *, keys=None, gate=None):
    k = torch.randn(b, h, n, dk, generator=gen, dtype=torch.float64) if keys is None else keys
    v = torch.randn(b, h, n, 3, generator=gen, dtype=torch.float64)
    g = torch.sigmoid(torch.randn(b, h, n, generator=gen)) if gate is None else torch.full((b, h, n), gate)
    return k, v, g


def _full(b, h, m, dk, gen, *, scale=3.0):
    """A full store with random usage (as if read for a while)."""
    state = MemoryState.empty(b, h, m, dk, 3, dtype=torch.float64)
    state = write(state, *_tokens(b, h, m, dk, gen), eviction="usage")
    return state.replace(usage=scale * torch.rand(b, h, m, generator=gen, dtype=torch.float64))


def _steps(state, bi, hi) -> set[int]:
    return {int(s) for s in state.step[bi, hi][state.valid[bi, hi]]}


@given(b=st.integers(1, 2), h=st.integers(1, 2), m=st.integers(1, 12), data=st.data(), seed=seeds)
def test_a_write_of_up_to_half_the_capacity_is_stored_whole(b, h, m, data, seed):
    gen = torch.Generator().manual_seed(seed)
    state = _full(b, h, m, 2, gen)
    n = data.draw(st.integers(1, (m - 1) // 2 + 1))
    new = write(state, *_tokens(b, h, n, 2, gen), eviction="usage")
    fresh = set(range(m, m + n))
    for bi in range(b):
        for hi in range(h):
            assert fresh <= _steps(new, bi, hi)


@given(m=st.integers(3, 12), data=st.data(), decay=st.sampled_from([0.0, 0.5, USAGE_DECAY, 1.0]), seed=seeds)
def test_two_writes_without_a_read_keep_both(m, data, decay, seed):
    """Nothing read the first write's slots yet: the second write does not evict them."""
    gen = torch.Generator().manual_seed(seed)
    state = _full(1, 1, m, 2, gen)
    room = (m - 1) // 2 + 1
    n1 = data.draw(st.integers(1, room - 1))
    n2 = data.draw(st.integers(1, room - n1))
    state = write(state, *_tokens(1, 1, n1, 2, gen), eviction="usage", usage_decay=decay)
    state = write(state, *_tokens(1, 1, n2, 2, gen), eviction="usage", usage_decay=decay)
    assert set(range(m, m + n1 + n2)) <= _steps(state, 0, 0)


@settings(deadline=None, max_examples=25)
@given(m=st.integers(4, 16), rounds=st.integers(20, 60), decay=st.sampled_from([0.5, USAGE_DECAY, 1.0]), seed=seeds)
def test_the_most_read_slot_stays_and_the_unread_go(m, rounds, decay, seed):
    """Slot A (key e0) is queried every round; slot B (key e1) never. Each round writes 2 tokens
    with keys in the other dimensions. A survives every round; B is gone within m rounds. Every
    gate is 1, so that only the keys decide what is read (a gated read favours strong writes)."""
    gen = torch.Generator().manual_seed(seed)
    dk = 8
    eye = torch.eye(dk, dtype=torch.float64)
    state = MemoryState.empty(1, 1, m, dk, 3, dtype=torch.float64)
    state = write(state, *_tokens(1, 1, 2, dk, gen, keys=eye[:2].view(1, 1, 2, dk), gate=1.0), eviction="usage")
    q = (10.0 * eye[0]).view(1, 1, 1, dk)  # a sharp read of A
    gone_at = None
    for r in range(rounds):
        state = state.replace(usage=state.usage + read_usage(q, state))
        others = torch.zeros(1, 1, 2, dk, dtype=torch.float64)
        others[..., 2:] = torch.randn(1, 1, 2, dk - 2, generator=gen, dtype=torch.float64)
        state = write(state, *_tokens(1, 1, 2, dk, gen, keys=others, gate=1.0), eviction="usage", usage_decay=decay)
        stored = _steps(state, 0, 0)
        assert 0 in stored, f"the most read slot was evicted in round {r}"
        if gone_at is None and 1 not in stored:
            gone_at = r
    assert gone_at is not None and gone_at <= m, f"the never-read slot survived {rounds} rounds (m={m})"


def test_a_streaming_memory_layer_keeps_taking_new_writes():
    """The issue's case: capacity 64, 100 calls of 16 tokens. After every call its 16 tokens are
    stored in every head (before the fair start: 1 slot of 64 held any of the last 160 tokens)."""
    torch.manual_seed(0)
    layer = MemoryLayer(64, heads=4, capacity=64, eviction="usage")
    state = None
    with torch.no_grad():
        for call in range(100):
            _, state = layer(torch.randn(1, 16, 64), state)
            newest = state.valid & (state.step >= 16 * call)
            assert bool((newest.sum(-1) == 16).all()), f"call {call}: {newest.sum(-1).tolist()}"
    recent = (state.valid & (state.step >= 1600 - 160)).sum(-1)
    first = (state.valid & (state.step < 64)).sum(-1)
    assert bool((recent >= 16).all()) and bool((first < 32).all()), (recent.tolist(), first.tolist())
