"""Memory introspection of a model: memory_stats per layer, and trace_memory over forwards."""

from __future__ import annotations

import pytest
import torch

import memgpt
from memgpt import MemGPTConfig, MemGPTModel, MemoryLayer, MemoryStats, memory_stats, trace_memory
from memgpt.memory import MemoryState
from memgpt.memory.reference import read_weights

T, M = 4, 6


def tiny(eviction: str = "fifo", capacity: int = M, **kw) -> MemGPTModel:
    torch.manual_seed(0)
    config = MemGPTConfig(
        vocab_size=20,
        dim=16,
        depth=2,
        heads=2,
        segment_len=T,
        memory_capacity=capacity,
        memory_heads=2,
        eviction=eviction,
        fusion_bias_init=0.0,
        **kw,
    )
    return MemGPTModel(config).eval()


def ids(b: int = 2, n: int = 14) -> torch.Tensor:
    return torch.randint(0, 20, (b, n), generator=torch.Generator().manual_seed(1))


def hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


# ------------------------------------------------------------------------------ memory_stats


@pytest.mark.parametrize("n", [3, 4, 8, 13, 20])
def test_model_state_stats_per_layer(n):
    """Fill after n tokens is min(written, m)/m under fifo; the unfinished segment is not written yet."""
    model = tiny()
    with torch.no_grad():
        state = model(ids(n=n)).state
    stats = memory_stats(state)
    assert isinstance(stats, tuple) and len(stats) == 2 and all(isinstance(s, MemoryStats) for s in stats)
    flushed = (n // T) * T
    for s in stats:
        assert s.writes.tolist() == [flushed] * 2
        assert torch.equal(s.fill, torch.full((2, 2), min(flushed, M) / M))
        assert s.evictions.tolist() == [[max(0, flushed - M)] * 2] * 2
    assert memory_stats(state.layers[1]).writes.tolist() == [flushed] * 2  # a BlockState
    with pytest.raises(TypeError, match="MemoryState, BlockState or MemGPTState, got int"):
        memory_stats(3)


# ------------------------------------------------------------------------------ trace_memory


def test_trace_shapes_and_hooks_removed_on_exit():
    model = tiny()
    before = hooks(model)
    x = ids(n=14)
    with trace_memory(model) as trace:
        assert hooks(model) > before
        out = model(x)
    assert hooks(model) == before  # nothing left behind
    assert trace.names == ("blocks.0.memory", "blocks.1.memory") and len(trace) == 2
    for layer in trace.layers:
        assert layer.write_gate.shape == (2, 2, 14) and layer.write_gate.dtype == torch.float32
        assert layer.present.shape == (2, 14) and bool(layer.present.all())
        assert layer.memory_share.shape == (2, 14)
        assert layer.widths == (4, 4, 4, 2) and layer.starts == (0, 4, 8, 12)
        assert [s.writes.tolist() for s in layer.stores] == [[0, 0], [4, 4], [8, 8], [12, 12]]
        assert layer.slot_weight.shape == (4, 2, 2, M)
        assert bool(((layer.write_gate > 0) & (layer.write_gate < 1)).all())
        assert bool(((layer.memory_share > 0) & (layer.memory_share < 1)).all())
    torch.testing.assert_close(model(x).logits, out.logits, rtol=0, atol=0)  # tracing changed nothing


def test_recorded_write_gate_is_what_the_store_holds():
    """Under fifo with room for everything, slot s holds token s, written with the traced g."""
    model = tiny(capacity=16)
    with torch.no_grad(), trace_memory(model) as trace:
        state = model(ids(n=12)).state
    for i, layer in enumerate(trace.layers):
        mem = state.layers[i].memory
        torch.testing.assert_close(layer.write_gate, mem.strength[:, :, :12])


def test_trace_of_one_memory_layer_matches_its_parts():
    """g is the writer's gate, the memory share is 1 - lambda of the fusion, slot weights are mean beta."""
    torch.manual_seed(0)
    layer = MemoryLayer(8, heads=2, capacity=5)
    x1, x2 = torch.randn(3, 4, 8), torch.randn(3, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    with trace_memory(layer) as trace:
        _, state = layer(x1)
        layer(x2, state, mask)
    t = trace[0]
    assert t.name == "(root)" and t.widths == (4, 6)
    torch.testing.assert_close(t.write_gate, torch.cat([layer.writer(x1)[2], layer.writer(x2)[2]], dim=2))
    assert torch.equal(t.present[:, 4:], mask) and bool(t.present[:, :4].all())
    with torch.no_grad():
        r = layer.reader(x2, state)
        lam = torch.sigmoid(layer.fusion.gate_proj(torch.cat([x2, r], dim=-1)))
        torch.testing.assert_close(t.memory_share[:, 4:], (1 - lam).mean(-1))
        q = layer.reader.queries(x2, state)
        beta = read_weights(q, state, scale=layer.reader.scale)  # (b h n m)
        masked = beta * mask[:, None, :, None]
        want = masked.sum(2) / mask.sum(1).clamp_min(1)[:, None, None]
    torch.testing.assert_close(t.slot_weight[1], want)
    assert not t.slot_weight[0].any()  # the first call read an empty store
    torch.testing.assert_close(t.slot_weight[1, :2].sum(-1), torch.ones(2, 2))  # rows with real tokens
    assert t.stores[0].writes.tolist() == [0, 0, 0] and t.stores[1].writes.tolist() == [4, 4, 4]


@pytest.mark.parametrize("split", [[14], [5, 9], [1] * 14, [3, 1, 10]])
def test_streaming_calls_trace_the_same_positions(split):
    model = tiny("strength")
    x = ids(n=14)
    with torch.no_grad():
        with trace_memory(model) as whole:
            model(x)
        with trace_memory(model) as streamed:
            state, at = None, 0
            for n in split:
                state = model(x[:, at : at + n], state).state
                at += n
    for a, b in zip(whole.layers, streamed.layers):
        torch.testing.assert_close(a.write_gate, b.write_gate)
        torch.testing.assert_close(a.memory_share, b.memory_share)
        assert bool(b.present.all()) and sum(b.widths) == 14


def test_padding_is_marked_absent():
    model = tiny()
    x = ids(n=6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]])
    with torch.no_grad(), trace_memory(model) as trace:
        model(x, attention_mask=mask)
    present = trace[0].present
    # Row 1's three real tokens are packed at grid positions 0..2 (see MemGPTModel's layout).
    assert present[0].tolist() == [True] * 6 and present[1].tolist() == [True] * 3 + [False] * 3


def test_selected_layers_only_and_others_untouched():
    model = tiny()
    with trace_memory(model, layers=[1], slot_weights=False) as trace:
        assert hooks(model.blocks[0]) == 0 and hooks(model.blocks[1]) > 0
        model(ids())
    assert trace.names == ("blocks.1.memory",) and trace[0].slot_weight is None


def test_under_autograd_and_donated_states():
    """Recorded tensors carry no graph; in-place (donated) writes do not change recorded stores."""
    model = tiny(capacity=5).train()
    with trace_memory(model) as trace:
        out = model(ids(n=12), donate_state=True)
        out.logits.sum().backward()
    for layer in trace.layers:
        assert not layer.write_gate.requires_grad and not layer.memory_share.requires_grad
        assert [s.writes.tolist() for s in layer.stores] == [[0, 0], [4, 4], [8, 8]]


def test_clear_and_bad_arguments():
    model = tiny()
    trace = trace_memory(model)
    with trace:
        model(ids())
        trace.clear()
        with pytest.raises(ValueError, match="nothing was recorded for blocks.0.memory"):
            trace[0]
    with pytest.raises(RuntimeError, match="already entered"):
        trace.__enter__()
    with pytest.raises(ValueError, match=r"layers must be ints in \[0, 2\) .* got 2"):
        trace_memory(model, layers=[2])
    with pytest.raises(ValueError, match="holds no MemoryLayer"):
        trace_memory(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expects an nn.Module, got MemoryState"):
        trace_memory(MemoryState.empty(1, 1, 1, 1, 1))
    assert memgpt.trace_memory is trace_memory
