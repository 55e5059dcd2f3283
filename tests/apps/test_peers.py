"""The peer adapters of ``memgpt compare`` (``memgpt.apps.compare.peers``): every installed peer
builds at a small shape, trains, really carries memory from segment to segment, and streams with
a bounded state; a peer that is not installed is skipped with the reason its builder gives."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from torch import Tensor, nn

from memgpt.apps.compare.contender import Contender, ModelShape, check_logits
from memgpt.apps.compare.peers import PACKAGES, PEERS

# titans-pytorch's dependencies call torch.jit.script at import, which torch 2.13 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

SHAPE = ModelShape(vocab_size=48, segment_len=16, dim=32, depth=2, heads=4)
B = 2
NAMES = sorted(PEERS)
IMPORTS = {  # the top-level packages each adapter imports inside build
    "titans": ["titans_pytorch"],
    "rmt": ["recurrent_memory_transformer_pytorch"],
    "infini": ["infini_transformer_pytorch"],
    "memorizing": ["memorizing_transformers_pytorch", "faiss"],
    "xl": ["x_transformers"],
    "block-recurrent": ["block_recurrent_transformer_pytorch"],
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The peers run many tiny ops: one intra-op thread is faster, and steady on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name: str) -> Contender:
    torch.manual_seed(0)
    built = PEERS[name](SHAPE)
    if isinstance(built, str):
        pytest.skip(built)
    return built


def _segments(n: int, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SHAPE.vocab_size, (B, SHAPE.segment_len), generator=g) for _ in range(n)]


def _numel(state: object) -> int:
    """Elements held by a state: tensors (and anything with ``numel()``) in nested containers."""
    if hasattr(state, "numel"):
        return int(state.numel())
    if isinstance(state, (tuple, list)):
        return sum(_numel(s) for s in state)
    if isinstance(state, dict):
        return sum(_numel(s) for s in state.values())
    if dataclasses.is_dataclass(state):
        return sum(_numel(getattr(state, f.name)) for f in dataclasses.fields(state))
    return 0


def test_registry_covers_every_peer_of_the_issue():
    assert set(PEERS) == set(IMPORTS)
    assert all("==" in PACKAGES[name] for name in PEERS)  # pinned


@pytest.mark.parametrize("name", NAMES)
def test_missing_peer_builds_into_a_reason(name, monkeypatch):
    for module in IMPORTS[name]:
        for loaded in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    reason = PEERS[name](SHAPE)
    assert isinstance(reason, str) and "not installed" in reason and "[peers]" in reason


@pytest.mark.parametrize("name", NAMES)
def test_trains_on_segments(name):
    c = _build(name)
    assert c.config.get("package") and c.config.get("heads") == SHAPE.heads
    opt = torch.optim.AdamW(c.model.parameters(), lr=1e-3)
    ids = torch.cat(_segments(3, seed=1), dim=1)
    targets = ids.roll(-1, dims=1)
    losses = []
    for _ in range(2):
        state, loss = None, torch.zeros(())
        for s in range(0, ids.shape[1], SHAPE.segment_len):
            seg = ids[:, s : s + SHAPE.segment_len]
            logits, state = c.step(seg, state)
            check_logits(name, logits, seg, SHAPE.vocab_size)
            loss = loss + nn.functional.cross_entropy(
                logits.flatten(0, 1), targets[:, s : s + SHAPE.segment_len].flatten()
            )
        opt.zero_grad()
        loss.backward()
        grads = [p.grad.abs().sum() for p in c.model.parameters() if p.grad is not None]
        opt.step()
        assert torch.isfinite(loss)
        assert grads and sum(grads) > 0
        losses.append(loss.item())
    assert losses[0] != losses[1]


@pytest.mark.parametrize("name", NAMES)
def test_builds_at_every_width_the_runner_tries(name):
    """The runner tunes dim in steps of heads, so dim // heads is odd at every other width (odd
    head widths break rotary positions unless the adapter rounds them)."""
    shape = dataclasses.replace(SHAPE, dim=36)  # dim // heads = 9
    built = PEERS[name](shape)
    if isinstance(built, str):
        pytest.skip(built)
    ids = _segments(1, seed=5)[0]
    logits, state = built.step(ids, None)
    logits, _ = built.step(ids, state)
    check_logits(name, logits, ids, shape.vocab_size)
    logits.sum().backward()


@pytest.mark.parametrize("name", NAMES)
def test_state_carries_memory(name):
    """The last segment's logits depend on the earlier segments, through the state alone.

    Untrained, some peers let little through: infini-transformer's head gates start at
    sigmoid(10), so its memory moves the logits by about 1e-5 at initialisation. Without a carried
    state the two calls would be bitwise equal (same ops, same inputs), so 1e-6 is a safe margin."""
    c = _build(name)
    c.model.eval()
    *earlier, last = _segments(3, seed=2)
    with torch.no_grad():
        state = None
        for seg in earlier:
            _, state = c.step(seg, state)
        with_memory, _ = c.step(last, state)
        without, _ = c.step(last, None)
    assert (with_memory - without).abs().max() > 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_streaming_state_stays_bounded(name):
    c = _build(name)
    c.model.eval()
    if c.max_tokens is not None:  # it re-reads what it was fed: bounded by max_tokens, enforced
        state = None
        with torch.no_grad():
            for seg in _segments(3, seed=3):
                _, state = c.step(seg, state)
        assert _numel(state) <= B * c.max_tokens
        full = torch.zeros(B, c.max_tokens, dtype=torch.long)
        with pytest.raises(ValueError, match="max_tokens"):
            c.step(_segments(1, seed=4)[0], full)
        return
    sizes, state = [], None
    with torch.no_grad():
        for seg in _segments(50, seed=3):
            logits, state = c.step(seg, state)
            state = c.detach(state)
            sizes.append(_numel(state))
    assert torch.isfinite(logits).all()
    assert sizes[0] > 0
    assert max(sizes[25:]) <= max(sizes[:25])  # stopped growing
