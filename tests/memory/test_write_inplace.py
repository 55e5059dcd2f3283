"""memory.write(..., inplace=True): the same states as the out-of-place write, O(n) rows touched,
and a donated state that refuses to be used again."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from memgpt.memory import EVICTION_POLICIES, USAGE_DECAY, MemoryState, read, read_usage, write

FIELDS = ("keys", "values", "valid", "strength", "step", "usage", "count")


def tokens(b, h, n, dk, dv, *, dtype, device, generator, p_mask):
    keys = torch.randn(b, h, n, dk, dtype=torch.float64, generator=generator).to(device, dtype)
    values = torch.randn(b, h, n, dv, dtype=torch.float64, generator=generator).to(device, dtype)
    strength = torch.sigmoid(2 * torch.randn(b, h, n, generator=generator)).to(device)
    mask = (torch.rand(b, n, generator=generator) < p_mask).to(device)
    return keys, values, strength, mask


def assert_identical(actual: MemoryState, expected: MemoryState) -> None:
    """Bit for bit, slot for slot: both paths compute the same destinations."""
    for name in FIELDS:
        a, e = getattr(actual, name), getattr(expected, name)
        assert a.dtype == e.dtype and torch.equal(a, e), f"{name} differs"


@given(
    b=st.integers(1, 3),
    h=st.integers(1, 2),
    m=st.sampled_from([1, 2, 5, 17]),
    lengths=st.lists(st.sampled_from([0, 1, 2, 6, 17, 40]), min_size=1, max_size=4),
    eviction=st.sampled_from(EVICTION_POLICIES),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_inplace_equals_out_of_place(device, b, h, m, lengths, eviction, dtype, seed):
    """Random write sequences (masks, overflowing writes, usage reads in between)."""
    gen = torch.Generator().manual_seed(seed)
    expected = MemoryState.empty(b, h, m, 3, 2, dtype=dtype, device=device)
    actual = expected.clone()
    with torch.no_grad():
        for n in lengths:
            p = float(torch.rand((), generator=gen))
            k, v, g, mask = tokens(b, h, n, 3, 2, dtype=dtype, device=device, generator=gen, p_mask=p)
            expected = write(expected, k, v, g, mask=mask, eviction=eviction, usage_decay=USAGE_DECAY)
            actual = write(actual, k, v, g, mask=mask, eviction=eviction, usage_decay=USAGE_DECAY, inplace=True)
            assert_identical(actual, expected)
            q = torch.randn(b, h, 2, 3, generator=gen, dtype=torch.float64).to(device, dtype)
            assert torch.equal(read(q, actual), read(q, expected))
            usage = read_usage(q, expected)
            expected = expected.replace(usage=expected.usage + usage)
            actual = actual.replace(usage=actual.usage + usage)


def test_inplace_writes_into_the_given_tensors_and_touches_only_written_rows():
    gen = torch.Generator().manual_seed(0)
    state = MemoryState.empty(2, 2, 64, 4, 4)
    k, v, g, _ = tokens(2, 2, 5, 4, 4, dtype=torch.float32, device="cpu", generator=gen, p_mask=1.0)
    with torch.no_grad():
        state = write(state, k, v, g, inplace=True)  # slots 0..4
        before = state.keys.clone()
        keys_ptr = state.keys.data_ptr()
        new = write(state, k, v, g, inplace=True)  # slots 5..9
    assert new.keys.data_ptr() == keys_ptr  # no copy of the store
    changed = (new.keys != before).any(dim=-1)  # (b h m)
    assert changed[..., 5:10].all() and not changed[..., :5].any() and not changed[..., 10:].any()
    assert new.count.tolist() == [10, 10]


def test_non_contiguous_store_is_made_contiguous_once():
    """A store whose tensors are views (e.g. keys kept as (b m h d) and transposed) is copied once."""
    gen = torch.Generator().manual_seed(1)
    k, v, g, _ = tokens(1, 2, 3, 4, 4, dtype=torch.float32, device="cpu", generator=gen, p_mask=1.0)
    empty = MemoryState.empty(1, 2, 8, 4, 4)
    state = write(empty.replace(keys=torch.zeros(1, 8, 2, 4).transpose(1, 2)), k, v, g)
    state = state.replace(keys=state.keys.transpose(1, 2).contiguous().transpose(1, 2))
    assert not state.keys.is_contiguous()
    expected = write(state, k, v, g)
    with torch.no_grad():
        first = write(state, k, v, g, inplace=True)
        assert first.is_contiguous()
        assert_identical(first, expected)
        ptr = first.keys.data_ptr()
        second = write(first, k, v, g, inplace=True)
    assert second.keys.data_ptr() == ptr  # the second write copies nothing
    assert_identical(second, write(expected, k, v, g))


@pytest.mark.parametrize(
    "use",
    [
        lambda s, q, kv: read(q, s),
        lambda s, q, kv: read_usage(q, s),
        lambda s, q, kv: write(s, *kv),
        lambda s, q, kv: s.replace(),
        lambda s, q, kv: s.detach(),
        lambda s, q, kv: s.to(dtype=torch.float64),
        lambda s, q, kv: s.index_select(torch.tensor([0])),
        lambda s, q, kv: s.to_dict(),
        lambda s, q, kv: s.check_compatible(batch_size=1, heads=1, key_dim=2, value_dim=2),
    ],
    ids=["read", "read_usage", "write", "replace", "detach", "to", "index_select", "to_dict", "check_compatible"],
)
def test_a_donated_state_refuses_to_be_used(use):
    state = MemoryState.empty(1, 1, 4, 2, 2)
    kv = (torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2), torch.rand(1, 1, 3))
    with torch.no_grad():
        new = write(state, *kv, inplace=True)
    with pytest.raises(RuntimeError, match=r"donated to write\(\.\.\., inplace=True\).*use that state instead"):
        use(state, torch.randn(1, 1, 2, 2), kv)
    use(new, torch.randn(1, 1, 2, 2), kv)  # the returned state is live


def test_inplace_under_autograd_is_logged_and_checks_its_flag():
    state = MemoryState.empty(1, 1, 4, 2, 2)
    k = torch.randn(1, 1, 3, 2, requires_grad=True)
    new = write(state, k, k.detach(), torch.rand(1, 1, 3), inplace=True)
    assert new._log is not None and state._donated  # see test_write_logged.py for its gradients
    with torch.no_grad():
        plain = write(MemoryState.empty(1, 1, 4, 2, 2), k, k, torch.rand(1, 1, 3), inplace=True)
    assert plain._log is None  # nothing recorded: a plain in-place write
    with pytest.raises(TypeError, match="inplace must be a bool, got int"):
        write(MemoryState.empty(1, 1, 4, 2, 2), k.detach(), k.detach(), torch.rand(1, 1, 3), inplace=1)


def test_inplace_under_inference_mode():
    gen = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        state = MemoryState.empty(2, 1, 6, 3, 3)
        expected = state.clone()
        for _ in range(4):
            k, v, g, mask = tokens(2, 1, 4, 3, 3, dtype=torch.float32, device="cpu", generator=gen, p_mask=0.8)
            state = write(state, k, v, g, mask=mask, inplace=True)
            expected = write(expected, k, v, g, mask=mask)
        assert_identical(state, expected)


def test_inplace_accepts_permuted_inputs():
    """Writer outputs are often views (b n h d -> b h n d); the in-place path must not assume layout."""
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(2, 5, 3, 4, generator=gen).transpose(1, 2)  # (b h n d), not contiguous
    v = torch.randn(2, 5, 3, 4, generator=gen).transpose(1, 2)
    g = torch.rand(2, 5, 3, generator=gen).transpose(1, 2)
    expected = write(MemoryState.empty(2, 3, 4, 4, 4), k, v, g)
    with torch.no_grad():
        actual = write(MemoryState.empty(2, 3, 4, 4, 4), k, v, g, inplace=True)
    assert_identical(actual, expected)


@pytest.mark.parametrize("eviction", EVICTION_POLICIES)
@pytest.mark.parametrize("m, n, steps", [(8, 3, 6), (8, 8, 3), (5, 1, 12), (16, 5, 2)])
def test_inplace_lockstep_ring_writes_match(eviction, m, n, steps):
    """Rows in lockstep, every token kept: the slice-write path (wrapping around the ring) gives
    the same states as the out-of-place write, bit for bit."""
    gen = torch.Generator().manual_seed(m * 100 + n)
    expected = MemoryState.empty(3, 2, m, 4, 3)
    actual = expected.clone()
    with torch.no_grad():
        for _ in range(steps):
            k, v, g, _ = tokens(3, 2, n, 4, 3, dtype=torch.float32, device="cpu", generator=gen, p_mask=1.0)
            expected = write(expected, k, v, g, eviction=eviction)
            actual = write(actual, k, v, g, eviction=eviction, inplace=True)
            assert_identical(actual, expected)
