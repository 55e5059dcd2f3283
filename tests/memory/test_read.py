"""memory.read / read_usage: fast == reference (forward and gradients), gradcheck, properties, errors."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from memgpt.memory import MemoryState, read, read_usage, write
from memgpt.memory import reference as ref
from memgpt.memory.state import metadata_dtype
from memgpt.testing import assert_close_dtype, assert_close_to_ref

read_module = importlib.import_module("memgpt.memory.read")  # `memgpt.memory.read` the attribute is the function

LOW = (torch.bfloat16, torch.float16)
META = ("valid", "strength", "step", "usage")


def random_state(b, h, m, dk, dv, *, dtype=torch.float64, device="cpu", generator=None, p_valid=0.6, count=None):
    """A state with random slots, a random valid pattern (garbage in invalid slots) and unique steps."""
    gen = dict(generator=generator)
    valid = torch.rand(b, h, m, **gen) < p_valid
    meta = metadata_dtype(dtype)
    state = MemoryState(
        keys=torch.randn(b, h, m, dk, dtype=dtype, **gen),
        values=torch.randn(b, h, m, dv, dtype=dtype, **gen),
        valid=valid,
        strength=torch.sigmoid(2 * torch.randn(b, h, m, **gen)).to(meta),
        step=torch.rand(b, h, m, **gen).argsort(dim=-1),
        usage=torch.rand(b, h, m, **gen).to(meta),
        count=torch.full((b,), m if count is None else count, dtype=torch.long),
    )
    return state.to(device)


def with_grad(state: MemoryState) -> MemoryState:
    """The same state whose keys, values and strength are fresh leaves that require grad."""
    return state.replace(
        **{k: getattr(state, k).detach().clone().requires_grad_() for k in ("keys", "values", "strength")}
    )


def read_and_grads(fn, q, state, **kw):
    """(out, [dq, dkeys, dvalues, dstrength]) for a fixed random upstream gradient."""
    q = q.detach().clone().requires_grad_()
    state = with_grad(state)
    out = fn(q, state, **kw)
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, [q, state.keys, state.values, state.strength], dout, materialize_grads=True)
    return out.detach(), list(grads)


GRAD_NAMES = ("out", "dq", "dkeys", "dvalues", "dstrength")


def check_against_reference(q, state, **kw):
    """Fast vs reference for forward and every gradient; the 2x rule for low precision."""
    out, grads = read_and_grads(read, q, state, **kw)
    out_ref, grads_ref = read_and_grads(ref.read, q, state, **kw)
    if q.dtype in LOW:
        out_ex, grads_ex = read_and_grads(ref.read, q.double(), state.to(dtype=torch.float64), **kw)
        for name, a, r, e in zip(GRAD_NAMES, [out, *grads], [out_ref, *grads_ref], [out_ex, *grads_ex], strict=True):
            assert_close_to_ref(a, r, e, name=name)
            assert a.dtype == r.dtype, name
    else:
        for name, a, r in zip(GRAD_NAMES, [out, *grads], [out_ref, *grads_ref], strict=True):
            assert_close_dtype(a, r, msg=name)


SHAPES = [  # (b, h, n, m, dk, dv): capacity 1, awkward sizes 1, 3, 17
    (1, 1, 1, 1, 1, 1),
    (2, 3, 3, 17, 5, 3),
    (3, 1, 17, 3, 4, 1),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("top_k", [None, 1, 3, 20])
@pytest.mark.parametrize("gated_scores", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_read_matches_reference(device, dtype, top_k, gated_scores, shape):
    b, h, n, m, dk, dv = shape
    state = random_state(b, h, m, dk, dv, dtype=dtype, device=device)
    state = state.replace(valid=state.valid.clone().index_fill_(0, torch.tensor([0], device=device), True))
    q = torch.randn(b, h, n, dk, dtype=dtype, device=device)
    check_against_reference(q, state, top_k=top_k, gated_scores=gated_scores)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("top_k", [1, 3, 7, 12, 17])
def test_top_k_multi_chunk_matches_reference(monkeypatch, dtype, top_k):
    """Capacity larger than TOP_K_CHUNK: the running top-k across chunks (last one partial)."""
    monkeypatch.setattr(read_module, "TOP_K_CHUNK", 5)
    state = random_state(2, 2, 17, 4, 3, dtype=dtype, p_valid=0.8)
    q = torch.randn(2, 2, 6, 4, dtype=dtype)
    check_against_reference(q, state, top_k=top_k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [None, 1, 3, 20])
@pytest.mark.parametrize("shape", SHAPES + [(2, 2, 5, 512, 8, 4)], ids=lambda s: "x".join(map(str, s)))
def test_inference_read_matches_reference(device, dtype, top_k, shape):
    """Under no_grad the reads take their inference paths (top-k: the selection's own scores and
    an embedding_bag over the chosen values; m=512 runs the group pre-filter)."""
    b, h, n, m, dk, dv = shape
    state = random_state(b, h, m, dk, dv, dtype=dtype, device=device)
    q = torch.randn(b, h, n, dk, dtype=torch.float64).to(device, dtype)
    with torch.no_grad():
        out = read(q, state, top_k=top_k)
        out_ref = ref.read(q, state, top_k=top_k)
        if dtype in LOW:
            exact = ref.read(q.double(), state.to(dtype=torch.float64), top_k=top_k)
            assert_close_to_ref(out, out_ref, exact, name="out")
        else:
            assert_close_dtype(out, out_ref, msg="out")


@pytest.mark.parametrize("top_k", [3, 5])
def test_top_k_group_prefilter_across_chunks_matches_reference(monkeypatch, top_k):
    """Chunks of 64 slots (4 groups of 16: pre-filtered) and a last partial chunk (plain top-k)."""
    monkeypatch.setattr(read_module, "TOP_K_CHUNK", 64)
    state = random_state(2, 2, 200, 4, 3, p_valid=0.7)
    q = torch.randn(2, 2, 6, 4, dtype=torch.float64)
    check_against_reference(q, state, top_k=top_k)
    with torch.no_grad():
        assert_close_dtype(read(q, state, top_k=top_k), ref.read(q, state, top_k=top_k))
        assert_close_dtype(read_usage(q, state, top_k=top_k), ref.read_usage(q, state, top_k=top_k))


@given(
    rows=st.integers(1, 3),
    c=st.sampled_from([16, 48, 64, 100, 256]),
    k=st.integers(1, 20),
    seed=st.integers(0, 2**31 - 1),
)
def test_chunk_top_k_is_the_exact_top_k(rows, c, k, seed):
    """The group pre-filter returns exactly the k largest scores, at positions holding them."""
    scores = torch.randn(rows, 4, c, generator=torch.Generator().manual_seed(seed))
    top, pos = read_module._chunk_top_k(scores, k)
    want = scores.topk(min(k, c), dim=-1).values
    torch.testing.assert_close(top.sort(-1, descending=True).values, want, rtol=0, atol=0)
    assert torch.equal(scores.gather(-1, pos), top)
    assert all(len(set(r.tolist())) == r.numel() for r in pos.flatten(0, 1))  # no slot twice


def test_scale_one_is_the_seed_formula():
    """scale=1, ungated: softmax(q.k) over the valid slots, written out by hand."""
    state = random_state(2, 2, 5, 3, 4, p_valid=1.0)
    q = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    by_hand = torch.softmax(q @ state.keys.transpose(-1, -2), dim=-1) @ state.values
    assert_close_dtype(read(q, state, scale=1.0, gated_scores=False), by_hand)
    scores = q @ state.keys.transpose(-1, -2) * 3**-0.5 + state.strength.double().log()[:, :, None, :]
    assert_close_dtype(read(q, state), torch.softmax(scores, dim=-1) @ state.values)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [None, 2])
def test_read_usage_matches_reference(device, dtype, top_k):
    state = random_state(3, 2, 6, 4, 3, dtype=dtype, device=device)
    state = state.replace(valid=state.valid.clone().index_fill_(0, torch.tensor([0], device=device), False))
    q = torch.randn(3, 2, 5, 4, dtype=dtype, device=device)
    mask = torch.rand(3, 5, device=device) < 0.6
    for kw in (dict(), dict(mask=mask), dict(mask=mask, gated_scores=False, scale=0.7)):
        fast, slow = read_usage(q, state, top_k=top_k, **kw), ref.read_usage(q, state, top_k=top_k, **kw)
        assert fast.dtype == state.usage.dtype == metadata_dtype(dtype) and fast.shape == (3, 2, 6)
        assert_close_dtype(fast, slow)
        assert not fast[0].any()  # the empty row gets no usage
    assert not read_usage(q.requires_grad_(), state).requires_grad  # a statistic, never a gradient path


def test_read_usage_sums_read_weights():
    state = random_state(2, 3, 7, 4, 2)
    q = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    expected = ref.read_weights(q, state, top_k=3).sum(dim=2)  # float64, like a float64 store's usage
    assert_close_dtype(read_usage(q, state, top_k=3), expected)
    # additive: one call == token by token
    by_token = sum(read_usage(q[:, :, i : i + 1], state, top_k=3) for i in range(5))
    assert_close_dtype(by_token, read_usage(q, state, top_k=3))


# ---------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize(
    "fn, top_k, gated_scores",
    [
        (read, None, True),
        (read, None, False),
        (read, 2, True),
        (read, 2, False),
        (ref.read, None, True),
        (ref.read, 2, True),
    ],
    ids=[
        "fast-full-gated",
        "fast-full",
        "fast-topk-gated",
        "fast-topk",
        "reference-full-gated",
        "reference-topk-gated",
    ],
)
def test_read_gradcheck(fn, top_k, gated_scores):
    """float64 gradcheck w.r.t. q, keys, values and the gates (float64 metadata in a float64 store)."""
    state = random_state(2, 1, 4, 2, 2)
    state = state.replace(valid=torch.tensor([True, False, True, True]).expand(2, 1, 4))  # top_k=2 drops one
    q = torch.randn(2, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    keys = state.keys.clone().requires_grad_()
    values = state.values.clone().requires_grad_()
    strength = state.strength.clone().requires_grad_()
    assert strength.dtype == torch.float64

    def f(q, keys, values, strength):
        return fn(q, state.replace(keys=keys, values=values, strength=strength), top_k=top_k, gated_scores=gated_scores)

    assert torch.autograd.gradcheck(f, (q, keys, values, strength))


# ---------------------------------------------------------------------------------- properties

dims = st.integers(1, 3)
sizes = st.sampled_from([1, 2, 3, 5, 17])
seeds = st.integers(0, 2**31 - 1)
top_ks = st.sampled_from([None, 1, 2, 4, 100])


@given(b=dims, h=dims, n=sizes, m=sizes, dk=dims, dv=dims, top_k=top_ks, gated=st.booleans(), seed=seeds)
def test_empty_memory_reads_zeros_with_finite_gradients(device, b, h, n, m, dk, dv, top_k, gated, seed):
    gen = torch.Generator().manual_seed(seed)
    state = random_state(b, h, m, dk, dv, generator=gen, p_valid=0.0, device=device)  # garbage, none valid
    q = torch.randn(b, h, n, dk, generator=gen, dtype=torch.float64).to(device)
    for fn in (read, ref.read):
        out, grads = read_and_grads(fn, q, state, top_k=top_k, gated_scores=gated)
        assert torch.equal(out, torch.zeros_like(out))
        for g in grads:
            assert torch.isfinite(g).all()
    assert torch.equal(read_usage(q, state, top_k=top_k), torch.zeros(b, h, m, device=device))
    fresh = MemoryState.empty(b, h, m, dk, dv, dtype=torch.float64, device=device)
    assert torch.equal(read(q, fresh, top_k=top_k), torch.zeros(b, h, n, dv, dtype=torch.float64, device=device))


@given(b=dims, h=dims, n=sizes, m=sizes, top_k=top_ks, gated=st.booleans(), seed=seeds)
def test_reference_weights_sum_to_one_over_valid_slots(b, h, n, m, top_k, gated, seed):
    gen = torch.Generator().manual_seed(seed)
    state = random_state(b, h, m, 3, 2, generator=gen)
    q = torch.randn(b, h, n, 3, generator=gen, dtype=torch.float64)
    w = ref.read_weights(q, state, top_k=top_k, gated_scores=gated)
    assert w.shape == (b, h, n, m) and (w >= 0).all()
    assert not w.masked_select(~state.valid[:, :, None, :].expand_as(w)).any()
    has_valid = state.valid.any(dim=-1)[..., None].expand(b, h, n)
    sums = w.sum(dim=-1)
    assert_close_dtype(sums[has_valid], torch.ones_like(sums[has_valid]))
    assert not sums[~has_valid].any()
    if top_k is not None:
        assert ((w > 0).sum(dim=-1) <= top_k).all()


def permute_slots(state: MemoryState, perm) -> MemoryState:
    def p(t):
        return t.gather(2, perm if t.dim() == 3 else perm[..., None].expand_as(t))

    return state.replace(**{k: p(getattr(state, k)) for k in ("keys", "values", *META)})


@given(b=dims, h=dims, n=sizes, m=sizes, top_k=top_ks, gated=st.booleans(), seed=seeds)
def test_permuting_slots_leaves_the_read_unchanged(device, b, h, n, m, top_k, gated, seed):
    gen = torch.Generator().manual_seed(seed)
    state = random_state(b, h, m, 3, 2, generator=gen, device=device)
    perm = torch.rand(b, h, m, generator=gen).argsort(dim=-1).to(device)
    permuted = permute_slots(state, perm)
    q = torch.randn(b, h, n, 3, generator=gen, dtype=torch.float64).to(device)
    kw = dict(top_k=top_k, gated_scores=gated)
    assert_close_dtype(read(q, permuted, **kw), read(q, state, **kw))
    assert_close_dtype(ref.read(q, permuted, **kw), ref.read(q, state, **kw))
    assert_close_dtype(read_usage(q, permuted, **kw), read_usage(q, state, **kw).gather(2, perm))


@given(
    b=st.integers(2, 4),
    h=dims,
    n=sizes,
    m=sizes,
    top_k=top_ks,
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    seed=seeds,
)
def test_batch_rows_never_affect_each_other(device, b, h, n, m, top_k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    state = random_state(b, h, m, 3, 2, dtype=dtype, generator=gen, device=device)
    other = random_state(b, h, m, 3, 2, dtype=dtype, generator=gen, device=device)
    q = torch.randn(b, h, n, 3, generator=gen).to(device, dtype)
    q2 = torch.randn(b, h, n, 3, generator=gen).to(device, dtype)
    j = int(torch.randint(b, (1,), generator=gen))
    row = torch.arange(b, device=device) == j
    # row j gets entirely different inputs and memory
    state2 = MemoryState(
        **{k: torch.where(row.view(-1, *[1] * (v.dim() - 1)), getattr(other, k), v) for k, v in state.to_dict().items()}
    )
    q2 = torch.where(row[:, None, None, None], q2, q)
    keep = ~row
    for fn in (read, read_usage, ref.read):
        a, c = fn(q, state, top_k=top_k), fn(q2, state2, top_k=top_k)
        assert torch.equal(a[keep], c[keep]), fn


@given(b=dims, h=dims, n=sizes, m=sizes, extra=st.integers(0, 3), gated=st.booleans(), seed=seeds)
def test_top_k_at_least_valid_count_is_the_full_read(device, b, h, n, m, extra, gated, seed):
    gen = torch.Generator().manual_seed(seed)
    state = random_state(b, h, m, 3, 2, generator=gen, device=device)
    q = torch.randn(b, h, n, 3, generator=gen, dtype=torch.float64).to(device)
    k = int(state.valid.sum(dim=-1).max()) + extra
    if k == 0:
        k = 1
    for fn in (read, ref.read):
        assert_close_dtype(fn(q, state, top_k=k, gated_scores=gated), fn(q, state, gated_scores=gated))
    assert_close_dtype(read_usage(q, state, top_k=k, gated_scores=gated), read_usage(q, state, gated_scores=gated))


@given(
    b=dims,
    h=dims,
    n=sizes,
    m=sizes,
    top_k=top_ks,
    gated=st.booleans(),
    scale=st.sampled_from([None, 1.0, 0.3]),
    seed=seeds,
)
def test_fast_matches_reference_on_random_shapes(b, h, n, m, top_k, gated, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    state = random_state(b, h, m, 2, 3, generator=gen, p_valid=float(torch.rand((), generator=gen)))
    q = torch.randn(b, h, n, 2, generator=gen, dtype=torch.float64)
    check_against_reference(q, state, top_k=top_k, gated_scores=gated, scale=scale)
    mask = torch.rand(b, n, generator=gen) < 0.5
    kw = dict(top_k=top_k, gated_scores=gated, scale=scale, mask=mask)
    assert_close_dtype(read_usage(q, state, **kw), ref.read_usage(q, state, **kw))


def test_read_has_value_semantics():
    state = random_state(2, 2, 5, 3, 4)
    before = state.clone()
    q = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    read(q, state), read(q, state, top_k=2), read_usage(q, state)
    for k, v in state.to_dict().items():
        assert torch.equal(v, getattr(before, k)), k


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fn", [read, ref.read, read_usage], ids=["fast", "reference", "usage"])
def test_read_rejects_bad_input(fn):
    state = MemoryState.empty(2, 3, 4, 5, 6, dtype=torch.float32)
    q = torch.randn(2, 3, 7, 5)
    cases = [
        (torch.randn(2, 3, 5), {}, ValueError, r"q must be \(b h n dk\), got shape \(2, 3, 5\)"),
        (
            torch.randn(1, 3, 7, 5),
            {},
            ValueError,
            r"must have \(b, h, dk\) = \(2, 3, 5\) to match the memory state, got \(1, 3, 5\)",
        ),
        (torch.randn(2, 4, 7, 5), {}, ValueError, r"= \(2, 3, 5\) to match the memory state, got \(2, 4, 5\)"),
        (torch.randn(2, 3, 7, 6), {}, ValueError, r"= \(2, 3, 5\) to match the memory state, got \(2, 3, 6\)"),
        (q.double(), {}, TypeError, r"q has dtype torch.float64 but the memory state stores torch.float32"),
        (q.numpy(), {}, TypeError, r"q must be a Tensor \(b h n dk\), got ndarray"),
        (q, dict(top_k=0), ValueError, r"top_k must be >= 1, got 0"),
        (q, dict(top_k=-2), ValueError, r"top_k must be >= 1, got -2"),
        (q, dict(top_k=2.0), TypeError, r"top_k must be an int or None, got float"),
        (q, dict(top_k=True), TypeError, r"top_k must be an int or None, got bool"),
        (q, dict(scale=0.0), ValueError, r"scale must be > 0, got 0.0"),
        (q, dict(scale="1"), TypeError, r"scale must be a float or None, got str"),
    ]
    for bad_q, kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn(bad_q, state, **kw)
    with pytest.raises(TypeError, match=r"state must be a MemoryState, got dict"):
        fn(q, state.to_dict())
    with pytest.raises(ValueError, match=r"q is on meta but the memory state is on cpu"):  # any other device
        fn(q.to("meta"), state)


# ---------------------------------------------------------------------------------- torch.compile


COMPILE_NOISE = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"  # raised inside torch


@pytest.mark.filterwarnings(COMPILE_NOISE)
@pytest.mark.parametrize("top_k", [None, 2])
def test_compiled_read_matches_eager(top_k):
    torch._dynamo.reset()
    state = random_state(2, 2, 5, 4, 3, dtype=torch.float32)
    q = torch.randn(2, 2, 3, 4)
    compiled = torch.compile(lambda q, s: read(q, s, top_k=top_k), fullgraph=True)
    assert_close_dtype(compiled(q, state), read(q, state, top_k=top_k))


def test_read_usage_top_k_credits_exactly_the_slots_read_uses_on_ties():
    """Three identical writes tie exactly; top_k=1 credits one slot per query, as read() uses one."""
    state = MemoryState.empty(1, 1, 4, 2, 2, dtype=torch.float64)
    k, v = torch.randn(1, 1, 1, 2, dtype=torch.float64), torch.randn(1, 1, 1, 2, dtype=torch.float64)
    g = torch.full((1, 1, 3), 0.5, dtype=torch.float64)
    state = write(state, k.expand(1, 1, 3, 2), v.expand(1, 1, 3, 2), g)
    q = torch.randn(1, 1, 5, 2, dtype=torch.float64)
    usage = read_usage(q, state, top_k=1)
    assert int((usage > 0).sum()) == 1 and float(usage.sum()) == pytest.approx(5.0)
    assert_close_dtype(read(q, state, top_k=1), v.expand(1, 1, 5, 2) * 0.5)
