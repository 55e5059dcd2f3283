"""WithMemory / ResidualMemory / MemoryStates: identity at insertion, segment semantics, padding,
per-row reset and reordering, gradients, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from memgpt import MemoryLayer, MemoryState
from memgpt.integrations import (
    DROP_IN_FUSION_BIAS,
    MemoryStates,
    ResidualMemory,
    WithMemory,
    drop_in_bias,
    drop_in_memory,
)
from memgpt.testing import assert_close_dtype

F64 = torch.float64
D = 16


@torch.no_grad()
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())  # relative norm of the change


def assert_states_equal(a: MemoryState, b: MemoryState) -> None:
    for name, t in a.to_dict().items():
        assert_close_dtype(t, getattr(b, name), msg=f"MemoryState.{name} differs")


def encoder_layer() -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(D, nhead=4, dim_feedforward=32, dropout=0.0, batch_first=True).double().eval()


class UserBlock(nn.Module):
    """A user's own block with a keyword argument: a residual MLP scaled by ``gain``."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x: torch.Tensor, *, gain: float = 1.0) -> torch.Tensor:
        return x + gain * self.mlp(x)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_insertion_is_near_identity_on_both_calls(device, scale):
    """< 1% relative change of the block's output, on the first call (empty memory) and on the
    second (memory holding the first call's 12 tokens), whatever the scale of the stream."""
    block = encoder_layer().to(device)
    wrapped = WithMemory(block, drop_in_memory(D, capacity=32, heads=4)).to(device=device, dtype=F64)
    x1, x2 = (scale * torch.randn(3, 12, D, dtype=F64, device=device) for _ in range(2))
    with torch.no_grad():
        y1, state = wrapped(x1)
        y2, state2 = wrapped(x2, state)
        assert bool(state.valid.all(dim=1)[:, :12].all()), "the first call's tokens were not written"
        assert rel(y1, block(x1)) < 0.01
        assert rel(y2, block(x2)) < 0.01
        # The second call reads the memory: not the empty-memory output.
        assert rel(y2, wrapped(x2)[0]) > 1e-6


def test_drop_in_memory_defaults():
    layer = drop_in_memory(D, capacity=8)
    assert DROP_IN_FUSION_BIAS == 6.0
    assert layer.fusion.bias_init == DROP_IN_FUSION_BIAS
    assert isinstance(layer, MemoryLayer) and layer.capacity == 8 and layer.heads == 1
    assert drop_in_memory(D, capacity=8, heads=2, eviction="usage", fusion_bias_init=0.0).fusion.bias_init == 0.0
    # k inserted layers: 1 - lambda = exp(-bias) shrinks by k, so k layers change as much as one.
    assert drop_in_bias(1) == DROP_IN_FUSION_BIAS
    one = 1 - torch.sigmoid(torch.tensor(drop_in_bias(1), dtype=F64))
    twelve = 1 - torch.sigmoid(torch.tensor(drop_in_bias(12), dtype=F64))
    assert abs(12 * twelve / one - 1) < 0.01
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="layers must be an int >= 1"):
            drop_in_bias(bad)


def test_residual_memory_formula(device):
    """y = rms(h) * Fusion(u, Read(u, M)) with u = h / rms(h); the store gets Write(u, M)."""
    layer = MemoryLayer(D, heads=2, capacity=16).to(device=device, dtype=F64)
    rm = ResidualMemory(layer, eps=1e-6)
    h0, h = torch.randn(2, 5, D, dtype=F64, device=device), 7 * torch.randn(2, 4, D, dtype=F64, device=device)
    _, state = rm(h0)
    y, new = rm(h, state)
    rms = (h.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    u = h / rms
    r = layer.reader(u, state)
    lam = torch.sigmoid(layer.fusion.gate_proj(torch.cat([u, r], dim=-1)))
    assert_close_dtype(y, rms * (lam * u + (1 - lam) * r))
    assert_states_equal(new, layer.write(u, state))


def test_residual_memory_is_scale_equivariant(device):
    """rm(c h) = c rm(h) and the same store: the memory sees only the stream's direction."""
    rm = ResidualMemory(drop_in_memory(D, capacity=16, heads=2), eps=1e-30).to(device=device, dtype=F64)
    h1, h2 = torch.randn(2, 2, 6, D, dtype=F64, device=device)
    y, state = rm(h2, rm(h1)[1])
    for c in (1e-4, 3e2):
        yc, state_c = rm(c * h2, rm(c * h1)[1])
        assert_close_dtype(yc / c, y)
        assert_states_equal(state_c, state)


def test_a_call_never_reads_its_own_writes(device):
    """Each call is one segment: with an identity block, token t's output depends on token t and
    the memory of earlier calls only; changing another token of the same call leaves it alone."""
    wrapped = WithMemory(nn.Identity(), MemoryLayer(D, heads=2, capacity=32)).to(device=device, dtype=F64)
    x1, x2 = torch.randn(2, 2, 6, D, dtype=F64, device=device)
    _, state = wrapped(x1)
    y, _ = wrapped(x2, state)
    x2b = x2.clone()
    x2b[:, 3] += 1.0
    yb, _ = wrapped(x2b, state)
    keep = [0, 1, 2, 4, 5]
    assert torch.equal(y[:, keep], yb[:, keep])
    assert not torch.equal(y[:, 3], yb[:, 3])
    # ... while the earlier call's tokens do reach it, through the memory.
    x1b = x1.clone()
    x1b[:, 0] += 1.0
    assert not torch.equal(wrapped(x2, wrapped(x1b)[1])[0], y)


def test_padding_is_never_written(device):
    """mask False positions take no slot: each row's store equals the store of its real tokens alone."""
    wrapped = WithMemory(UserBlock(), MemoryLayer(D, heads=2, capacity=8)).to(device=device, dtype=F64)
    x = torch.randn(3, 6, D, dtype=F64, device=device)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0], [1, 0, 1, 0, 1, 0]], dtype=torch.bool, device=device)
    _, state = wrapped(x, mask=mask)
    assert state.count.tolist() == [6, 3, 3]
    for i in range(3):
        _, alone = wrapped(x[i : i + 1, mask[i]])
        assert_states_equal(state.index_select(torch.tensor([i], device=device)), alone)


def test_block_kwargs_reach_the_block(device):
    wrapped = WithMemory(UserBlock(), drop_in_memory(D, capacity=8)).to(device=device, dtype=F64)
    x = torch.randn(2, 3, D, dtype=F64, device=device)
    y0, _ = wrapped(x, gain=0.0)
    assert rel(y0, x) < 0.01
    assert not torch.allclose(wrapped(x, gain=1.0)[0], y0)
    # A TransformerEncoderLayer's own padding mask (True = pad, its convention) passes through.
    layer = WithMemory(encoder_layer(), drop_in_memory(D, capacity=8)).to(device=device, dtype=F64)
    pad = torch.tensor([[False, False, True], [False, False, False]], device=device)
    y, state = layer(x, mask=~pad, src_key_padding_mask=pad)
    assert state.count.tolist() == [2, 3]
    assert_close_dtype(y[0, :2], layer(x[:1, :2])[0][0])


def test_reset_rows_and_index_select_through_the_wrapper(device):
    wrapped = WithMemory(encoder_layer(), drop_in_memory(D, capacity=16, heads=2)).to(device=device, dtype=F64)
    x1, x2 = torch.randn(2, 3, 5, D, dtype=F64, device=device)
    with torch.no_grad():
        _, state = wrapped(x1)
        y, _ = wrapped(x2, state)
        # Row 1 starts a new document: it computes as with a fresh memory; rows 0 and 2 are untouched.
        reset = torch.tensor([False, True, False], device=device)
        y_reset, _ = wrapped(x2, state.reset_rows(reset))
        assert_close_dtype(y_reset[1], wrapped(x2[1:2])[0][0])
        assert torch.equal(y_reset[[0, 2]], y[[0, 2]])
        # Reordered / duplicated rows (beam search) compute the reordered outputs.
        idx = torch.tensor([2, 0, 0, 1], device=device)
        y_sel, state_sel = wrapped(x2[idx], state.index_select(idx))
        assert_close_dtype(y_sel, y[idx])
        assert state_sel.batch_size == 4


def test_gradients_cross_calls_until_detached(device):
    wrapped = WithMemory(UserBlock(), MemoryLayer(D, capacity=8)).to(device=device, dtype=F64)
    x1 = torch.randn(2, 4, D, dtype=F64, device=device, requires_grad=True)
    x2 = torch.randn(2, 4, D, dtype=F64, device=device)
    _, state = wrapped(x1)
    wrapped(x2, state)[0].sum().backward()
    assert x1.grad is not None and x1.grad.abs().sum() > 0
    for p in wrapped.memory.layer.parameters():
        assert p.grad is not None
    y, _ = wrapped(x2, state.detach())
    x1.grad = None
    y.sum().backward()
    assert x1.grad is None


def test_gradcheck_through_the_residual_memory():
    rm = ResidualMemory(MemoryLayer(4, heads=2, capacity=3)).double()
    h1 = torch.randn(1, 3, 4, dtype=F64)
    h2 = torch.randn(1, 2, 4, dtype=F64, requires_grad=True)
    _, state = rm(h1)
    assert torch.autograd.gradcheck(lambda h: rm(h, state)[0], (h2,))


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="batch_first=True"):
        WithMemory(nn.TransformerEncoderLayer(D, nhead=2), drop_in_memory(D, capacity=4))
    with pytest.raises(TypeError, match="MemoryLayer or ResidualMemory, got Linear"):
        WithMemory(nn.Identity(), nn.Linear(D, D))
    with pytest.raises(TypeError, match="torch.nn.Module, got function"):
        WithMemory(lambda x: x, drop_in_memory(D, capacity=4))
    with pytest.raises(ValueError, match=r"input's shape \(2, 3, 16\), got \(2, 3, 8\)"):
        WithMemory(nn.Linear(D, 8), drop_in_memory(D, capacity=4))(torch.randn(2, 3, D))
    with pytest.raises(ValueError, match="last dimension d = 16, got 8"):
        WithMemory(nn.Identity(), drop_in_memory(D, capacity=4))(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="eps must be a float > 0, got 0"):
        ResidualMemory(drop_in_memory(D, capacity=4), eps=0)
    with pytest.raises(TypeError, match="MemoryLayer, got Identity"):
        ResidualMemory(nn.Identity())
    wrapped = WithMemory(nn.Identity(), drop_in_memory(D, capacity=4))
    _, state = wrapped(torch.randn(2, 3, D))
    with pytest.raises(ValueError, match="expected batch size 3, got 2"):
        wrapped(torch.randn(3, 3, D), state)


# ============================================================================ MemoryStates
def test_memory_states_container():
    layer = drop_in_memory(D, capacity=4, heads=2)
    a = layer(torch.randn(3, 2, D))[1]
    b = layer(torch.randn(3, 5, D))[1]
    states = MemoryStates((a, b))
    assert len(states) == 2 and states.batch_size == 3 and states[1] is b
    assert "layers=2, batch_size=3, heads=2, capacity=4" in repr(states)
    reset = states.reset_rows(torch.tensor([True, False, False]))
    assert all(not bool(m.valid[0].any()) and bool(m.valid[1].any()) for m in reset)
    sel = states.index_select(torch.tensor([2, 2]))
    assert sel.batch_size == 2 and torch.equal(sel[0].keys[1], a.keys[2])
    assert states.to(dtype=torch.float64)[0].dtype == torch.float64
    assert all(not m.keys.requires_grad for m in states.detach())


def test_memory_states_errors():
    layer = drop_in_memory(D, capacity=4)
    a = layer(torch.randn(3, 2, D))[1]
    with pytest.raises(TypeError, match="tuple of MemoryState, got list"):
        MemoryStates([a])
    with pytest.raises(TypeError, match="tuple of MemoryState, got tuple of MemoryState, Tensor"):
        MemoryStates((a, torch.zeros(1)))
    with pytest.raises(ValueError, match=r"one batch size, got \[3, 2\]"):
        MemoryStates((a, layer(torch.randn(2, 2, D))[1]))
    with pytest.raises(ValueError, match=r"mask must be \(b,\) = \(3,\)"):
        MemoryStates((a,)).reset_rows(torch.tensor([True]))


def test_integrations_import_no_transformers():
    """memgpt.integrations (and the hf module itself) import without pulling in transformers."""
    code = "import sys, memgpt.integrations, memgpt.integrations.hf; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_transformers_names_the_extra(monkeypatch):
    from memgpt.integrations.hf import MemoryModel

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'memgpt-layers\[hf\]'"):
        MemoryModel(nn.Identity(), after=[0], capacity=4)
