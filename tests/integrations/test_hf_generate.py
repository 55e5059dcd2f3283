"""MemoryModel.generate (issue #18: it used to be a bare AttributeError): Hugging Face generate
with the memory carried from pass to pass, the decoding methods it cannot follow refused, and a
model without a language-model head told what to call instead."""

from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from memgpt.integrations.hf import MemoryModel  # noqa: E402

V = 128


def gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0, pad_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def memory_model() -> MemoryModel:
    torch.manual_seed(0)
    return MemoryModel(gpt2(), after=[0, 1], capacity=16, heads=2, fusion_bias_init=0.0)  # an open gate: memory counts


NO_EOS = dict(eos_token_id=None, pad_token_id=0)  # always max_new_tokens: the manual loop has no stopping rule


def cache_of(out):
    return out.get("cache", None) or out.get("past_key_values")


def greedy_by_hand(mm: MemoryModel, prompt, mask, state, steps: int):
    """Greedy decoding through mm's forward with the KV cache: the prompt, then one token per call."""
    name = "cache" if "cache" in inspect.signature(mm.model.forward).parameters else "past_key_values"
    tokens, scores = [], []
    with torch.no_grad():
        out = mm(prompt, attention_mask=mask, memory_state=state, use_cache=True)
        for i in range(steps):
            logits = out.logits[:, -1]
            token = logits.argmax(-1)
            tokens.append(token)
            scores.append(logits)
            if i == steps - 1:
                break  # generate does not run the last token either
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            kw = {name: cache_of(out)}
            out = mm(token[:, None], attention_mask=mask, memory_state=out.memory_state, use_cache=True, **kw)
    return torch.stack(tokens, 1), scores, out.memory_state


def assert_same_stores(a, b):
    for x, y in zip(a, b, strict=True):
        for name in ("keys", "values", "strength", "valid", "count"):
            torch.testing.assert_close(getattr(x, name), getattr(y, name), rtol=1e-5, atol=1e-6)


def test_greedy_generate_carries_the_memory_like_calls_through_forward():
    mm = memory_model()
    earlier, prompt = torch.randint(1, V, (2, 2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        state = mm(earlier, attention_mask=mask).memory_state  # an earlier segment, in memory
    counts = [m.count.clone() for m in state]
    out = mm.generate(prompt, attention_mask=mask, memory_state=state, max_new_tokens=5, output_scores=True, **NO_EOS)
    want_tokens, want_scores, want_state = greedy_by_hand(mm, prompt, mask, state, 5)
    assert torch.equal(out.sequences[:, :6], prompt) and torch.equal(out.sequences[:, 6:], want_tokens)
    for got, want in zip(out.scores, want_scores, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_same_stores(out.memory_state, want_state)
    assert out.memory_state[0].count.tolist() == [16, 16]  # 6 earlier + 6 prompt + 4 generated, capacity 16
    assert all(torch.equal(m.count, c) for m, c in zip(state, counts, strict=True))  # the given state: untouched
    # The memory is read: from an empty memory the same prompt scores differently.
    fresh = mm.generate(prompt, attention_mask=mask, max_new_tokens=1, output_scores=True, **NO_EOS)
    assert not torch.allclose(fresh.scores[0], out.scores[0])
    assert fresh.memory_state[0].count.tolist() == [6, 6]  # the prompt only


def test_each_returned_sequence_gets_its_rows_memory():
    """num_return_sequences=k repeats each prompt row k times; its memory is repeated alike.
    Sampling with top_k=1 is greedy decoding, so each copy is its row's greedy result."""
    mm = memory_model()
    earlier, prompt = torch.randint(1, V, (2, 2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        state = mm(earlier, attention_mask=mask).memory_state
    greedy = mm.generate(prompt, attention_mask=mask, memory_state=state, max_new_tokens=3, **NO_EOS)
    sampled = mm.generate(
        prompt,
        attention_mask=mask,
        memory_state=state,
        max_new_tokens=3,
        do_sample=True,
        top_k=1,
        num_return_sequences=2,
        **NO_EOS,
    )
    rows = torch.tensor([0, 0, 1, 1])
    assert torch.equal(sampled.sequences, greedy.sequences[rows])
    assert sampled.memory_state.batch_size == 4
    assert_same_stores(sampled.memory_state, greedy.memory_state.index_select(rows))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_beams=2), "decodes greedily or by sampling .* got beam_search: beams reorder the KV cache"),
        (dict(penalty_alpha=0.6, top_k=4), "got contrastive_search"),
        (dict(use_cache=False), "use_cache=False is not supported by MemoryModel.generate"),
        (dict(return_dict_in_generate=False), "return_dict_in_generate=False is not supported"),
    ],
)
def test_decoding_the_memory_cannot_follow_is_refused(kwargs, message):
    mm = memory_model()
    with pytest.raises(ValueError, match=message):
        mm.generate(torch.randint(1, V, (1, 4)), max_new_tokens=2, **kwargs)


def test_a_model_without_a_language_model_head_names_what_to_call():
    config = transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    mm = MemoryModel(transformers.BertModel(config).eval(), after=[1], capacity=8)
    with pytest.raises(TypeError, match=r"^BertModel cannot generate \(it has no language-model head\); call the "):
        mm.generate(torch.randint(1, V, (1, 4)))
