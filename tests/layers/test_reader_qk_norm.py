"""SoftmaxReader(qk_norm=True): cosine-similarity reads with a learned per-head scale."""

from __future__ import annotations

import math

import pytest
import torch

from memgpt import MemGPTConfig, MemGPTModel, MemoryState, SoftmaxReader
from memgpt.layers.reader import QK_NORM_SCALE
from memgpt.memory import write
from memgpt.testing import assert_close_dtype

F64 = torch.float64


def filled_state(b: int, h: int, m: int, dk: int, dv: int, n: int, device) -> MemoryState:
    """A store of capacity m holding n < m random writes (so some slots are still empty)."""
    state = MemoryState.empty(b, h, m, dk, dv, device=device, dtype=F64)
    g = torch.rand(b, h, n, dtype=F64, device=device) * 0.9 + 0.05
    keys, values = (
        torch.randn(b, h, n, dk, dtype=F64, device=device),
        torch.randn(b, h, n, dv, dtype=F64, device=device),
    )
    return write(state, keys, values, g)


def by_hand(reader: SoftmaxReader, x, state: MemoryState, gated: bool):
    """softmax_i(tau_h cos(q, k_i) [+ log g_i]) v_i over valid slots, then W_o, written out."""
    b, n, _ = x.shape
    q = reader.query_proj(x).view(b, n, reader.heads, reader.key_dim).transpose(1, 2)  # (b h n dk)
    cos = torch.einsum(
        "bhnd,bhmd->bhnm",
        q / q.norm(dim=-1, keepdim=True),
        state.keys / state.keys.norm(dim=-1, keepdim=True).clamp_min(1e-300),
    )
    scores = reader.log_scale.exp()[None, :, None, None] * cos
    if gated:
        scores = scores + state.strength.log()[:, :, None, :]
    scores = scores.masked_fill(~state.valid[:, :, None, :], float("-inf"))
    out = torch.einsum("bhnm,bhme->bhne", scores.softmax(-1), state.values)
    return reader.out_proj(out.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("top_k", [None, 5, 2])
def test_cosine_read_matches_the_formula(device, gated, top_k):
    reader = SoftmaxReader(8, heads=2, qk_norm=True, top_k=top_k, gated_scores=gated).to(device=device, dtype=F64)
    with torch.no_grad():
        reader.log_scale.copy_(torch.tensor([1.0, 2.5], dtype=F64))  # different per head
    state = filled_state(2, 2, 6, 4, 4, 5, device)
    x = torch.randn(2, 3, 8, dtype=F64, device=device)
    got = reader(x, state)
    if top_k is None or top_k >= 5:
        assert_close_dtype(got, by_hand(reader, x, state, gated))
    else:  # the top-k read is the full read restricted to the k best cosine scores
        assert got.shape == (2, 3, 8) and torch.isfinite(got).all()
        assert not torch.allclose(got, by_hand(reader, x, state, gated))


def test_scores_ignore_key_and_query_length(device):
    """Scaling every stored key (and the query map) by a positive factor changes nothing."""
    reader = SoftmaxReader(8, heads=2, qk_norm=True).to(device=device, dtype=F64)
    state = filled_state(2, 2, 6, 4, 4, 6, device)
    x = torch.randn(2, 3, 8, dtype=F64, device=device)
    before = reader(x, state)
    with torch.no_grad():
        reader.query_proj.weight.mul_(7.0)
    after = reader(x, state.replace(keys=state.keys * 3.0))
    assert_close_dtype(after, before)


def test_learned_scale_starts_at_the_given_scale_and_trains():
    assert torch.allclose(SoftmaxReader(8, heads=2, qk_norm=True).log_scale, torch.full((2,), math.log(QK_NORM_SCALE)))
    reader = SoftmaxReader(8, heads=2, qk_norm=True, scale=4.0).double()
    assert torch.allclose(reader.temperature(), torch.full((2,), 4.0, dtype=F64))
    state = filled_state(1, 2, 4, 4, 4, 4, "cpu")
    reader(torch.randn(1, 3, 8, dtype=F64), state).square().sum().backward()
    assert reader.log_scale.grad is not None and bool((reader.log_scale.grad != 0).all())
    assert torch.autograd.gradcheck(lambda x: reader(x, state), (torch.randn(1, 2, 8, dtype=F64, requires_grad=True),))


def test_plain_reader_is_unchanged():
    """Without qk_norm there is no new parameter: old state dicts and checkpoints still load."""
    reader = SoftmaxReader(8, heads=2)
    assert reader.log_scale is None and reader.temperature() is None
    assert sorted(reader.state_dict()) == ["out_proj.weight", "query_proj.weight"]
    assert reader.scale == pytest.approx(4**-0.5)


def test_usage_weights_sum_to_the_tokens_read():
    reader = SoftmaxReader(8, heads=2, qk_norm=True).double()
    state = filled_state(2, 2, 6, 4, 4, 4, "cpu")
    mask = torch.tensor([[True, True, False], [True, False, False]])
    usage = reader.usage(torch.randn(2, 3, 8, dtype=F64), state, mask)
    assert torch.allclose(usage.sum(-1), torch.tensor([[2.0, 2.0], [1.0, 1.0]], dtype=F64))


def test_bad_qk_norm():
    with pytest.raises(TypeError, match="qk_norm must be a bool"):
        SoftmaxReader(8, qk_norm=1)
    with pytest.raises(TypeError, match="qk_norm must be a bool"):
        MemGPTConfig(vocab_size=10, dim=8, depth=1, heads=2, segment_len=4, memory_capacity=8, qk_norm="yes")


def test_model_with_qk_norm_streams_like_one_call():
    """MemGPTConfig.qk_norm reaches every block; token-by-token decoding equals one call."""
    cfg = MemGPTConfig(
        vocab_size=20,
        dim=16,
        depth=2,
        heads=2,
        segment_len=4,
        memory_capacity=6,
        memory_heads=2,
        qk_norm=True,
        fusion_bias_init=0.0,
    )
    model = MemGPTModel(cfg).double().eval()
    assert all(b.memory.reader.qk_norm for b in model.blocks)
    ids = torch.randint(20, (2, 15))
    with torch.no_grad():
        full = model(ids).logits
        state, steps = None, []
        for t in range(15):
            out = model(ids[:, t : t + 1], state)
            state = out.state
            steps.append(out.logits)
    assert_close_dtype(torch.cat(steps, 1), full)
    assert MemGPTConfig(**cfg.to_dict()) == cfg
