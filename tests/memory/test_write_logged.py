"""Logged in-place writes (memgpt.memory.reversible): autograd through a store written in place.

The contract: the same outputs and the same gradients as the out-of-place write, on any chain of
reads and writes; the store back at its latest contents after backward; a store changed behind
the log's back is refused in backward; nothing silently cuts a gradient.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from memgpt.memory import EVICTION_POLICIES, USAGE_DECAY, MemoryState, read, read_usage, start_log, write
from memgpt.memory.reversible import carry_log

FIELDS = ("keys", "values", "valid", "strength", "step", "usage", "count")
DK, DV = 3, 2


def random_store(b, h, m, dtype, gen, *, requires_grad):
    """A store with some history (out-of-place writes of random tokens), as leaves if asked."""
    state = MemoryState.empty(b, h, m, DK, DV, dtype=dtype)
    with torch.no_grad():
        for n in (m // 2 + 1, m):
            k = torch.randn(b, h, n, DK, generator=gen, dtype=torch.float64).to(dtype)
            v = torch.randn(b, h, n, DV, generator=gen, dtype=torch.float64).to(dtype)
            g = torch.rand(b, h, n, generator=gen, dtype=torch.float64)
            state = write(state, k, v, g, mask=torch.rand(b, n, generator=gen) < 0.8)
    if not requires_grad:
        return state
    return state.replace(
        keys=state.keys.clone().requires_grad_(),
        values=state.values.clone().requires_grad_(),
        strength=state.strength.clone().requires_grad_(),
    )


def make_ops(plan, b, h, dtype, gen):
    """Inputs for a chain: ("read", q, weight) or ("write", k, v, g, mask), all leaves needing grad."""
    ops = []
    for kind, n, p_mask in plan:
        if kind == "read":
            q = torch.randn(b, h, n, DK, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
            ops.append(("read", q, torch.randn(b, h, n, DV, generator=gen, dtype=torch.float64).to(dtype)))
        else:
            k = torch.randn(b, h, n, DK, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
            v = torch.randn(b, h, n, DV, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
            g = torch.sigmoid(2 * torch.randn(b, h, n, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
            ops.append(("write", k, v, g, torch.rand(b, n, generator=gen) < p_mask))
    return ops


def run_chain(state, ops, *, inplace, eviction, top_k, gated, explicit_start=False):
    """Loss = sum of weighted reads (+ a read of the final store); returns (loss, final state)."""
    if explicit_start:
        state = start_log(state)
    loss = torch.zeros((), dtype=state.dtype)
    for op in ops:
        if op[0] == "read":
            _, q, weight = op
            loss = loss + (read(q, state, top_k=top_k, gated_scores=gated) * weight).sum()
            if eviction == "usage":
                usage = read_usage(q, state, top_k=top_k, gated_scores=gated)
                state = carry_log(state, state.replace(usage=state.usage + usage))
        else:
            _, k, v, g, mask = op
            state = write(state, k, v, g, mask=mask, eviction=eviction, usage_decay=USAGE_DECAY, inplace=inplace)
    q_last = next((op[1] for op in ops if op[0] == "read"), None)
    if q_last is not None:
        loss = loss + read(q_last, state, top_k=top_k, gated_scores=gated).square().sum()
    return loss, state


def leaves(start, ops):
    out = [t for op in ops for t in op[1:] if isinstance(t, torch.Tensor) and t.requires_grad]
    out += [t for t in (start.keys, start.values, start.strength) if t.requires_grad]
    return out


plans = st.lists(
    st.tuples(st.sampled_from(["read", "write"]), st.sampled_from([1, 2, 5, 9]), st.sampled_from([0.0, 0.6, 1.0])),
    min_size=1,
    max_size=7,
)


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 2),
    m=st.sampled_from([1, 2, 5, 8]),
    plan=plans,
    eviction=st.sampled_from(EVICTION_POLICIES),
    top_k=st.sampled_from([None, 1, 3]),
    gated=st.booleans(),
    start=st.sampled_from(["empty", "random", "random_grad"]),
    explicit_start=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_logged_chain_equals_out_of_place_float64(b, h, m, plan, eviction, top_k, gated, start, explicit_start, seed):
    assume(any(kind == "read" for kind, _, _ in plan))
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64
    if start == "empty":
        initial = MemoryState.empty(b, h, m, DK, DV, dtype=dtype)
    else:
        initial = random_store(b, h, m, dtype, gen, requires_grad=start == "random_grad")
    ops = make_ops(plan, b, h, dtype, gen)
    params = leaves(initial, ops)
    kw = dict(eviction=eviction, top_k=top_k, gated=gated)

    loss_ref, final_ref = run_chain(initial, ops, inplace=False, **kw)
    grads_ref = torch.autograd.grad(loss_ref, params, allow_unused=True)
    mine = initial.replace()  # a second handle: the logged run donates the state it is given
    loss, final = run_chain(mine, ops, inplace=True, explicit_start=explicit_start, **kw)
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, grads_ref):
        if want is None or got is None:
            assert (got is None or not got.any()) and (want is None or not want.any())
        else:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    for name in FIELDS:  # backward rolled the store back and forward again: bit for bit
        assert torch.equal(getattr(final, name), getattr(final_ref, name)), name


@settings(max_examples=15, deadline=None)
@given(
    plan=plans,
    eviction=st.sampled_from(EVICTION_POLICIES),
    top_k=st.sampled_from([None, 2]),
    seed=st.integers(0, 2**31 - 1),
)
def test_logged_chain_equals_out_of_place_float32(plan, eviction, top_k, seed):
    assume(any(kind == "read" for kind, _, _ in plan))
    gen = torch.Generator().manual_seed(seed)
    initial = random_store(2, 2, 5, torch.float32, gen, requires_grad=False)
    ops = make_ops(plan, 2, 2, torch.float32, gen)
    params = leaves(initial, ops)
    kw = dict(eviction=eviction, top_k=top_k, gated=True)
    loss_ref, _ = run_chain(initial, ops, inplace=False, **kw)
    grads_ref = torch.autograd.grad(loss_ref, params, allow_unused=True)
    loss, _ = run_chain(initial.replace(), ops, inplace=True, **kw)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        if want is not None and got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # fused vs math kernel rounding


def test_gradcheck_through_a_logged_chain():
    gen = torch.Generator().manual_seed(0)
    b, h, m = 1, 2, 3
    ops = make_ops([("write", 2, 1.0), ("read", 2, 1.0), ("write", 2, 1.0), ("read", 1, 1.0)], b, h, torch.float64, gen)
    inputs = tuple(leaves(MemoryState.empty(b, h, m, DK, DV, dtype=torch.float64), ops))

    def chain(*xs):
        it = iter(xs)
        state, outs = start_log(MemoryState.empty(b, h, m, DK, DV, dtype=torch.float64)), []
        for op in ops:
            if op[0] == "read":
                outs.append(read(next(it), state))
            else:
                k, v, g = next(it), next(it), next(it)
                state = write(state, k, v, g, inplace=True)  # the second write wraps the ring
        return tuple(outs)

    assert torch.autograd.gradcheck(chain, inputs)


def test_the_store_is_written_in_place_and_restored_after_each_backward():
    gen = torch.Generator().manual_seed(1)
    ops = make_ops([("write", 4, 1.0), ("read", 3, 1.0), ("write", 5, 1.0), ("read", 2, 1.0)], 2, 2, torch.float64, gen)
    empty = MemoryState.empty(2, 2, 6, DK, DV, dtype=torch.float64)
    storage = empty.keys.data_ptr()
    loss, final = run_chain(empty, ops, inplace=True, explicit_start=True, eviction="fifo", top_k=None, gated=True)
    assert final.keys.data_ptr() == storage  # no copy of the store anywhere
    assert not final.keys.requires_grad
    snapshot = {name: getattr(final, name).clone() for name in FIELDS}
    params = leaves(empty, ops)
    first = torch.autograd.grad(loss, params, retain_graph=True)
    second = torch.autograd.grad(loss, params)  # a second pass rolls back and forward again
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    for name in FIELDS:
        assert torch.equal(getattr(final, name), snapshot[name]), name


def test_backward_from_an_early_read_only():
    gen = torch.Generator().manual_seed(2)
    ops = make_ops([("write", 3, 1.0), ("read", 2, 1.0), ("write", 4, 1.0), ("read", 2, 1.0)], 1, 2, torch.float64, gen)
    empty = MemoryState.empty(1, 2, 4, DK, DV, dtype=torch.float64)

    def first_read(inplace):
        state = write(empty.replace(), *ops[0][1:4], inplace=inplace)
        out = read(ops[1][1], state)
        state = write(state, *ops[2][1:4], inplace=inplace)  # recorded, but not on the loss's path
        read(ops[3][1], state)
        return out.sum(), state

    want = torch.autograd.grad(first_read(False)[0], ops[0][1:4])
    loss, final = first_read(True)
    got = torch.autograd.grad(loss, ops[0][1:4])
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        assert torch.equal(final.keys, write(write(empty.replace(), *ops[0][1:4]), *ops[2][1:4]).keys)


def test_a_store_changed_behind_the_log_is_refused_in_backward():
    gen = torch.Generator().manual_seed(3)
    ops = make_ops([("read", 2, 1.0), ("write", 3, 1.0), ("read", 2, 1.0)], 1, 1, torch.float32, gen)
    loss, final = run_chain(
        MemoryState.empty(1, 1, 4, DK, DV),
        ops,
        inplace=True,
        explicit_start=True,
        eviction="fifo",
        top_k=None,
        gated=True,
    )
    carried = final.detach()  # the next window's state shares the store
    with torch.no_grad():
        write(carried, torch.randn(1, 1, 2, DK), torch.randn(1, 1, 2, DV), torch.rand(1, 1, 2), inplace=True)
    with pytest.raises(RuntimeError, match="modified in place after this graph recorded it"):
        loss.backward()


def test_nothing_silently_cuts_a_logged_gradient():
    state = start_log(MemoryState.empty(2, 1, 4, DK, DV))
    k = torch.randn(2, 1, 3, DK, requires_grad=True)
    state = write(state, k, torch.randn(2, 1, 3, DV), torch.rand(2, 1, 3), inplace=True)
    for copy in (
        lambda s: s.clone(),
        lambda s: s.reset_rows(torch.tensor([True, False])),
        lambda s: s.index_select(torch.tensor([1, 0])),
        lambda s: s.to(dtype=torch.float64),
        lambda s: s.contiguous(),
        lambda s: s.replace(keys=s.keys * 2),
    ):
        with pytest.raises(RuntimeError, match="would silently cut them.*detach"):
            copy(state)
    with pytest.raises(RuntimeError, match=r"write\(\.\.\., inplace=True\), or detach\(\)"):
        write(state, k, torch.randn(2, 1, 3, DV), torch.rand(2, 1, 3))
    assert not state.detach().keys.requires_grad
    with torch.no_grad():  # outside autograd a logged state is a plain store
        state.clone()
        read(torch.randn(2, 1, 2, DK), state)


def test_an_older_state_of_the_chain_is_donated():
    state = start_log(MemoryState.empty(1, 1, 4, DK, DV))
    kv = (torch.randn(1, 1, 2, DK, requires_grad=True), torch.randn(1, 1, 2, DV), torch.rand(1, 1, 2))
    new = write(state, *kv, inplace=True)
    with pytest.raises(RuntimeError, match="donated"):
        read(torch.randn(1, 1, 1, DK), state)
    with pytest.raises(RuntimeError, match="donated"):
        write(state, *kv, inplace=True)
    read(torch.randn(1, 1, 1, DK), new).sum().backward()
    assert kv[0].grad is not None and kv[0].grad.abs().sum() > 0


def test_memory_layer_inplace_trains_like_the_copying_layer():
    """MemoryLayer(..., inplace=True) over three calls: the same outputs and parameter gradients."""
    from memgpt.layers import MemoryLayer

    torch.manual_seed(0)
    layer = MemoryLayer(8, heads=2, capacity=5, eviction="fifo").double()
    xs = [torch.randn(2, n, 8, dtype=torch.float64) for n in (3, 4, 2)]
    runs = []
    for inplace in (False, True):
        layer.zero_grad()
        state, loss = None, 0.0
        for x in xs:
            y, state = layer(x, state, inplace=inplace)
            loss = loss + y.sin().sum()
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in layer.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads_b, grads_a, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
