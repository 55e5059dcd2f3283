"""memory.write: fast == reference (state and gradients), gradcheck, eviction properties, errors.

For the ``strength``/``usage`` policies the fast write may put a pair in another slot than the
token-by-token reference; states are compared in canonical slot order (``canonical_memory``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from memgpt.memory import EVICTION_POLICIES, USAGE_DECAY, MemoryState, read, read_usage, write
from memgpt.memory import reference as ref
from memgpt.testing import assert_close_dtype, assert_close_to_ref, canonical_memory

POLICIES = list(EVICTION_POLICIES)
CANON = ("keys", "values", "valid", "strength", "step", "usage", "count")


def tokens(b, h, n, dk, dv, *, dtype=torch.float64, device="cpu", generator=None, p_mask=0.75):
    """Random keys, values, gates g in (0, 1) (float32, like the state's metadata) and a mask."""
    gen = dict(generator=generator)
    keys = torch.randn(b, h, n, dk, dtype=dtype, **gen).to(device)
    values = torch.randn(b, h, n, dv, dtype=dtype, **gen).to(device)
    strength = torch.sigmoid(2 * torch.randn(b, h, n, **gen)).to(device)
    mask = (torch.rand(b, n, **gen) < p_mask).to(device)
    return keys, values, strength, mask


def assert_same_memory(actual: MemoryState, expected: MemoryState) -> None:
    a, e = canonical_memory(actual), canonical_memory(expected)
    for name in CANON:
        assert_close_dtype(a[name], e[name], msg=lambda m, name=name: f"{name}: {m}")


def fill(state, n, *, eviction="fifo", generator=None, p_mask=0.75):
    b, h, _, dk = state.keys.shape
    k, v, g, mask = tokens(
        b, h, n, dk, state.value_dim, dtype=state.dtype, device=state.device, generator=generator, p_mask=p_mask
    )
    return write(state, k, v, g, mask=mask, eviction=eviction)


# ---------------------------------------------------------------------------------- fast == reference

SCENARIOS = {  # (b, h, m, dk, dv, write lengths): capacity 1, awkward sizes, more writes than capacity
    "cap1": (2, 1, 1, 1, 3, [3, 1, 2]),
    "cap3": (3, 2, 3, 3, 1, [1, 5, 2]),
    "cap17": (2, 3, 17, 2, 4, [17, 3, 20]),
}


def write_chain(fn, old, inputs, eviction):
    state = old
    for k, v, g, mask in inputs:
        state = fn(state, k, v, g, mask=mask, eviction=eviction)
    return state


def chain_and_grads(fn, old, inputs, eviction, weights):
    """Final state (canonical) and gradients w.r.t. the old state and every write's inputs."""
    old = old.replace(**{k: getattr(old, k).detach().clone().requires_grad_() for k in ("keys", "values", "strength")})
    inputs = [[t.detach().clone().requires_grad_() for t in tok[:3]] + [tok[3]] for tok in inputs]
    canon = canonical_memory(write_chain(fn, old, inputs, eviction))
    loss = sum((canon[name] * w).sum() for name, w in weights.items())
    leaves = [old.keys, old.values, old.strength] + [t for tok in inputs for t in tok[:3]]
    grads = torch.autograd.grad(loss, leaves, materialize_grads=True)
    return {k: v.detach() for k, v in canon.items()}, list(grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eviction", POLICIES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_write_matches_reference(device, dtype, eviction, scenario):
    b, h, m, dk, dv, lengths = SCENARIOS[scenario]
    old = fill(MemoryState.empty(b, h, m, dk, dv, dtype=dtype, device=device), m - 1 if m > 1 else 1, eviction=eviction)
    inputs = [tokens(b, h, n, dk, dv, dtype=dtype, device=device) for n in lengths]
    inputs[0][3][0] = True  # row 0 writes everything in the first write ...
    inputs[1][3][-1] = False  # ... the last row nothing in the second
    weights = {
        "keys": torch.randn(b, h, m, dk, dtype=torch.float64).to(device, dtype),
        "values": torch.randn(b, h, m, dv, dtype=torch.float64).to(device, dtype),
        "strength": torch.randn(b, h, m, device=device),
    }
    fast, fast_grads = chain_and_grads(write, old, inputs, eviction, weights)
    slow, slow_grads = chain_and_grads(ref.write, old, inputs, eviction, weights)
    names = ["old.keys", "old.values", "old.strength"] + [
        f"w{i}.{x}" for i in range(len(lengths)) for x in ("keys", "values", "strength")
    ]
    if dtype == torch.bfloat16:
        up = lambda t: t.double() if t.is_floating_point() and t.dtype != torch.float32 else t  # noqa: E731
        exact, exact_grads = chain_and_grads(
            ref.write,
            old.to(dtype=torch.float64),
            [[up(t) for t in tok] for tok in inputs],
            eviction,
            {k: up(w) for k, w in weights.items()},
        )
        for name in CANON:
            if fast[name].dtype == dtype:
                assert_close_to_ref(fast[name], slow[name], exact[name], name=name)
            else:  # metadata: the same decisions, exactly
                assert_close_dtype(fast[name], slow[name], msg=name)
        for name, a, r, e in zip(names, fast_grads, slow_grads, exact_grads, strict=True):
            assert_close_to_ref(a, r, e, name=name, dtype=dtype)  # gate gradients are float32 metadata
    else:
        for name in CANON:
            assert_close_dtype(fast[name], slow[name], msg=lambda msg, name=name: f"{name}: {msg}")
        for name, a, r in zip(names, fast_grads, slow_grads, strict=True):
            assert_close_dtype(a, r, msg=lambda msg, name=name: f"grad {name}: {msg}")


@given(
    b=st.integers(1, 3),
    h=st.integers(1, 2),
    m=st.sampled_from([1, 2, 3, 5, 17]),
    lengths=st.lists(st.sampled_from([0, 1, 2, 3, 6, 17]), min_size=1, max_size=4),
    eviction=st.sampled_from(POLICIES),
    decay=st.sampled_from([0.0, 0.5, USAGE_DECAY, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_write_matches_reference_on_random_sequences(device, b, h, m, lengths, eviction, decay, seed):
    """Several writes with masks, reads adding usage in between (so usage eviction has work to do)."""
    gen = torch.Generator().manual_seed(seed)
    fast = slow = MemoryState.empty(b, h, m, 2, 3, dtype=torch.float64, device=device)
    for n in lengths:
        k, v, g, mask = tokens(b, h, n, 2, 3, device=device, generator=gen, p_mask=float(torch.rand((), generator=gen)))
        fast = write(fast, k, v, g, mask=mask, eviction=eviction, usage_decay=decay)
        slow = ref.write(slow, k, v, g, mask=mask, eviction=eviction, usage_decay=decay)
        assert_same_memory(fast, slow)
        q = torch.randn(b, h, 2, 2, generator=gen, dtype=torch.float64).to(device)
        fast = fast.replace(usage=fast.usage + read_usage(q, fast))
        slow = slow.replace(usage=slow.usage + ref.read_usage(q, slow))


# ---------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("eviction", POLICIES)
def test_write_gradcheck(eviction):
    """float64 gradcheck w.r.t. the old keys/values and the new keys, values and gates (overflowing).

    A float64 store keeps float64 metadata, so the stored pairs and the recorded gates are
    float64-differentiable in the gate.
    """
    gen = torch.Generator().manual_seed(0)
    old = fill(MemoryState.empty(2, 1, 3, 2, 2, dtype=torch.float64), 3, eviction=eviction, generator=gen)
    k, v, g, mask = tokens(2, 1, 4, 2, 2, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (old.keys, old.values, k, v, g.double())]

    def f(old_keys, old_values, keys, values, strength):
        new = write(old.replace(keys=old_keys, values=old_values), keys, values, strength, mask=mask, eviction=eviction)
        canon = canonical_memory(new)
        return canon["keys"], canon["values"], canon["strength"]

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("eviction", POLICIES)
def test_read_after_write_gradcheck(eviction):
    gen = torch.Generator().manual_seed(1)
    old = fill(MemoryState.empty(2, 1, 3, 2, 2, dtype=torch.float64), 2, eviction=eviction, generator=gen)
    k, v, g, mask = tokens(2, 1, 3, 2, 2, generator=gen)
    q = torch.randn(2, 1, 2, 2, dtype=torch.float64, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (q, old.keys, old.values, k, v)]

    def f(q, old_keys, old_values, keys, values):
        new = write(old.replace(keys=old_keys, values=old_values), keys, values, g, mask=mask, eviction=eviction)
        return read(q, new), read(q, new, top_k=2)

    assert torch.autograd.gradcheck(f, leaves)


# ---------------------------------------------------------------------------------- properties

seeds = st.integers(0, 2**31 - 1)


def history(inputs, count0):
    """Per (row, head): the written tokens in order as (step, g, value) tuples."""
    out = {}
    for _k, v, g, mask in inputs:
        b, h, n = g.shape
        for bi in range(b):
            for j in range(n):
                if mask[bi, j]:
                    s = count0[bi]
                    count0[bi] += 1
                    for hi in range(h):
                        out.setdefault((bi, hi), []).append(
                            (s, float(g[bi, hi, j]), v[bi, hi, j] * g[bi, hi, j].double())
                        )
    return out


def survivors(state, bi, hi):
    return sorted(int(s) for s in state.step[bi, hi][state.valid[bi, hi]])


def best_except_last(cands, m):
    """Steps kept by an eviction that always keeps the last token and the m-1 best (prio, step) others."""
    if len(cands) <= m:
        return sorted(s for _, s in cands)
    *others, (_, last) = cands
    kept = sorted(others, reverse=True)[: m - 1]
    return sorted([last] + [s for _, s in kept])


@given(
    b=st.integers(1, 3),
    h=st.integers(1, 2),
    m=st.integers(1, 6),
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=4),
    seed=seeds,
)
def test_fifo_keeps_the_last_capacity_writes(device, b, h, m, lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    state = MemoryState.empty(b, h, m, 2, 3, dtype=torch.float64, device=device)
    inputs = [tokens(b, h, n, 2, 3, device=device, generator=gen) for n in lengths]
    state = write_chain(write, state, inputs, "fifo")
    hist = history(inputs, [0] * b)
    for bi in range(b):
        for hi in range(h):
            toks = hist.get((bi, hi), [])
            kept = toks[-m:]
            assert survivors(state, bi, hi) == [s for s, _, _ in kept]
            for s, g, val in kept:  # a ring buffer: step s sits in slot s % m
                assert int(state.step[bi, hi, s % m]) == s
                assert_close_dtype(state.values[bi, hi, s % m], val)
                assert float(state.strength[bi, hi, s % m]) == g


@given(
    b=st.integers(1, 3),
    h=st.integers(1, 2),
    m=st.integers(1, 6),
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=4),
    ties=st.booleans(),
    seed=seeds,
)
def test_strength_keeps_the_strongest_and_the_last_token(device, b, h, m, lengths, ties, seed):
    gen = torch.Generator().manual_seed(seed)
    inputs = []
    for n in lengths:
        k, v, g, mask = tokens(b, h, n, 2, 3, device=device, generator=gen)
        inputs.append((k, v, g.round(decimals=1) if ties else g, mask))  # ties in g: the oldest goes first
    state = write_chain(write, MemoryState.empty(b, h, m, 2, 3, dtype=torch.float64, device=device), inputs, "strength")
    hist = history(inputs, [0] * b)
    for bi in range(b):
        for hi in range(h):
            toks = hist.get((bi, hi), [])
            expected = best_except_last([(g, s) for s, g, _ in toks], m)
            assert survivors(state, bi, hi) == expected
            if toks:
                assert toks[-1][0] in expected  # the last written token always survives
            by_step = {s: (g, val) for s, g, val in toks}
            for slot in state.valid[bi, hi].nonzero().flatten().tolist():
                g, val = by_step[int(state.step[bi, hi, slot])]
                assert float(state.strength[bi, hi, slot]) == g
                assert_close_dtype(state.values[bi, hi, slot], val)


@given(
    b=st.integers(1, 3),
    h=st.integers(1, 2),
    m=st.integers(1, 6),
    n=st.integers(0, 9),
    scale=st.sampled_from([1.0, 3.0]),
    decay=st.sampled_from([0.0, 0.5, USAGE_DECAY, 1.0]),
    seed=seeds,
)
def test_usage_evicts_the_least_used(device, b, h, m, n, scale, decay, seed):
    """A full store with random usage; new slots start at the row's (lower) median usage after the
    decay (a fair start), so they outlive the less-read half."""
    gen = torch.Generator().manual_seed(seed)
    full = fill(MemoryState.empty(b, h, m, 2, 3, dtype=torch.float64, device=device), m, generator=gen, p_mask=1.0)
    usage = (scale * torch.rand(b, h, m, generator=gen, dtype=torch.float64)).to(device)
    state = full.replace(usage=usage)
    k, v, g, mask = tokens(b, h, n, 2, 3, device=device, generator=gen)
    new = write(state, k, v, g, mask=mask, eviction="usage", usage_decay=decay)
    decayed = (usage * decay).tolist()
    for bi in range(b):
        new_steps = [m + i for i in range(int(mask[bi].sum()))]
        for hi in range(h):
            if not new_steps:
                assert survivors(new, bi, hi) == survivors(state, bi, hi)
                assert torch.equal(new.usage[bi, hi], usage[bi, hi])
                continue
            start = sorted(decayed[bi][hi])[(m - 1) // 2]
            old = [(decayed[bi][hi][slot], int(state.step[bi, hi, slot])) for slot in range(m)]
            expected = best_except_last(old + [(start, s) for s in new_steps], m)
            assert survivors(new, bi, hi) == expected
            below = sorted(o for o in old if o[0] < start)
            if len(new_steps) <= len(below):  # enough slots read less than the median: they go, all new stay
                assert set(new_steps) <= set(expected)
                assert not {s for _, s in below[: len(new_steps)]} & set(expected)
            fresh = new.step[bi, hi] >= m
            assert_close_dtype(new.usage[bi, hi][fresh], torch.full_like(new.usage[bi, hi][fresh], start))
            assert_close_dtype(new.usage[bi, hi][~fresh], (usage[bi, hi] * decay)[~fresh])


@given(
    data=st.data(),
    b=st.integers(1, 3),
    h=st.integers(1, 2),
    m=st.sampled_from([1, 2, 3, 5, 17]),
    eviction=st.sampled_from(POLICIES),
    seed=seeds,
)
def test_zero_gate_write_leaves_the_read_unchanged(device, data, b, h, m, eviction, seed):
    """g = 0 in the default gated read: the new slots get weight < 1e-37 (no eviction happens)."""
    k0 = data.draw(st.integers(0, m), label="already written")
    n = data.draw(st.integers(0, m - k0), label="zero-gate tokens")
    gen = torch.Generator().manual_seed(seed)
    state = fill(
        MemoryState.empty(b, h, m, 3, 2, dtype=torch.float64, device=device),
        k0,
        eviction=eviction,
        generator=gen,
        p_mask=1.0,
    )
    k, v, _, _ = tokens(b, h, n, 3, 2, device=device, generator=gen)
    after = write(state, k, v, torch.zeros(b, h, n, device=device), eviction=eviction)
    assert torch.equal(after.count, state.count + n)
    q = torch.randn(b, h, 4, 3, generator=gen, dtype=torch.float64).to(device)
    for fn in (read, ref.read):
        for top_k in (None, 2):
            assert_close_dtype(fn(q, after, top_k=top_k), fn(q, state, top_k=top_k))


def mixed_rows(row, a, b):
    """``b`` in the rows where ``row`` (b,) is True, ``a`` elsewhere."""
    return torch.where(row.view(-1, *[1] * (a.dim() - 1)), b, a)


@given(
    b=st.integers(2, 4),
    h=st.integers(1, 2),
    m=st.sampled_from([1, 3, 5]),
    n=st.sampled_from([1, 3, 7]),
    eviction=st.sampled_from(POLICIES),
    seed=seeds,
)
def test_write_rows_never_affect_each_other(device, b, h, m, n, eviction, seed):
    gen = torch.Generator().manual_seed(seed)
    states = [
        fill(MemoryState.empty(b, h, m, 2, 3, dtype=torch.float64, device=device), 4, eviction=eviction, generator=gen)
        for _ in range(2)
    ]
    inputs = [tokens(b, h, n, 2, 3, device=device, generator=gen) for _ in range(2)]
    row = torch.arange(b, device=device) == int(torch.randint(b, (1,), generator=gen))
    state2 = MemoryState(**{k: mixed_rows(row, v, getattr(states[1], k)) for k, v in states[0].to_dict().items()})
    inputs2 = [mixed_rows(row, a, c) for a, c in zip(*inputs, strict=True)]
    for fn in (write, ref.write):
        a, c = (
            fn(states[0], *inputs[0][:3], mask=inputs[0][3], eviction=eviction),
            fn(state2, *inputs2[:3], mask=inputs2[3], eviction=eviction),
        )
        for name, t in a.to_dict().items():
            assert torch.equal(t[~row], getattr(c, name)[~row]), (fn, name)


@given(
    b=st.integers(1, 3),
    h=st.integers(1, 2),
    m=st.sampled_from([1, 3, 5]),
    n=st.sampled_from([0, 1, 3, 7]),
    eviction=st.sampled_from(POLICIES),
    seed=seeds,
)
def test_masked_tokens_are_never_written(device, b, h, m, n, eviction, seed):
    """Each row stores exactly what writing only its unmasked tokens would store; count advances by those."""
    gen = torch.Generator().manual_seed(seed)
    state = fill(
        MemoryState.empty(b, h, m, 2, 3, dtype=torch.float64, device=device), 4, eviction=eviction, generator=gen
    )
    k, v, g, mask = tokens(b, h, n, 2, 3, device=device, generator=gen, p_mask=0.5)
    new = write(state, k, v, g, mask=mask, eviction=eviction)
    assert torch.equal(new.count, state.count + mask.sum(dim=1))
    for r in range(b):
        keep = mask[r]
        index = torch.tensor([r], device=device)
        alone = write(
            state.index_select(index),
            k[r : r + 1, :, keep],
            v[r : r + 1, :, keep],
            g[r : r + 1, :, keep],
            eviction=eviction,
        )
        assert_same_memory(new.index_select(index), alone)
        if not keep.any():  # nothing written: the row is untouched, usage does not even decay
            for name, t in new.to_dict().items():
                assert torch.equal(t[r], getattr(state, name)[r]), name


def permute_slots(state: MemoryState, perm) -> MemoryState:
    def p(t):
        return t.gather(2, perm if t.dim() == 3 else perm[..., None].expand_as(t))

    return state.replace(**{k: p(getattr(state, k)) for k in ("keys", "values", "valid", "strength", "step", "usage")})


@given(
    b=st.integers(1, 3),
    h=st.integers(1, 2),
    m=st.sampled_from([1, 3, 5]),
    n=st.sampled_from([1, 3, 7]),
    eviction=st.sampled_from(["strength", "usage"]),
    seed=seeds,
)
def test_priority_policies_ignore_slot_positions(device, b, h, m, n, eviction, seed):
    """strength/usage act on the set of stored pairs: permuting the slots first changes nothing."""
    gen = torch.Generator().manual_seed(seed)
    state = fill(
        MemoryState.empty(b, h, m, 2, 3, dtype=torch.float64, device=device), 5, eviction=eviction, generator=gen
    )
    state = state.replace(
        usage=torch.rand(b, h, m, generator=gen).to(device, state.usage.dtype) * state.valid
    )  # empty slots hold zeros
    permuted = permute_slots(state, torch.rand(b, h, m, generator=gen).argsort(dim=-1).to(device))
    k, v, g, mask = tokens(b, h, n, 2, 3, device=device, generator=gen)
    for fn in (write, ref.write):
        assert_same_memory(
            fn(permuted, k, v, g, mask=mask, eviction=eviction), fn(state, k, v, g, mask=mask, eviction=eviction)
        )


@pytest.mark.parametrize("eviction", POLICIES)
def test_write_has_value_semantics(device, eviction):
    """The input state is never modified, and autograd never sees a saved tensor change."""
    b, h, m = 2, 2, 3
    old = fill(MemoryState.empty(b, h, m, 2, 3, dtype=torch.float64, device=device), 2, eviction=eviction)
    old = old.replace(keys=old.keys.clone().requires_grad_(), values=old.values.clone().requires_grad_())
    before = old.detach().clone()
    k, v, g, mask = tokens(b, h, 4, 2, 3, device=device)
    k.requires_grad_()
    s1 = write(old, k, v, g, mask=mask, eviction=eviction)
    s2 = write(s1, *tokens(b, h, 5, 2, 3, device=device)[:3], eviction=eviction)
    for name, t in old.to_dict().items():
        assert torch.equal(t, getattr(before, name)), name
    q = torch.randn(b, h, 3, 2, dtype=torch.float64, device=device)
    loss = read(q, s1).sum() + read(q, s2).sum() + read(q, old).sum() + s1.keys.sum()
    loss.backward()
    assert old.keys.grad is not None and k.grad is not None


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fn", [write, ref.write], ids=["fast", "reference"])
def test_write_rejects_bad_input(fn):
    state = MemoryState.empty(2, 3, 4, 5, 6, dtype=torch.float32)
    k, v, g = torch.randn(2, 3, 7, 5), torch.randn(2, 3, 7, 6), torch.rand(2, 3, 7)
    cases = [
        (dict(keys=k[0]), ValueError, r"keys must be \(b h n dk\), got shape \(3, 7, 5\)"),
        (
            dict(keys=k[:1]),
            ValueError,
            r"keys \(b h n dk\) must have \(b, h, dk\) = \(2, 3, 5\) to match the memory state, got \(1, 3, 5\)",
        ),
        (dict(keys=k[:, :2]), ValueError, r"= \(2, 3, 5\) to match the memory state, got \(2, 2, 5\)"),
        (dict(keys=torch.randn(2, 3, 7, 4)), ValueError, r"= \(2, 3, 5\) to match the memory state, got \(2, 3, 4\)"),
        (dict(values=v[..., :5]), ValueError, r"values must be \(b h n dv\) = \(2, 3, 7, 6\), got \(2, 3, 7, 5\)"),
        (dict(values=v[:, :, :6]), ValueError, r"values must be \(b h n dv\) = \(2, 3, 7, 6\), got \(2, 3, 6, 6\)"),
        (dict(strength=g[..., :6]), ValueError, r"strength must be \(b h n\) = \(2, 3, 7\), got \(2, 3, 6\)"),
        (dict(strength=g[..., None]), ValueError, r"strength must be \(b h n\), got shape \(2, 3, 7, 1\)"),
        (dict(strength=(g > 0.5).long()), TypeError, r"strength must be a floating point tensor, got torch.int64"),
        (dict(keys=k.double()), TypeError, r"keys has dtype torch.float64 but the memory state stores torch.float32"),
        (
            dict(values=v.bfloat16()),
            TypeError,
            r"values has dtype torch.bfloat16 but the memory state stores torch.float32",
        ),
        (dict(eviction="lru"), ValueError, r"eviction must be one of \('fifo', 'strength', 'usage'\), got 'lru'"),
        (dict(mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, r"mask must be \(b n\) = \(2, 7\), got \(2, 6\)"),
        (dict(mask=torch.ones(2, 3, 7, dtype=torch.bool)), ValueError, r"mask must be \(b n\), got shape \(2, 3, 7\)"),
        (dict(mask=torch.ones(2, 7)), TypeError, r"mask must be bool \(True = write this token\), got torch.float32"),
        (dict(usage_decay=1.5), ValueError, r"usage_decay must be a float in \[0, 1\], got 1.5"),
        (dict(usage_decay=True), ValueError, r"usage_decay must be a float in \[0, 1\], got True"),
    ]
    for change, exc, match in cases:
        args = dict(keys=k, values=v, strength=g, mask=None, eviction="fifo", usage_decay=USAGE_DECAY)
        args.update(change)
        with pytest.raises(exc, match=match):
            fn(state, args.pop("keys"), args.pop("values"), args.pop("strength"), **args)
    with pytest.raises(TypeError, match=r"state must be a MemoryState, got dict"):
        fn(state.to_dict(), k, v, g)
    meta = dict(keys=(k.to("meta"), v, g, None), values=(k, v.to("meta"), g, None), strength=(k, v, g.to("meta"), None))
    meta["mask"] = (k, v, g, torch.ones(2, 7, dtype=torch.bool, device="meta"))
    for name, (kk, vv, gg, mask) in meta.items():  # any other device than the state's
        with pytest.raises(ValueError, match=rf"{name} is on meta but the memory state is on cpu"):
            fn(state, kk, vv, gg, mask=mask)


# ---------------------------------------------------------------------------------- torch.compile


COMPILE_NOISE = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"  # raised inside torch


@pytest.mark.filterwarnings(COMPILE_NOISE)
def test_compiled_fifo_write_matches_eager():
    torch._dynamo.reset()
    state = fill(MemoryState.empty(2, 2, 3, 4, 3, dtype=torch.float32), 2)
    k, v, g, mask = tokens(2, 2, 4, 4, 3, dtype=torch.float32)
    compiled = torch.compile(lambda s, k, v, g, mask: write(s, k, v, g, mask=mask), fullgraph=True)
    got, expected = compiled(state, k, v, g, mask), write(state, k, v, g, mask=mask)
    assert isinstance(got, MemoryState)
    for name, t in expected.to_dict().items():
        assert_close_dtype(getattr(got, name), t, msg=name)
