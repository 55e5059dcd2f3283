"""MemGPTModel(..., donate_state=True) and generate(): in-place memory writes give the same
results as the value-semantics path, never touch the caller's state, and refuse reuse."""

from __future__ import annotations

import pytest
import torch

from memgpt import MemGPTConfig, MemGPTModel


def model_for(eviction: str) -> MemGPTModel:
    torch.manual_seed(0)
    config = MemGPTConfig(
        vocab_size=37,
        dim=32,
        depth=2,
        heads=2,
        segment_len=4,
        memory_capacity=6,
        memory_heads=2,
        eviction=eviction,
        top_k=2 if eviction == "usage" else None,
    )
    return MemGPTModel(config).eval()


def memories(state):
    return [{k: v.clone() for k, v in layer.memory.to_dict().items()} for layer in state.layers]


def assert_same_memories(a, b):
    for la, lb in zip(a, b, strict=True):
        for name in la:
            assert torch.equal(la[name], lb[name]), name


@pytest.mark.parametrize("eviction", ["fifo", "strength", "usage"])
def test_generate_matches_plain_decoding_and_leaves_the_callers_state_alone(eviction):
    model = model_for(eviction)
    ids = torch.randint(0, 37, (3, 9))
    with torch.no_grad():
        state = model(ids).state
    before = memories(state)
    out = model.generate(ids[:, :3], 10, state)
    # The same decoding with value semantics (no donation anywhere).
    tokens, plain = [], state
    with torch.no_grad():
        step = model(ids[:, :3], plain)
        logits, plain = step.logits[:, -1], step.state
        for _ in range(10):
            token = logits.argmax(-1)
            tokens.append(token)
            step = model(token[:, None], plain)
            logits, plain = step.logits[:, -1], step.state
    assert torch.equal(out.sequences[:, 3:], torch.stack(tokens, dim=1))
    assert_same_memories(memories(out.state), memories(plain))
    assert_same_memories(memories(state), before)  # the caller's state is untouched ...
    model(ids[:, :1], state)  # ... and still usable


@pytest.mark.parametrize("eviction", ["fifo", "usage"])
def test_donated_forward_equals_value_forward_and_consumes_the_state(eviction):
    model = model_for(eviction)
    ids = torch.randint(0, 37, (2, 11))
    with torch.no_grad():
        start = model(ids[:, :5]).state
        expected = model(ids[:, 5:], start)
        private = model(ids[:, :5]).state  # the same state, made afresh (eval mode is deterministic)
        actual = model(ids[:, 5:], private, donate_state=True)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=0)
    assert_same_memories(memories(actual.state), memories(expected.state))
    with pytest.raises(RuntimeError, match="donated"):
        model(ids[:, :2], private)


@pytest.mark.parametrize("eviction", ["fifo", "strength", "usage"])
def test_donated_training_equals_value_training(eviction):
    """Under autograd the in-place writes are logged: the same logits and parameter gradients
    (float64), through padding, streamed calls that carry the state, and a continued chain."""
    model = model_for(eviction).double()
    ids = torch.randint(0, 37, (2, 21))
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[1, 4:9] = 0  # padding in the middle of one row
    calls = [(0, 3), (3, 14), (14, 21)]

    def run(donate):
        model.zero_grad()
        state, loss, logits = None, 0.0, []
        for a, b in calls:
            out = model(ids[:, a:b], state, mask[:, a:b], donate_state=donate)
            loss = loss + (out.logits.sin() * mask[:, a:b, None]).sum()
            logits.append(out.logits.detach())
            state = out.state
        loss.backward()
        return torch.cat(logits, 1), [p.grad.clone() for p in model.parameters()], state

    want_logits, want_grads, want_state = run(False)
    got_logits, got_grads, got_state = run(True)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-12, atol=1e-12)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    # Not bit for bit: the logged forward reads use the fused SDPA kernel, the value path the math one.
    for got, want in zip(memories(got_state), memories(want_state), strict=True):
        for name in got:
            torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12)


def test_donate_state_checks_its_flag():
    model = model_for("fifo")
    with pytest.raises(TypeError, match="donate_state must be a bool, got str"):
        model(torch.randint(0, 37, (2, 8)), donate_state="yes")
