"""Induction-shaped writes: shift_keys and MemGPTConfig.shift_keys."""

from __future__ import annotations

import pytest
import torch

from memgpt import MemGPTConfig, MemGPTModel
from memgpt.layers import GatedWriter
from memgpt.layers.writer import shift_keys
from memgpt.models.model import memory_layer
from memgpt.testing import assert_close_dtype

F64 = torch.float64


def test_shift_keys_by_hand():
    keys = torch.arange(2 * 3 * 4 * 2, dtype=F64).view(2, 3, 4, 2)  # (b h n dk)
    first = -torch.ones(3, 2, dtype=F64)
    out = shift_keys(keys, first)
    assert torch.equal(out[:, :, 1:], keys[:, :, :-1])
    assert torch.equal(out[:, :, 0], first.expand(2, 3, 2))
    assert shift_keys(keys[:, :, :0], first).shape == (2, 3, 0, 2)
    with pytest.raises(ValueError, match=r"first must be \(h dk\) = \(3, 2\), got \(2, 3\)"):
        shift_keys(keys, torch.zeros(2, 3))


def test_null_key_is_the_key_of_a_zero_input():
    w = GatedWriter(8, heads=2)
    with torch.no_grad():
        w.key_proj.bias.normal_()
    keys, _, _ = w(torch.zeros(1, 1, 8))
    assert torch.equal(w.null_key(), keys[0, :, 0])


def config(**kw) -> MemGPTConfig:
    base = dict(
        vocab_size=20,
        dim=16,
        depth=2,
        heads=2,
        segment_len=4,
        memory_capacity=8,
        memory_heads=2,
        fusion_bias_init=0.0,
        shift_keys=True,
    )
    return MemGPTConfig(**{**base, **kw})


def test_stored_key_of_token_t_is_the_writer_key_of_token_t_minus_1():
    layer = memory_layer(config()).double()
    with torch.no_grad():
        layer.writer.key_proj.bias.normal_()
    x = torch.randn(2, 4, 16, dtype=F64)
    _, state = layer(x)
    keys, values, g = layer.writer(x)
    assert_close_dtype(state.keys[:, :, 1:4], g[:, :, 1:, None] * keys[:, :, :3])
    assert_close_dtype(state.keys[:, :, 0], g[:, :, 0, None] * layer.writer.null_key()[None])
    assert_close_dtype(state.values[:, :, :4], g[..., None] * values)  # values are not shifted


@pytest.mark.parametrize("qk_norm", [False, True])
def test_model_with_shift_keys_streams_like_one_call(qk_norm):
    """The shift runs over each completed segment, so token-by-token decoding and chunked calls
    store the same keys as one call."""
    model = MemGPTModel(config(qk_norm=qk_norm)).double().eval()
    plain = MemGPTModel(config(qk_norm=qk_norm, shift_keys=False)).double().eval()
    plain.load_state_dict(model.state_dict())  # no new parameter
    ids = torch.randint(20, (2, 15))
    with torch.no_grad():
        full = model(ids).logits
        state, steps = None, []
        for lo, hi in [(0, 1), (1, 6), (6, 7), (7, 15)]:
            out = model(ids[:, lo:hi], state)
            state, steps = out.state, steps + [out.logits]
        assert_close_dtype(torch.cat(steps, 1), full)
        assert torch.equal(full[:, :4], plain(ids).logits[:, :4])  # the first segment reads no memory
        assert not torch.allclose(full[:, 4:], plain(ids).logits[:, 4:])


def test_bad_shift_keys():
    with pytest.raises(TypeError, match="shift_keys must be a bool"):
        config(shift_keys=1)


def test_memory_layer_takes_the_options_itself():
    """MemoryLayer(qk_norm=..., shift_keys=...) builds the cosine reader and shifts stored keys;
    a non-bool is refused."""
    import pytest
    import torch

    from memgpt.layers import MemoryLayer

    torch.manual_seed(0)
    layer = MemoryLayer(8, heads=2, capacity=6, qk_norm=True, shift_keys=True).double()
    assert layer.reader.qk_norm and layer.shift_keys
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    _, state = layer(x)
    keys, _, strength = layer.writer(x)
    want = torch.cat([layer.writer.null_key()[None, :, None, :], keys[:, :, :2]], dim=2) * strength[..., None]
    torch.testing.assert_close(state.keys[:, :, :3], want)
    with pytest.raises(TypeError, match="shift_keys must be a bool, got str"):
        MemoryLayer(8, capacity=4, shift_keys="yes")
