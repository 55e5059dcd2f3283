"""MemGPTBlock in whole-segment mode (no SegmentView) against a hand composition of its parts.

h  = x + SelfAttention(attn_norm(x))
u  = memory_norm(h)
h' = h + (Fusion(u, Read(u, M)) - u)
M' = Write(u, M)
y  = h' + FFN(ffn_norm(h'))
"""

from __future__ import annotations

import pytest
import torch

from memgpt import BlockState, MemGPTBlock, MemoryLayer, MemoryState, SegmentView
from memgpt.testing import assert_close_dtype

F64 = torch.float64
EVICTIONS = ("fifo", "strength", "usage")


def make_block(device, eviction="fifo", capacity=4) -> MemGPTBlock:
    memory = MemoryLayer(8, heads=2, capacity=capacity, eviction=eviction)
    block = MemGPTBlock(8, 2, memory).to(device=device, dtype=F64)
    with torch.no_grad():  # random everything, so no zero-initialised gate hides a term
        for p in block.parameters():
            p.normal_(0.0, 0.5)
    return block


def hand_block(block: MemGPTBlock, x: torch.Tensor, memory: MemoryState | None):
    """The block formula from its parts: returns y and the new memory."""
    a, _ = block.attn(block.attn_norm(x))  # causal self-attention within the segment
    h = x + a
    u = block.memory_norm(h)
    fused, memory = block.memory(u, memory)  # read the memory before the segment, fuse, write u
    h = h + (fused - u)
    return h + block.ffn(block.ffn_norm(h)), memory


def assert_memory_equal(a: MemoryState, b: MemoryState) -> None:
    for name, t in a.to_dict().items():
        assert_close_dtype(t, getattr(b, name), msg=f"MemoryState.{name} differs")


@pytest.mark.parametrize("eviction", EVICTIONS)
def test_block_is_the_hand_composition_over_two_calls(device, eviction):
    block = make_block(device, eviction)
    x1 = torch.randn(2, 5, 8, dtype=F64, device=device)
    x2 = torch.randn(2, 5, 8, dtype=F64, device=device)
    y1, s1 = block(x1)
    y2, s2 = block(x2, s1)
    assert isinstance(s2, BlockState) and s2.buffer is None
    h1, m1 = hand_block(block, x1, None)
    h2, m2 = hand_block(block, x2, m1)
    assert_close_dtype(y1, h1)
    assert_close_dtype(y2, h2)
    assert_memory_equal(s1.memory, m1)
    assert_memory_equal(s2.memory, m2)  # 10 writes into capacity 4: eviction happened
    assert s2.memory.count.tolist() == [10, 10]
    # The state is threaded: the second segment sees the first through memory only.
    y2_fresh, _ = block(x2)
    assert (y2 - y2_fresh).abs().max() > 1e-6


def test_block_is_causal_within_a_segment(device):
    block = make_block(device)
    _, s = block(torch.randn(2, 5, 8, dtype=F64, device=device))
    x = torch.randn(2, 6, 8, dtype=F64, device=device)
    y, _ = block(x, s)
    for t in range(6):
        x2 = x.clone()
        x2[:, t] += 1.0
        y2, _ = block(x2, s)
        assert torch.equal(y[:, :t], y2[:, :t]), f"changing token {t} moved an earlier output"


@pytest.mark.parametrize("eviction", EVICTIONS)
def test_padding_is_neither_attended_nor_written(device, eviction):
    """The block has no positions of its own, so with padding anywhere each row's real tokens
    compute what the row's real tokens alone compute, and the memory holds only them."""
    block = make_block(device, eviction, capacity=3)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 1]],
        dtype=torch.bool,
        device=device,
    )
    b = mask.shape[0]
    x1 = torch.randn(b, 6, 8, dtype=F64, device=device)
    x2 = torch.randn(b, 6, 8, dtype=F64, device=device)
    y1, s1 = block(x1, mask=mask)
    y2, s2 = block(x2, s1, mask=mask)
    assert s2.memory.count.tolist() == (2 * mask.sum(dim=1)).tolist()
    for row in range(b):
        real = mask[row]
        a1, t1 = block(x1[row : row + 1, real])
        a2, t2 = block(x2[row : row + 1, real], t1)
        assert_close_dtype(y1[row, real], a1[0])
        assert_close_dtype(y2[row, real], a2[0])
        assert_memory_equal(s2.memory.index_select(torch.tensor([row], device=device)), t2.memory)
    # Garbage in the padding changes nothing real.
    x2_noisy = torch.where(mask[..., None], x2, 100 * torch.randn_like(x2))
    y2_noisy, s2_noisy = block(x2_noisy, s1, mask=mask)
    assert torch.equal(y2_noisy[mask], y2[mask])
    assert_memory_equal(s2_noisy.memory, s2.memory)


def test_block_bad_input(device):
    block = make_block(device)
    x = torch.randn(2, 5, 8, dtype=F64, device=device)
    with pytest.raises(ValueError, match=r"last dimension d = 8, got 4"):
        block(torch.randn(2, 5, 4, dtype=F64, device=device))
    with pytest.raises(ValueError, match=r"mask must be \(b n\) = \(2, 5\), got \(2, 4\)"):
        block(x, mask=torch.ones(2, 4, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match=r"state must be a BlockState or None, got MemoryState"):
        block(x, block.memory.empty_state(2, device=device, dtype=F64))
    with pytest.raises(ValueError, match=r"expected batch size 2, got 3"):
        block(x, block.empty_state(3, device=device, dtype=F64))
    view = SegmentView(
        start=0,
        present=torch.ones(2, 5, dtype=torch.bool, device=device),
        filled=torch.zeros(2, 5, dtype=torch.bool, device=device),
        flush=torch.ones(2, dtype=torch.bool, device=device),
        cached=False,
        flushing=True,
    )
    with pytest.raises(ValueError, match=r"needs a state with a SegmentBuffer"):
        block(x, view=view)
    with pytest.raises(ValueError, match=r"either mask .* or view"):
        streaming = block.empty_state(2, 5, device=device, dtype=F64)
        block(x, streaming, mask=torch.ones(2, 5, dtype=torch.bool, device=device), view=view)


def test_block_rejects_a_memory_layer_of_another_width_or_type():
    with pytest.raises(ValueError, match=r"memory layer width must equal the block's dim 8, got 6"):
        MemGPTBlock(8, 2, MemoryLayer(6, capacity=4))
    with pytest.raises(TypeError, match=r"memory must be a MemoryLayer, got Linear"):
        MemGPTBlock(8, 2, torch.nn.Linear(8, 8))


def test_block_compiles_with_fullgraph():
    """No data-dependent branch on the whole-segment path: torch.compile(fullgraph=True) matches eager."""
    torch.manual_seed(0)
    block = MemGPTBlock(32, 2, MemoryLayer(32, heads=2, capacity=16)).eval()
    x1, x2 = torch.randn(2, 2, 8, 32)
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    y1, s1 = compiled(x1)
    y2, s2 = compiled(x2, s1)
    e1, t1 = block(x1)
    e2, t2 = block(x2, t1)
    torch.testing.assert_close(y1, e1)
    torch.testing.assert_close(y2, e2)
    torch.testing.assert_close(s2.memory.keys, t2.memory.keys)
