"""The seed's formulas (SPEC section 2), written out by hand in float64, against the modules.

Every hand formula below is a plain Python loop over tokens, heads and slots: it is the oracle,
so it is written to be read, not to be fast. The modules get random (non-default) parameters,
so that zero-initialised gates or biases cannot hide a missing term.

    reader weights  beta_i = softmax_i(scale * q.k_i [+ log g_i])   q = W_q x
    read            read = sum_i beta_i v_i,  r = W_o [read_1; ...; read_H]
    write gate      g = sigmoid(W_g x + b_g)            (one scalar per token and head)
    new pair        k_new = W_k x + b_k, v_new = W_v x + b_v, stored as (g k_new, g v_new)
    fusion          lambda = sigmoid(W_l [x; r] + b_l),  x~ = lambda x + (1 - lambda) r
"""

from __future__ import annotations

import math

import pytest
import torch

from memgpt import GatedFusion, MemoryLayer, MemoryState, SoftmaxReader
from memgpt.testing import assert_close_dtype

F64 = torch.float64


def randomise(module: torch.nn.Module, std: float = 0.5) -> torch.nn.Module:
    """Give every parameter random values (the default init zeroes the fusion gate)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


# ----------------------------------------------------------------------------- the hand oracle
class HandLayer:
    """The seed's memory layer for one sample, with the parameters of a ``MemoryLayer``.

    The memory is a list per head of slots ``(key, value, g, step)`` kept in write order; when
    more than ``capacity`` slots exist the oldest is dropped (fifo).
    """

    def __init__(self, layer: MemoryLayer) -> None:
        r, w, f = layer.reader, layer.writer, layer.fusion
        self.H, self.dk, self.dv, self.capacity = r.heads, r.key_dim, r.value_dim, layer.capacity
        self.scale, self.gated = r.scale, r.gated_scores
        p = lambda t: t.detach().to(F64)  # noqa: E731
        self.Wq, self.Wo = p(r.query_proj.weight), p(r.out_proj.weight)
        self.Wg, self.bg = p(w.gate_proj.weight), p(w.gate_proj.bias)
        self.Wk, self.bk = p(w.key_proj.weight), p(w.key_proj.bias)
        self.Wv, self.bv = p(w.value_proj.weight), p(w.value_proj.bias)
        self.Wl, self.bl = p(f.gate_proj.weight), p(f.gate_proj.bias)

    def empty(self) -> list[list[tuple]]:
        return [[] for _ in range(self.H)]

    def read_head(self, q: torch.Tensor, slots: list[tuple]) -> torch.Tensor:
        """sum_i softmax_i(scale q.k_i [+ log g_i]) v_i; zeros for an empty memory."""
        if not slots:
            return torch.zeros(self.dv, dtype=F64)
        scores = []
        for key, _, g, _ in slots:
            s = self.scale * float(sum(q[j] * key[j] for j in range(self.dk)))
            if self.gated:
                s += math.log(g)
            scores.append(s)
        top = max(scores)
        e = [math.exp(s - top) for s in scores]
        beta = [x / sum(e) for x in e]
        out = torch.zeros(self.dv, dtype=F64)
        for b_i, (_, value, _, _) in zip(beta, slots):
            out = out + b_i * value
        return out

    def reads(self, x: torch.Tensor, memory: list[list[tuple]]) -> torch.Tensor:
        """r (n d) for tokens x (n d) reading ``memory``: W_o [read_1; ...; read_H]."""
        rows = []
        for t in range(x.shape[0]):
            q = self.Wq @ x[t]  # (H*dk)
            heads = [self.read_head(q[h * self.dk : (h + 1) * self.dk], memory[h]) for h in range(self.H)]
            rows.append(self.Wo @ torch.cat(heads))
        return torch.stack(rows)

    def fuse(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """lambda = sigmoid(W_l [x; r] + b_l); lambda x + (1 - lambda) r, token by token."""
        out = []
        for t in range(x.shape[0]):
            lam = torch.sigmoid(self.Wl @ torch.cat([x[t], r[t]]) + self.bl)
            out.append(lam * x[t] + (1 - lam) * r[t])
        return torch.stack(out)

    def proposals(self, x_t: torch.Tensor, h: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(k_new, v_new, g) of token x_t for head h."""
        g = float(torch.sigmoid(self.Wg[h] @ x_t + self.bg[h]))
        ks, vs = slice(h * self.dk, (h + 1) * self.dk), slice(h * self.dv, (h + 1) * self.dv)
        return self.Wk[ks] @ x_t + self.bk[ks], self.Wv[vs] @ x_t + self.bv[vs], g

    def write(self, x: torch.Tensor, memory: list[list[tuple]], first_step: int) -> list[list[tuple]]:
        """M' = M u {(g k_new, g v_new)} per token, oldest dropped beyond capacity."""
        memory = [list(slots) for slots in memory]
        for t in range(x.shape[0]):
            for h in range(self.H):
                k_new, v_new, g = self.proposals(x[t], h)
                memory[h].append((g * k_new, g * v_new, g, first_step + t))
                if len(memory[h]) > self.capacity:
                    memory[h].pop(0)
        return memory

    def __call__(self, x: torch.Tensor, memory: list[list[tuple]], first_step: int):
        """One call: every token reads the memory as it was before the call, then all are written."""
        y = self.fuse(x, self.reads(x, memory))
        return y, self.write(x, memory, first_step)


def assert_memory_matches(state: MemoryState, row: int, memory: list[list[tuple]]) -> None:
    """The valid slots of ``state`` (row ``row``), ordered by write step, equal the hand memory."""
    for h, slots in enumerate(memory):
        valid = state.valid[row, h]
        assert int(valid.sum()) == len(slots), f"head {h}: {int(valid.sum())} valid slots, expected {len(slots)}"
        order = state.step[row, h][valid].argsort()
        keys, values = state.keys[row, h][valid][order], state.values[row, h][valid][order]
        steps = state.step[row, h][valid][order]
        assert steps.tolist() == [s for *_, s in slots]
        assert_close_dtype(keys, torch.stack([k for k, *_ in slots]))
        assert_close_dtype(values, torch.stack([v for _, v, *_ in slots]))


def two_calls_match_hand(layer: MemoryLayer, hand: HandLayer, x1: torch.Tensor, x2: torch.Tensor):
    """Run ``layer`` over x1 then x2 (b n d) and assert both outputs equal the hand formulas, row
    by row. Returns the layer's states s1, s2 and, per row, the hand memories (m1, m2)."""
    y1, s1 = layer(x1)
    y2, s2 = layer(x2, s1)
    memories = []
    for b in range(x1.shape[0]):
        y1_hand, m1 = hand(x1[b], hand.empty(), 0)
        y2_hand, m2 = hand(x2[b], m1, x1.shape[1])
        assert_close_dtype(y1[b], y1_hand)
        assert_close_dtype(y2[b], y2_hand)
        memories.append((m1, m2))
    return s1, s2, memories


def seed_layer(dim: int = 6, heads: int = 1, capacity: int = 8, **kw) -> MemoryLayer:
    layer = MemoryLayer(dim, heads=heads, capacity=capacity, scale=1.0, gated_scores=False, **kw)
    return randomise(layer.to(F64))


# ----------------------------------------------------------------------------- the sub-modules
def test_writer_is_the_seed_formula():
    layer = seed_layer()
    hand = HandLayer(layer)
    x = torch.randn(2, 5, 6, dtype=F64)
    keys, values, g = layer.writer(x)  # (b h n dk), (b h n dv), (b h n)
    for b in range(2):
        for t in range(5):
            k_new, v_new, g_hand = hand.proposals(x[b, t], 0)
            assert_close_dtype(keys[b, 0, t], k_new)
            assert_close_dtype(values[b, 0, t], v_new)
            assert_close_dtype(g[b, 0, t], torch.tensor(g_hand, dtype=F64))


def test_fusion_is_the_seed_formula():
    fusion = randomise(GatedFusion(6).to(F64))
    x, r = torch.randn(2, 4, 6, dtype=F64), torch.randn(2, 4, 6, dtype=F64)
    W, b = fusion.gate_proj.weight.detach(), fusion.gate_proj.bias.detach()
    assert tuple(W.shape) == (6, 12), "the fusion gate is Linear(2*dim, dim) on [x; r]"
    expected = torch.empty_like(x)
    for i in range(2):
        for t in range(4):
            lam = torch.sigmoid(W @ torch.cat([x[i, t], r[i, t]]) + b)
            expected[i, t] = lam * x[i, t] + (1 - lam) * r[i, t]
    assert_close_dtype(fusion(x, r), expected)


def test_reader_is_the_seed_formula():
    """beta = softmax(q.k_i) over the valid slots only, read = sum beta_i v_i, r = W_o read."""
    reader = randomise(SoftmaxReader(6, 1, scale=1.0, gated_scores=False).to(F64))
    m = 5
    valid = torch.tensor([[[True, False, True, True, False]]])
    state = MemoryState(
        keys=torch.randn(1, 1, m, 6, dtype=F64),
        values=torch.randn(1, 1, m, 6, dtype=F64),
        valid=valid,
        strength=torch.rand(1, 1, m, dtype=F64),
        step=torch.arange(m)[None, None],
        usage=torch.zeros(1, 1, m, dtype=F64),
        count=torch.tensor([m]),
    )
    x = torch.randn(1, 3, 6, dtype=F64)
    Wq, Wo = reader.query_proj.weight.detach(), reader.out_proj.weight.detach()
    expected = torch.empty_like(x)
    for t in range(3):
        q = Wq @ x[0, t]
        idx = [i for i in range(m) if valid[0, 0, i]]
        scores = torch.stack([q @ state.keys[0, 0, i] for i in idx])
        beta = torch.exp(scores - scores.max()) / torch.exp(scores - scores.max()).sum()
        read = sum(beta[j] * state.values[0, 0, i] for j, i in enumerate(idx))
        expected[0, t] = Wo @ read
    assert_close_dtype(reader(x, state), expected)


# ----------------------------------------------------------------------------- the whole layer
@pytest.mark.parametrize("capacity", [8, 3], ids=["room", "evicting"])
def test_memory_layer_two_calls_are_the_seed_formulas(capacity):
    """heads=1, scale=1, no gated scores: y and the stored pairs are the seed's, and the second
    call reads exactly what the first wrote (with capacity 3 the oldest pairs are gone)."""
    layer = seed_layer(capacity=capacity)
    hand = HandLayer(layer)
    x1, x2 = torch.randn(2, 4, 6, dtype=F64), torch.randn(2, 3, 6, dtype=F64)
    s1, s2, memories = two_calls_match_hand(layer, hand, x1, x2)
    for b, (m1, m2) in enumerate(memories):
        assert_memory_matches(s1, b, m1)
        assert_memory_matches(s2, b, m2)
    # The first call reads an empty memory: r = 0, so y1 = lambda x1 with lambda = sigmoid(W_l [x; 0] + b_l).
    lam = torch.sigmoid(layer.fusion.gate_proj(torch.cat([x1, torch.zeros_like(x1)], dim=-1)))
    assert_close_dtype(layer(x1)[0], lam * x1)
    # The second call really depends on the first (the memory is in the path).
    y2 = layer(x2, s1)[0]
    y2_fresh, _ = layer(x2)
    assert (y2 - y2_fresh).abs().max() > 1e-3


def test_default_scale_is_inverse_sqrt_key_dim():
    layer = randomise(MemoryLayer(6, capacity=8, gated_scores=False, key_dim=4).to(F64))
    assert layer.reader.scale == pytest.approx(4**-0.5)
    hand = HandLayer(layer)
    assert hand.scale == pytest.approx(0.5)
    two_calls_match_hand(layer, hand, torch.randn(1, 4, 6, dtype=F64), torch.randn(1, 3, 6, dtype=F64))


def test_gated_scores_add_log_g_formula():
    """gated_scores=True: score_i = scale q.k_i + log g_i, exact in float64 (float64 metadata)."""
    layer = randomise(MemoryLayer(6, capacity=8, scale=1.0, gated_scores=True).to(F64))
    hand = HandLayer(layer)
    assert hand.gated
    x1, x2 = torch.randn(1, 5, 6, dtype=F64), torch.randn(1, 3, 6, dtype=F64)
    s1, _, [(m1, _)] = two_calls_match_hand(layer, hand, x1, x2)
    y2, _ = layer(x2, s1)
    # And the log g term matters: without it the read differs.
    hand.gated = False
    y2_ungated, _ = hand(x2[0], m1, 5)
    assert (y2[0] - y2_ungated).abs().max() > 1e-6


def test_multi_head_concat_order():
    """Head h uses query rows [h dk, (h+1) dk), gate row h, key/value rows of block h, and its read
    multiplies columns [h dv, (h+1) dv) of W_o. Different dk and dv catch a swapped layout."""
    layer = randomise(MemoryLayer(6, heads=2, capacity=8, key_dim=3, value_dim=2, scale=1.0, gated_scores=False))
    layer = layer.to(F64)
    assert tuple(layer.reader.query_proj.weight.shape) == (6, 6)
    assert tuple(layer.reader.out_proj.weight.shape) == (6, 4)
    assert tuple(layer.writer.gate_proj.weight.shape) == (2, 6)
    hand = HandLayer(layer)
    x1, x2 = torch.randn(2, 4, 6, dtype=F64), torch.randn(2, 3, 6, dtype=F64)
    s1, s2, memories = two_calls_match_hand(layer, hand, x1, x2)
    for b, (_, m2) in enumerate(memories):
        assert_memory_matches(s2, b, m2)
    y2 = layer(x2, s1)[0]
    # Swapping the two heads' halves of W_o changes the output: the order is observable.
    with torch.no_grad():
        layer.reader.out_proj.weight.copy_(layer.reader.out_proj.weight[:, [2, 3, 0, 1]])
    y2_swapped, _ = layer(x2, s1)
    assert (y2_swapped - y2).abs().max() > 1e-6
