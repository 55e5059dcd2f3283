"""The contracts of SPEC section 4 (and 7) on MemGPTModel, in float64 on tiny models.

Every contract runs over a few configurations that together cover capacity 4 and 7, one and
two memory heads, the three eviction policies and top-k reads on and off. Weights are random
with a std well above the default 0.02 init, so the memory's contribution is far above roundoff.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memgpt import MemGPTConfig, MemGPTModel, MemGPTState
from memgpt.testing import assert_close_dtype, canonical_memory

F64 = torch.float64
V, T = 37, 5  # vocab, segment_len

CONFIGS = {
    "cap4-mh1-fifo": dict(memory_capacity=4, memory_heads=1, eviction="fifo"),
    "cap7-mh2-strength": dict(memory_capacity=7, memory_heads=2, eviction="strength"),
    "cap4-mh2-usage-top2": dict(memory_capacity=4, memory_heads=2, eviction="usage", top_k=2),
    "cap7-mh1-fifo-top3": dict(memory_capacity=7, memory_heads=1, eviction="fifo", top_k=3),
}
_models: dict[str, MemGPTModel] = {}


def config(**kw) -> MemGPTConfig:
    base = dict(vocab_size=V, dim=16, depth=2, heads=2, segment_len=T, memory_capacity=4)
    return MemGPTConfig(**(base | kw))


def build(cfg: MemGPTConfig, seed: int = 0) -> MemGPTModel:
    torch.manual_seed(seed)
    model = MemGPTModel(cfg).to(F64).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def model_for(name: str) -> MemGPTModel:
    """One model per configuration, built once (the tests never change parameters)."""
    if name not in _models:
        _models[name] = build(config(**CONFIGS[name]))
    return _models[name]


@pytest.fixture(params=list(CONFIGS))
def model(request) -> MemGPTModel:
    return model_for(request.param)


def ids(b: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(seed))


def state_tensors(state: MemGPTState) -> dict[str, torch.Tensor]:
    return state._flat()


def assert_states_close(a: MemGPTState, b: MemGPTState) -> None:
    """Same positions, buffers and memories (memories compared slot-order independently)."""
    assert torch.equal(a.position, b.position)
    for i, (la, lb) in enumerate(zip(a.layers, b.layers)):
        for name, t in canonical_memory(la.memory).items():
            assert_close_dtype(t, canonical_memory(lb.memory)[name], msg=f"layer {i} memory.{name}")
        for f in dataclasses.fields(la.buffer):
            assert_close_dtype(getattr(la.buffer, f.name), getattr(lb.buffer, f.name), msg=f"layer {i} buffer.{f.name}")


def run_chunks(model: MemGPTModel, x: torch.Tensor, cuts: list[int], state=None):
    """Feed x in the chunks [cuts[i], cuts[i+1]) (empty chunks included); concat the logits."""
    outs = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        out = model(x[:, lo:hi], state)
        outs.append(out.logits)
        state = out.state
    return torch.cat(outs, dim=1), state


# ================================================================ 1. causality
@torch.no_grad()
def test_causal_at_every_position_through_memory(model):
    x = ids(2, 13)  # three segments: [0, 5), [5, 10), [10, 13)
    ref = model(x).logits
    for t in range(13):
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 1 + torch.arange(2)) % V
        logits = model(x2).logits
        assert torch.equal(logits[:, :t], ref[:, :t]), f"changing token {t} moved an earlier logit"
        assert not torch.equal(logits[:, t], ref[:, t])
        next_segment = (t // T + 1) * T
        if next_segment < 13:
            # attention sees the current segment only: a later segment hears of token t through memory
            assert not torch.equal(logits[:, next_segment:], ref[:, next_segment:]), (
                f"token {t} does not reach segment {t // T + 1}: memory is not in the path"
            )
    # Two segments later, too (token 0 reaches [10, 13) through two memory hops or a long-lived slot).
    x2 = x.clone()
    x2[:, 0] = (x2[:, 0] + 1) % V
    assert not torch.equal(model(x2).logits[:, 10:], ref[:, 10:])


@torch.no_grad()
def test_causal_across_calls(model):
    """The same holds when the tokens arrive over several calls (the state is the only link)."""
    x = ids(2, 12, seed=1)
    ref, _ = run_chunks(model, x, [0, 3, 7, 12])
    for t in (2, 4, 8):
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 5) % V
        logits, _ = run_chunks(model, x2, [0, 3, 7, 12])
        assert torch.equal(logits[:, :t], ref[:, :t])


# ================================================================ 2. streaming equivalence
@pytest.mark.parametrize("name", list(CONFIGS))
@settings(max_examples=15)
@given(cuts=st.lists(st.integers(0, 14), max_size=6).map(sorted), seed=st.integers(0, 2**16))
def test_streaming_any_split_equals_one_call(name, cuts, seed):
    """One call == calls of any lengths (empty ones, ones that do not divide segment_len)."""
    model = model_for(name)
    x = ids(2, 14, seed)
    with torch.no_grad():
        full = model(x)
        logits, state = run_chunks(model, x, [0, *cuts, 14])
    assert_close_dtype(logits, full.logits)
    assert_states_close(state, full.state)


@torch.no_grad()
def test_token_by_token_equals_one_call(model):
    x = ids(2, 12, seed=3)
    full = model(x)
    logits, state = run_chunks(model, x, list(range(13)))
    assert_close_dtype(logits, full.logits)
    assert_states_close(state, full.state)
    assert state.position.tolist() == [12, 12]


# ================================================================ 3. padding
def _padded_batch():
    """Rows of 9 real tokens in a width-12 batch: left, right and middle padding, and none."""
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[0, :3] = 0  # left
    mask[1, 9:] = 0  # right
    mask[2, [1, 5, 6]] = 0  # middle (and across a segment boundary)
    mask[3, 2:5] = 0  # row 3: 9 real tokens after padding at 2..4
    real = ids(4, 9, seed=4)
    x = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(5))  # garbage padding ids
    x[mask.bool()] = real.flatten()
    return x, mask, real


@torch.no_grad()
def test_padding_is_inert(model):
    x, mask, real = _padded_batch()
    out = model(x, attention_mask=mask)
    pad = ~mask.bool()
    assert torch.equal(out.logits[pad], torch.zeros_like(out.logits[pad])), "padding logits must be 0"
    assert out.state.position.tolist() == [9, 9, 9, 9]
    # Different ids in the padding change nothing.
    x_other = torch.where(mask.bool(), x, (x + 7) % V)
    assert torch.equal(model(x_other, attention_mask=mask).logits, out.logits)
    # Each row computes what its real tokens alone compute.
    for row in range(4):
        alone = model(real[row : row + 1])
        assert_close_dtype(out.logits[row, mask[row].bool()], alone.logits[0])
        assert_states_close(out.state.index_select(torch.tensor([row])), alone.state)
    for layer in out.state.layers:
        # 9 real tokens: one completed segment (5 flushed), 4 pending; padding is never written.
        assert layer.memory.count.tolist() == [5, 5, 5, 5]


@torch.no_grad()
def test_padding_makes_positions_diverge(model):
    """Rows with different numbers of real tokens continue from their own positions."""
    x = ids(3, 8, seed=6)
    mask = torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0, 1, 0]])
    first = model(x, attention_mask=mask)
    assert first.state.position.tolist() == [8, 5, 4]
    for layer in first.state.layers:
        assert layer.memory.count.tolist() == [5, 5, 0]
    y = ids(3, 9, seed=7)
    second = model(y, first.state)
    assert second.state.position.tolist() == [17, 14, 13]
    for layer in second.state.layers:
        assert layer.memory.count.tolist() == [15, 10, 10]
    for row in range(3):
        real = x[row, mask[row].bool()][None]
        alone = model(torch.cat([real, y[row : row + 1]], dim=1))
        assert_close_dtype(second.logits[row], alone.logits[0, real.shape[1] :])
        assert_states_close(second.state.index_select(torch.tensor([row])), alone.state)


@torch.no_grad()
def test_token_shift_sees_the_previous_real_token_across_padding_and_calls(model):
    """``previous`` is 1 + the last real token per row (0 before any), and it feeds the next call."""
    assert model.shift_emb is not None  # token_shift is on by default
    x = ids(3, 6, seed=8)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    out = model(x, attention_mask=mask)
    assert out.state.previous.tolist() == [int(x[0, 5]) + 1, int(x[1, 2]) + 1, 0]
    # the previous token matters: the same next token after a different history differs
    nxt = ids(3, 1, seed=9)
    other = model(x.flip(1), attention_mask=mask.flip(1))
    assert not torch.allclose(model(nxt, out.state).logits[0], model(nxt, other.state).logits[0])
    assert out.state.reset_rows(torch.tensor([True, False, False])).previous.tolist()[0] == 0


def test_without_token_shift_there_is_no_shift_embedding():
    plain = build(config(token_shift=False))
    assert plain.shift_emb is None
    x = ids(2, 11, seed=10)
    assert_close_dtype(run_chunks(plain, x, [0, 3, 7, 11])[0], plain(x).logits)


def test_all_padding_and_empty_calls_change_nothing(model):
    x = ids(2, 7)
    state = model(x).state
    for call in (model(x[:, :0], state), model(x, state, attention_mask=torch.zeros(2, 7, dtype=torch.long))):
        assert torch.equal(call.logits, torch.zeros_like(call.logits))
        assert call.state.position.tolist() == [7, 7]
        for a, b in zip(state_tensors(call.state).values(), state_tensors(state).values()):
            assert torch.equal(a, b)


# ================================================================ 4. gradients
class EmbeddingTap:
    """Captures the token-embedding output of every segment round, with retained gradients."""

    def __init__(self, model: MemGPTModel) -> None:
        self.outputs: list[torch.Tensor] = []
        self.handle = model.token_emb.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        out.retain_grad()
        self.outputs.append(out)

    def close(self) -> None:
        self.handle.remove()


def test_gradients_flow_through_memory_within_a_call(model):
    x = ids(2, 15, seed=8)
    tap = EmbeddingTap(model)
    try:
        logits = model(x).logits
    finally:
        tap.close()
    assert len(tap.outputs) == 3  # one embedding lookup per segment
    logits[:, 10:].pow(2).sum().backward()  # loss on the last segment only
    first = tap.outputs[0].grad
    assert first is not None and first[:, 0].abs().sum() > 0, "no gradient from segment 3 to token 0"
    model.zero_grad(set_to_none=True)


def test_detach_cuts_the_graph_between_calls(model):
    tap = EmbeddingTap(model)
    try:
        state, previous_emb, previous_grad = None, None, None
        for k in range(6):
            tap.outputs.clear()
            out = model(ids(2, 4, seed=10 + k), state)
            if k:
                assert out.state.layers[0].memory.keys.requires_grad or out.state.layers[0].buffer.keys.requires_grad
            out.logits.pow(2).sum().backward()
            emb = tap.outputs
            if previous_grad is not None:
                # call k's backward did not reach call k-1's embeddings
                for t, g in zip(previous_emb, previous_grad):
                    assert torch.equal(t.grad, g)
            previous_emb, previous_grad = list(emb), [t.grad.clone() for t in emb]
            state = out.state.detach()
            for name, t in state_tensors(state).items():
                assert not t.requires_grad and t.grad_fn is None, f"{name} still carries a graph"
    finally:
        tap.close()
        model.zero_grad(set_to_none=True)


def test_without_detach_the_graph_spans_calls(model):
    """The contrast: without detach, call 2's loss does reach call 1's embeddings (so the test
    above measures the detach, not a model that ignores its state)."""
    tap = EmbeddingTap(model)
    try:
        first = model(ids(2, 8, seed=20))
        emb_first = list(tap.outputs)
        second = model(ids(2, 8, seed=21), first.state)
    finally:
        tap.close()
    grads = torch.autograd.grad(second.logits.pow(2).sum(), emb_first, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    detached = model(ids(2, 8, seed=21), first.state.detach())
    grads = torch.autograd.grad(detached.logits.pow(2).sum(), emb_first, allow_unused=True)
    assert all(g is None for g in grads)


# ================================================================ 5. save / load (format, corruption: test_state_file.py)
@torch.no_grad()
def test_save_load_continues_bit_identically(model, tmp_path):
    x = ids(2, 16, seed=30)
    head = model(x[:, :7])  # stops mid-segment: the buffer is part of what is saved
    uninterrupted = model(x[:, 7:], head.state)
    path = tmp_path / "state.safetensors"
    head.state.save(path, model)
    loaded = MemGPTState.load(path, model)
    for name, t in state_tensors(head.state).items():
        u = state_tensors(loaded)[name]
        assert torch.equal(t, u) and t.dtype == u.dtype, name
    resumed = model(x[:, 7:], loaded)
    assert torch.equal(resumed.logits, uninterrupted.logits)


@pytest.mark.parametrize(
    "other, batch, exc, message",
    [
        (dict(depth=3), 2, ValueError, r"state has 3 layers, the model has depth 2"),
        (dict(), 3, ValueError, r"state was made for batch size 3, input has batch size 2"),
        (dict(memory_heads=2), 2, ValueError, r"expected heads 1, got 2"),
        (dict(memory_capacity=7), 2, ValueError, r"expected capacity 4, got 7"),
        (dict(heads=4), 2, ValueError, r"buffer attn_keys must be \(b, \*\(2, 5, 8\)\), got \(b, \*\(4, 5, 4\)\)"),
        (dict(segment_len=6), 2, ValueError, r"attn_keys must be \(b, \*\(2, 5, 8\)\), got \(b, \*\(2, 6, 8\)\)"),
        ("float32", 2, TypeError, r"memory dtype torch.float32, the model computes in torch.float64"),
    ],
)
def test_mismatched_state_is_rejected(other, batch, exc, message):
    model = model_for("cap4-mh1-fifo")
    if other == "float32":
        state = model.empty_state(batch, dtype=torch.float32)
    else:
        state = MemGPTModel(config(**other)).to(F64).empty_state(batch)
    with pytest.raises(exc, match=message):
        model(ids(2, 3), state)
    with pytest.raises(TypeError, match=r"state must be a MemGPTState or None, got dict"):
        model(ids(2, 3), {})


# ================================================================ 6. reset_rows / index_select
@torch.no_grad()
def test_reset_rows(model):
    x, y = ids(3, 8, seed=40), ids(3, 6, seed=41)
    state = model(x).state
    reset = state.reset_rows(torch.tensor([False, True, False]))
    fresh = model.empty_state(1)
    for name, t in state_tensors(reset).items():
        assert torch.equal(t[1:2], state_tensors(fresh)[name]), f"row 1 {name} is not fresh"
        assert torch.equal(t[[0, 2]], state_tensors(state)[name][[0, 2]]), f"rows 0, 2 {name} changed"
    out = model(y, reset)
    kept = model(y, state)
    assert_close_dtype(out.logits[1], model(y[1:2]).logits[0])  # row 1 starts a new document
    assert_close_dtype(out.logits[[0, 2]], kept.logits[[0, 2]])
    with pytest.raises(ValueError, match=r"reset_rows mask must be bool \(b,\) = \(3,\), got torch.bool \(2,\)"):
        state.reset_rows(torch.tensor([True, False]))


@torch.no_grad()
@pytest.mark.parametrize("index", [[2, 0, 1], [1, 1, 0, 2]], ids=["permute", "duplicate"])
def test_index_select_permutes_rows_consistently(model, index):
    x, y = ids(3, 8, seed=42), ids(3, 6, seed=43)
    state = model(x).state
    index = torch.tensor(index)
    continued = model(y, state)
    permuted = model(y[index], state.index_select(index))
    assert_close_dtype(permuted.logits, continued.logits[index])
    assert_states_close(permuted.state, continued.state.index_select(index))
    with pytest.raises(ValueError, match=r"index values must lie in \[0, 3\), got min 0 max 3"):
        state.index_select(torch.tensor([0, 3]))


# ================================================================ 7. generate
@torch.no_grad()
def test_greedy_generate_is_the_argmax_loop(model):
    prompt = ids(2, 7, seed=50)
    gen = model.generate(prompt, 9)
    out = model(prompt)
    token, state, tokens = out.logits[:, -1].argmax(-1), out.state, []
    for _ in range(9):
        tokens.append(token)
        out = model(token[:, None], state)
        token, state = out.logits[:, -1].argmax(-1), out.state
    assert torch.equal(gen.sequences, torch.cat([prompt, torch.stack(tokens, 1)], dim=1))
    assert_states_close(gen.state, state)


@torch.no_grad()
def test_greedy_generate_with_left_padded_prompts():
    model = model_for("cap7-mh2-strength")
    prompts = [ids(1, 7, seed=51)[0], ids(1, 4, seed=52)[0]]
    batch = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, 7 - len(p) :], mask[row, 7 - len(p) :] = p, 1
    gen = model.generate(batch, 6, attention_mask=mask)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], 6)
        assert torch.equal(gen.sequences[row, 7:], alone.sequences[0, len(p) :])


@torch.no_grad()
def test_sampling_with_a_seeded_generator_is_reproducible():
    model = model_for("cap4-mh2-usage-top2")
    prompt = ids(3, 6, seed=53)
    runs = [
        model.generate(prompt, 8, do_sample=True, temperature=2.0, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert_states_close(runs[0].state, runs[1].state)
    # top_k=1 sampling is greedy
    one = model.generate(prompt, 8, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(one.sequences, model.generate(prompt, 8).sequences)


@torch.no_grad()
def test_top_k_sampling_picks_only_among_the_top_k():
    model = model_for("cap7-mh1-fifo-top3")
    prompt = ids(8, 4, seed=54)
    k, n_new = 3, 10
    seeded = torch.Generator().manual_seed(3)
    gen = model.generate(prompt, n_new, do_sample=True, top_k=k, temperature=10.0, generator=seeded)
    logits = model(gen.sequences).logits  # logits[:, p] predict token p + 1
    picked = gen.sequences[:, 4:]
    top = logits[:, 3:-1].topk(k, dim=-1).indices
    assert (picked[..., None] == top).any(-1).all(), "a sampled token lies outside the top k"
    # A high temperature without top_k does leave the top 3 (the restriction is doing the work).
    free = model.generate(prompt, n_new, do_sample=True, temperature=10.0, generator=torch.Generator().manual_seed(3))
    top = model(free.sequences).logits[:, 3:-1].topk(k, dim=-1).indices
    assert not (free.sequences[:, 4:, None] == top).any(-1).all()


def test_generate_bad_arguments():
    model = model_for("cap4-mh1-fifo")
    with pytest.raises(ValueError, match=r"max_new_tokens must be an int >= 0, got -1"):
        model.generate(ids(1, 3), -1)
    with pytest.raises(ValueError, match=r"temperature must be > 0 when sampling, got 0"):
        model.generate(ids(1, 3), 2, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match=r"all-zero row"):
        model.generate(ids(2, 3), 2, attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))


# ================================================================ 8. bad input
@pytest.mark.parametrize(
    "make, exc, message",
    [
        (lambda: torch.zeros(5, dtype=torch.long), ValueError, r"input_ids must be a \(b n\) tensor, got \(5,\)"),
        (lambda: torch.zeros(1, 2, 3, dtype=torch.long), ValueError, r"got \(1, 2, 3\)"),
        (lambda: [[1, 2]], ValueError, r"input_ids must be a \(b n\) tensor, got list"),
        (lambda: torch.zeros(2, 3), TypeError, r"input_ids must be int64 or int32, got torch.float32"),
        (lambda: torch.tensor([[0, 37]]), ValueError, r"input_ids must lie in \[0, 37\), got min 0 max 37"),
        (lambda: torch.tensor([[-1, 3]]), ValueError, r"input_ids must lie in \[0, 37\), got min -1 max 3"),
    ],
)
def test_bad_input_ids(make, exc, message):
    model = model_for("cap4-mh1-fifo")
    with pytest.raises(exc, match=message):
        model(make())


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.ones(2, 4, dtype=torch.long), r"attention_mask must be \(b n\) = \(2, 5\), got \(2, 4\)"),
        (torch.ones(5, dtype=torch.long), r"attention_mask must be \(b n\) = \(2, 5\), got \(5,\)"),
        (torch.full((2, 5), 2), r"attention_mask must hold only 0 and 1"),
        (torch.full((2, 5), 0.5), r"attention_mask must hold only 0 and 1"),
    ],
)
def test_bad_attention_mask(mask, message):
    model = model_for("cap4-mh1-fifo")
    with pytest.raises(ValueError, match=message):
        model(ids(2, 5), attention_mask=mask)


@pytest.mark.parametrize(
    "kw, exc, message",
    [
        (dict(dim=10, heads=4), ValueError, r"MemGPTConfig.dim \(10\) must be divisible by heads \(4\)"),
        (dict(dim=16, memory_heads=3), ValueError, r"MemGPTConfig.dim \(16\) must be divisible by memory_heads \(3\)"),
        (dict(vocab_size=0), ValueError, r"MemGPTConfig.vocab_size must be >= 1, got 0"),
        (dict(depth=0), ValueError, r"MemGPTConfig.depth must be >= 1, got 0"),
        (dict(segment_len=-2), ValueError, r"MemGPTConfig.segment_len must be >= 1, got -2"),
        (dict(memory_capacity=0), ValueError, r"MemGPTConfig.memory_capacity must be >= 1, got 0"),
        (dict(top_k=0), ValueError, r"MemGPTConfig.top_k must be >= 1, got 0"),
        (dict(depth=2.0), TypeError, r"MemGPTConfig.depth must be an int, got float \(2.0\)"),
        (dict(eviction="lru"), ValueError, r"eviction must be one of \('fifo', 'strength', 'usage'\), got 'lru'"),
        (dict(dropout=1.0), ValueError, r"MemGPTConfig.dropout must be in \[0, 1\), got 1.0"),
    ],
)
def test_config_validation(kw, exc, message):
    with pytest.raises(exc, match=message):
        config(**kw)


def test_model_needs_a_config():
    with pytest.raises(TypeError, match=r"config must be a MemGPTConfig, got dict"):
        MemGPTModel(dict(vocab_size=V))
