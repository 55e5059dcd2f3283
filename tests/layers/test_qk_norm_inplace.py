"""qk_norm (cosine reads) with in-place memory writes under autograd (issue #18).

The reader used to score against a normalised *copy* of the store, which a store written in
place under autograd refuses (a copy would cut its gradient), so ``inplace=True`` /
``donate_state=True`` raised. The read now normalises the keys itself: the same outputs and
gradients as the out-of-place path, through the fused CPU backward and the recomputing one.
"""

from __future__ import annotations

import pytest
import torch

from memgpt import MemGPTConfig, MemGPTModel, MemoryLayer, MemoryState
from memgpt.memory import read, read_usage, write

F64 = torch.float64


@pytest.mark.parametrize("eviction", ["fifo", "strength", "usage"])
@pytest.mark.parametrize("top_k", [None, 2])  # None: the fused read (split backward on CPU); 2: recomputed
def test_inplace_under_autograd_equals_out_of_place(device, eviction, top_k):
    layer = MemoryLayer(8, heads=2, capacity=5, qk_norm=True, top_k=top_k, eviction=eviction, fusion_bias_init=0.0)
    layer = layer.to(device=device, dtype=F64)
    xs = [torch.randn(2, n, 8, dtype=F64, device=device) for n in (3, 4, 3)]  # 10 tokens into 5 slots
    mask = torch.ones(2, 3, dtype=torch.bool, device=device)
    mask[1, 1] = False
    masks = [mask, torch.ones(2, 4, dtype=torch.bool, device=device), mask]

    def run(inplace):
        layer.zero_grad()
        leaves = [x.clone().requires_grad_() for x in xs]
        state, loss, outs = None, torch.zeros((), dtype=F64, device=device), []
        for x, m in zip(leaves, masks):
            y, state = layer(x, state, m, inplace=inplace)
            loss = loss + (y.sin() * m[..., None]).sum()
            outs.append(y.detach())
        loss.backward()
        return outs, [x.grad for x in leaves] + [p.grad.clone() for p in layer.parameters()], state

    want_out, want_grads, want_state = run(False)
    got_out, got_grads, got_state = run(True)
    assert got_state._log is not None  # the in-place path really ran logged
    for got, want in zip(got_out, want_out, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert layer.reader.log_scale.grad is not None and bool((layer.reader.log_scale.grad != 0).all())
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    for name in ("keys", "values", "strength", "valid"):
        torch.testing.assert_close(getattr(got_state, name), getattr(want_state, name), rtol=1e-12, atol=1e-12)


def test_model_donate_state_trains_like_value_semantics():
    """MemGPTConfig(qk_norm=True) with donate_state=True under autograd: the same logits and
    parameter gradients as without donation, over streamed calls that carry the state."""
    torch.manual_seed(0)
    config = MemGPTConfig(
        vocab_size=23,
        dim=16,
        depth=2,
        heads=2,
        segment_len=4,
        memory_capacity=6,
        memory_heads=2,
        qk_norm=True,
        shift_keys=True,
        fusion_bias_init=0.0,
    )
    model = MemGPTModel(config).double()
    ids = torch.randint(0, 23, (2, 17))

    def run(donate):
        model.zero_grad()
        state, loss, logits = None, 0.0, []
        for a, b in [(0, 5), (5, 13), (13, 17)]:
            out = model(ids[:, a:b], state, donate_state=donate)
            loss = loss + out.logits.sin().sum()
            logits.append(out.logits.detach())
            state = out.state
        loss.backward()
        return torch.cat(logits, 1), [p.grad.clone() for p in model.parameters()]

    want_logits, want_grads = run(False)
    got_logits, got_grads = run(True)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-12, atol=1e-12)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_read_normalize_keys_is_the_read_of_unit_keys():
    state = MemoryState.empty(2, 2, 4, 3, 2, dtype=F64)
    keys, values = torch.randn(2, 2, 3, 3, dtype=F64) * 5, torch.randn(2, 2, 3, 2, dtype=F64)
    state = write(state, keys, values, torch.rand(2, 2, 3))
    q = torch.randn(2, 2, 5, 3, dtype=F64)
    unit = state.replace(keys=torch.nn.functional.normalize(state.keys, dim=-1))
    torch.testing.assert_close(read(q, state, normalize_keys=True), read(q, unit))
    torch.testing.assert_close(read_usage(q, state, normalize_keys=True), read_usage(q, unit))
    with pytest.raises(TypeError, match="normalize_keys must be a bool, got int"):
        read(q, state, normalize_keys=1)
