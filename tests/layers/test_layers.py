"""MultiHeadAttention and MemoryLayer: causality, caches, masks, dtypes, gradcheck, compile, errors."""

from __future__ import annotations

import pytest
import torch

from memgpt import KVCache, MemoryLayer, MemoryState, MultiHeadAttention
from memgpt.testing import assert_close_dtype, tolerance

F64 = torch.float64
EVICTIONS = ("fifo", "strength", "usage")


def randomise(module: torch.nn.Module, std: float = 0.5) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def assert_states_equal(a: MemoryState, b: MemoryState) -> None:
    for name, t in a.to_dict().items():
        assert_close_dtype(t, getattr(b, name), msg=f"MemoryState.{name} differs")


# ============================================================================ MultiHeadAttention
@pytest.fixture
def attn(device) -> MultiHeadAttention:
    return MultiHeadAttention(8, 2).to(device=device, dtype=F64)


@pytest.mark.parametrize("t", [0, 2, 5])
def test_attention_is_causal(attn, device, t):
    x = torch.randn(2, 6, 8, dtype=F64, device=device)
    y, _ = attn(x)
    x2 = x.clone()
    x2[:, t] += torch.randn(2, 8, dtype=F64, device=device)
    y2, _ = attn(x2)
    assert torch.equal(y[:, :t], y2[:, :t]), "an output before the changed token moved"
    assert not torch.equal(y[:, t], y2[:, t])


def test_attention_kv_cache_incremental_equals_full(attn, device):
    x = torch.randn(2, 7, 8, dtype=F64, device=device)
    full, full_cache = attn(x)
    outs, cache = [], None
    for lo, hi in [(0, 3), (3, 3), (3, 5), (5, 6), (6, 7)]:  # includes an empty call
        y, cache = attn(x[:, lo:hi], cache)
        outs.append(y)
        assert cache.keys.shape == (2, 2, hi, 4)
    assert_close_dtype(torch.cat(outs, dim=1), full)
    assert_close_dtype(cache.keys, full_cache.keys)
    assert_close_dtype(cache.values, full_cache.values)
    assert isinstance(cache.detach(), KVCache)


def test_attention_explicit_mask_is_a_masked_softmax(attn, device):
    """attn_mask (b n t+n), True = may attend, against softmax attention written out by hand."""
    b, n, t, h, dh = 2, 4, 3, 2, 4
    _, cache = attn(torch.randn(b, t, 8, dtype=F64, device=device))
    x = torch.randn(b, n, 8, dtype=F64, device=device)
    allowed = torch.rand(b, n, t + n, device=device) < 0.5
    allowed[:, :, t:] |= torch.eye(n, dtype=torch.bool, device=device)  # every query sees a key
    y, _ = attn(x, cache, attn_mask=allowed)

    q, k, v = attn.project(x)
    k, v = torch.cat([cache.keys, k], dim=2), torch.cat([cache.values, v], dim=2)
    expected = torch.zeros(b, n, h * dh, dtype=F64, device=device)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                js = allowed[bi, i].nonzero().flatten().tolist()
                scores = torch.stack([q[bi, hi, i] @ k[bi, hi, j] for j in js]) / dh**0.5
                w = torch.softmax(scores, dim=0)
                expected[bi, i, hi * dh : (hi + 1) * dh] = sum(w[a] * v[bi, hi, j] for a, j in enumerate(js))
    assert_close_dtype(y, attn.out_proj(expected))


def test_attention_bad_input():
    attn = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"dim \(6\) must be divisible by heads \(4\)"):
        MultiHeadAttention(6, 4)
    with pytest.raises(ValueError, match=r"heads must be >= 1, got 0"):
        MultiHeadAttention(8, 0)
    with pytest.raises(ValueError, match=r"\(b n d\) with d = 8, got shape \(3, 8\)"):
        attn(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"last dimension d = 8, got 7"):
        attn(torch.randn(1, 3, 7))
    with pytest.raises(TypeError, match=r"floating point, got torch.int64"):
        attn(torch.ones(1, 3, 8, dtype=torch.long))
    with pytest.raises(TypeError, match=r"x must be a Tensor"):
        attn([[0.0] * 8])
    with pytest.raises(TypeError, match=r"cache must be a KVCache, got tuple"):
        attn(torch.randn(1, 3, 8), (torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4)))
    bad = KVCache(torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 4))
    with pytest.raises(ValueError, match=r"\(b, h, dh\) = \(1, 2, 4\), got \(2, 2, 1, 4\)"):
        attn(torch.randn(1, 3, 8), bad)
    bad_shape = r"attn_mask must be bool \(b n t\+n\) = \(1, 3, 3\), got torch.bool \(1, 3, 4\)"
    with pytest.raises(ValueError, match=bad_shape):
        attn(torch.randn(1, 3, 8), attn_mask=torch.ones(1, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"got torch.float32 \(1, 3, 3\)"):
        attn(torch.randn(1, 3, 8), attn_mask=torch.ones(1, 3, 3))


# ============================================================================ MemoryLayer
def make_layer(device, dtype=F64, **kw) -> MemoryLayer:
    kw = dict(heads=2, capacity=4) | kw
    return randomise(MemoryLayer(8, **kw)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("eviction", EVICTIONS)
def test_state_none_is_the_empty_state(device, eviction):
    layer = make_layer(device, eviction=eviction)
    x = torch.randn(3, 5, 8, dtype=F64, device=device)
    y_none, s_none = layer(x)
    y_empty, s_empty = layer(x, layer.empty_state(3, device=device, dtype=F64))
    assert_close_dtype(y_none, y_empty)
    assert_states_equal(s_none, s_empty)
    assert s_none.dtype == F64 and s_none.device.type == device.type


@pytest.mark.parametrize("eviction", EVICTIONS)
def test_every_token_reads_the_memory_as_it_was_before_the_call(device, eviction):
    layer = make_layer(device, eviction=eviction)
    _, before = layer(torch.randn(2, 3, 8, dtype=F64, device=device))
    x = torch.randn(2, 6, 8, dtype=F64, device=device)
    y, _ = layer(x, before)
    # y is the fusion of x with a read of `before`: none of this call's writes is visible.
    assert_close_dtype(y, layer.fusion(x, layer.reader(x, before)))
    # Hence token 0's output ignores the later tokens of the call entirely.
    x2 = x.clone()
    x2[:, 1:] = torch.randn(2, 5, 8, dtype=F64, device=device)
    y2, _ = layer(x2, before)
    assert torch.equal(y[:, 0], y2[:, 0])


@pytest.mark.parametrize("eviction", EVICTIONS)
def test_padding_is_never_written(device, eviction):
    layer = make_layer(device, eviction=eviction, capacity=3)
    x = torch.randn(3, 6, 8, dtype=F64, device=device)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool, device=device)
    _, s1 = layer(x, mask=mask)
    _, s2 = layer(x, s1, mask=mask)
    assert s1.count.tolist() == [6, 3, 0] and s2.count.tolist() == [12, 6, 0]
    assert s2.valid.sum(dim=-1).tolist() == [[3, 3], [3, 3], [0, 0]]
    assert not s2.valid[2].any() and torch.equal(s2.keys[2], torch.zeros_like(s2.keys[2]))
    # Row 1 stores exactly what it stores when fed only its real tokens.
    real = mask[1]
    _, alone1 = layer(x[1:2, real])
    _, alone2 = layer(x[1:2, real], alone1)
    assert_states_equal(s2.index_select(torch.tensor([1], device=device)), alone2)


def test_bf16_state_under_fp32_model(device):
    """A bf16 store with fp32 activations: y keeps x's dtype, the store keeps bf16, and the only
    difference from an fp32 store is the bf16 rounding (bf16 table tolerance)."""
    layer = randomise(MemoryLayer(8, heads=2, capacity=4), std=0.3).to(device)
    x1, x2 = torch.randn(2, 5, 8, device=device), torch.randn(2, 3, 8, device=device)
    s = layer.empty_state(2, device=device, dtype=torch.bfloat16)
    y1, s1 = layer(x1, s)
    y2, s2 = layer(x2, s1)
    assert y1.dtype == y2.dtype == torch.float32
    assert s1.dtype == s2.dtype == torch.bfloat16
    assert s2.strength.dtype == torch.float32 and torch.isfinite(y2).all()
    r1, f1 = layer(x1)
    r2, _ = layer(x2, f1)
    torch.testing.assert_close(y2, r2, **tolerance(torch.bfloat16))
    # and the state is not silently converted by a float32 call
    assert layer(x2, s2)[1].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "eviction, top_k, gated_scores",
    [
        ("fifo", None, False),
        ("strength", None, False),
        ("usage", None, False),
        ("fifo", 2, False),
        ("fifo", None, True),
        ("strength", None, True),
        ("usage", 2, True),
    ],
)
def test_gradcheck_through_memory_across_two_calls(eviction, top_k, gated_scores):
    """float64 gradcheck of y1, y2 w.r.t. x1, x2; the capacity (3) is below the 6 writes, so
    eviction is exercised, and d y2 / d x1 is nonzero: gradients flow through the memory."""
    layer = randomise(MemoryLayer(4, heads=1, capacity=3, eviction=eviction, top_k=top_k, gated_scores=gated_scores))
    layer = layer.double()
    x1 = torch.randn(2, 4, 4, dtype=F64, requires_grad=True)
    x2 = torch.randn(2, 2, 4, dtype=F64, requires_grad=True)

    def two_calls(x1, x2):
        y1, s = layer(x1)
        y2, s = layer(x2, s)
        return y1, y2, s.keys, s.values

    (d_x1,) = torch.autograd.grad(two_calls(x1, x2)[1].sum(), x1)
    assert d_x1.abs().sum() > 0, "no gradient reaches the first call through memory"
    assert torch.autograd.gradcheck(two_calls, (x1, x2))


# ---------------------------------------------------------------------------- torch.compile
def _compile_matches_eager(backend: str, eviction: str, top_k) -> None:
    torch._dynamo.reset()
    layer = randomise(MemoryLayer(8, heads=2, capacity=3, eviction=eviction, top_k=top_k), std=0.3)
    x1, x2 = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    s0 = layer.empty_state(2)
    compiled = torch.compile(layer.forward, fullgraph=True, backend=backend)
    y1c, s1c = compiled(x1, s0)
    y2c, s2c = compiled(x2, s1c)  # same shapes: the same graph, now with a non-empty store
    y1, s1 = layer(x1, s0)
    y2, s2 = layer(x2, s1)
    assert_close_dtype(y1c, y1)
    assert_close_dtype(y2c, y2)
    assert_states_equal(s2c, s2)


def test_compile_fullgraph_matches_eager():
    """fullgraph=True (no graph break) through dynamo + AOTAutograd; fast enough for every run."""
    _compile_matches_eager("aot_eager", "strength", 2)


@pytest.mark.slow
@pytest.mark.parametrize("eviction, top_k", [("fifo", None), ("usage", 2)])
def test_compile_inductor_matches_eager(eviction, top_k):
    """The same through inductor (generated C++ kernels; ~25 s of compilation per variant)."""
    _compile_matches_eager("inductor", eviction, top_k)


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        (dict(dim=6, heads=4, capacity=3), ValueError, r"dim \(6\) must be divisible by heads \(4\)"),
        (dict(dim=8, capacity=0), ValueError, r"capacity must be >= 1, got 0"),
        (dict(dim=8, capacity=2.5), TypeError, r"capacity must be an int, got float \(2.5\)"),
        (
            dict(dim=8, capacity=3, eviction="lru"),
            ValueError,
            r"eviction must be one of \('fifo', 'strength', 'usage'\), got 'lru'",
        ),
        (dict(dim=8, capacity=3, top_k=0), ValueError, r"top_k must be >= 1, got 0"),
        (dict(dim=8, capacity=3, heads=0), ValueError, r"heads must be >= 1, got 0"),
        (dict(dim=8, capacity=3, scale=-1.0), ValueError, r"scale must be > 0, got -1.0"),
        (dict(dim=8, capacity=3, usage_decay=1.5), ValueError, r"usage_decay must be a float in \[0, 1\], got 1.5"),
    ],
)
def test_memory_layer_constructor_errors(kwargs, exc, message):
    dim = kwargs.pop("dim")
    with pytest.raises(exc, match=message):
        MemoryLayer(dim, **kwargs)


def test_memory_layer_bad_input():
    layer = MemoryLayer(8, heads=2, capacity=3)
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=r"last dimension d = 8, got 6"):
        layer(torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match=r"mask must be \(b n\) = \(2, 4\), got \(2, 3\)"):
        layer(x, mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must be bool .*got torch.int64"):
        layer(x, mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected batch size 2, got 3"):
        layer(x, layer.empty_state(3))
    with pytest.raises(ValueError, match=r"expected heads 2, got 1"):
        layer(x, MemoryState.empty(2, 1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"expected capacity 3, got 5"):
        layer(x, MemoryState.empty(2, 2, 5, 4, 4))
    with pytest.raises(TypeError, match=r"state must be a MemoryState or None, got dict"):
        layer(x, {})


def test_large_fusion_bias_starts_as_identity():
    """fusion_bias_init=6 (lambda = 0.9975): inserting the layer barely changes the stream, even
    once the memory holds something (relative change < 1%)."""
    layer = MemoryLayer(16, heads=2, capacity=4, fusion_bias_init=6.0)
    x1, x2 = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    y1, s = layer(x1)
    y2, _ = layer(x2, s)
    for x, y in ((x1, y1), (x2, y2)):
        assert ((y - x).norm() / x.norm()).item() < 0.01
    # An even mix (the default bias 0) is not the identity: the bias is what does it.
    y_mix, _ = MemoryLayer(16, heads=2, capacity=4)(x2, s)
    assert ((y_mix - x2).norm() / x2.norm()).item() > 0.1
