"""memgpt.integrations.hf on randomly initialised GPT-2 and Llama: identity at insertion, the
memory threaded through calls, padding, per-row reset, reordering, KV-cache decoding, errors."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from memgpt.integrations import MemoryStates  # noqa: E402
from memgpt.integrations.hf import MemoryModel, _Call, find_layers  # noqa: E402
from memgpt.testing import assert_close_dtype  # noqa: E402

V = 128


def gpt2(layers: int = 3) -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=V,
        n_positions=64,
        n_embd=32,
        n_layer=layers,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


@torch.no_grad()
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def cache_kwarg(model) -> str:
    """transformers 5 calls the KV cache ``cache``; 4.x ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_insertion_is_near_identity(build):
    """Logits change by < 1% (relative norm) on the first call and on the second, when the
    memory after every layer holds the first call's tokens."""
    torch.manual_seed(0)
    model = build()
    ids1, ids2 = torch.randint(0, V, (2, 3, 12))
    with torch.no_grad():
        base1, base2 = model(ids1).logits, model(ids2).logits
        mm = MemoryModel(model, after=list(range(model.config.num_hidden_layers)), capacity=32, heads=4)
        out1 = mm(ids1)
        out2 = mm(ids2, memory_state=out1.memory_state)
    k = model.config.num_hidden_layers
    assert all(m.layer.fusion.bias_init == pytest.approx(6 + math.log(k)) for m in mm.memories.values())
    assert isinstance(out2.memory_state, MemoryStates) and len(out2.memory_state) == k
    assert all(m.count.tolist() == [12, 12, 12] for m in out1.memory_state)
    assert rel(out1.logits, base1) < 0.01
    assert rel(out2.logits, base2) < 0.01
    with torch.no_grad():  # the second call does read the memory
        assert rel(out2.logits, mm(ids2).logits) > 1e-6


def test_find_layers_and_hidden_size():
    assert find_layers(gpt2())[0] == "transformer.h"
    assert find_layers(llama())[0] == "model.layers"
    assert find_layers(gpt2().transformer)[0] == "h"
    with pytest.raises(ValueError, match="must name an nn.ModuleList, got GPT2Block"):
        find_layers(gpt2(), "transformer.h.0")
    with pytest.raises(ValueError, match="names no submodule"):
        find_layers(gpt2(), "transformer.blocks")
    mm = MemoryModel(gpt2(), after=[-1], capacity=4)
    assert mm.after == (2,) and mm.memories["2"].dim == 32
    assert "layers_path='transformer.h', after=[2]" in repr(mm)


def test_each_call_is_a_causal_segment():
    """Within a call a token reads only earlier calls' memory: changing the last token of the
    second call leaves every earlier position's logits as they were."""
    torch.manual_seed(0)
    mm = MemoryModel(gpt2(), after=[0, 2], capacity=32, heads=2, fusion_bias_init=0.0)
    ids1, ids2 = torch.randint(0, V, (2, 2, 8))
    with torch.no_grad():
        state = mm(ids1).memory_state
        a = mm(ids2, memory_state=state).logits
        ids2b = ids2.clone()
        ids2b[:, -1] = (ids2b[:, -1] + 1) % V
        b = mm(ids2b, memory_state=state).logits
    assert torch.equal(a[:, :-1], b[:, :-1])
    assert not torch.equal(a[:, -1], b[:, -1])


def test_padding_is_never_written():
    """A right-padded row stores exactly what the same row stores alone, without padding."""
    torch.manual_seed(0)
    mm = MemoryModel(gpt2(), after=[1], capacity=16, heads=2)
    ids = torch.randint(0, V, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.no_grad():
        state = mm(ids, attention_mask=mask).memory_state[0]
        alone = mm(ids[1:, :4]).memory_state[0]
    assert state.count.tolist() == [7, 4]
    row1 = state.index_select(torch.tensor([1]))
    for name, t in alone.to_dict().items():
        torch.testing.assert_close(getattr(row1, name), t, msg=f"MemoryState.{name} differs")


def test_reset_rows_and_index_select_through_the_model():
    torch.manual_seed(0)
    mm = MemoryModel(gpt2(), after=[0, 2], capacity=32, heads=2, fusion_bias_init=0.0)
    ids1, ids2 = torch.randint(0, V, (2, 3, 6))
    with torch.no_grad():
        state = mm(ids1).memory_state
        logits = mm(ids2, memory_state=state).logits
        reset = torch.tensor([False, True, False])
        after_reset = mm(ids2, memory_state=state.reset_rows(reset)).logits
        assert_close_dtype(after_reset[1], mm(ids2[1:2]).logits[0])
        assert torch.equal(after_reset[[0, 2]], logits[[0, 2]])
        idx = torch.tensor([2, 2, 0])
        reordered = mm(ids2[idx], memory_state=state.index_select(idx))
    assert_close_dtype(reordered.logits, logits[idx])
    assert reordered.memory_state.batch_size == 3


def test_kv_cache_decoding_writes_only_the_new_real_tokens():
    """With a KV cache the attention mask spans cached + new tokens; the hooks take its last n
    columns, so a decode step writes one token per row (none for a row whose new token is padding)."""
    torch.manual_seed(0)
    model = gpt2()
    mm = MemoryModel(model, after=[1], capacity=16)
    ids = torch.randint(0, V, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        out = mm(ids, attention_mask=mask, use_cache=True)
        cache = out.get("cache", None) or out.get("past_key_values")
        step_mask = torch.cat([mask, torch.tensor([[1], [0]])], dim=1)  # (b 6)
        step = mm(ids[:, -1:], attention_mask=step_mask, memory_state=out.memory_state, **{cache_kwarg(model): cache})
    assert step.logits.shape == (2, 1, V)
    assert step.memory_state[0].count.tolist() == [6, 5]
    call = _Call({}, step_mask)
    assert call.token_mask(torch.zeros(2, 1, 3)).tolist() == [[True], [False]]
    with pytest.raises(ValueError, match=r"does not cover hidden states \(b n\) = \(2, 7\)"):
        call.token_mask(torch.zeros(2, 7, 3))


def test_training_reaches_the_memory_and_the_model():
    torch.manual_seed(0)
    mm = MemoryModel(gpt2(), after=[1], capacity=16).train()
    ids = torch.randint(0, V, (2, 6))
    state = mm(ids).memory_state
    out = mm(ids, memory_state=state, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in mm.memory_parameters())
    assert mm.model.transformer.wte.weight.grad is not None
    assert {n.split(".")[0] for n, _ in mm.named_parameters()} == {"model", "memories"}
    # transformers 5 renamed it (the old name warns); 4.x has only the old one.
    enable = getattr(mm.model, "activation_checkpointing_enable", None) or mm.model.gradient_checkpointing_enable
    enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        mm(ids)


def test_inner_model_is_guarded_and_remove_restores_it():
    torch.manual_seed(0)
    model = gpt2()
    ids = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        before = model(ids).logits
        mm = MemoryModel(model, after=[0, 1], capacity=8)
        with pytest.raises(RuntimeError, match="call the MemoryModel wrapper"):
            model(ids)
        assert mm.remove() is model
        assert torch.equal(model(ids).logits, before)
    with pytest.raises(RuntimeError, match="hooks were removed"):
        mm(ids)


def test_bad_input_raises_clear_errors():
    mm = MemoryModel(gpt2(), after=[0, 2], capacity=8)
    ids = torch.randint(0, V, (2, 5))
    for after, exc, msg in [
        ([3], ValueError, "layer index 3 is out of range for 3 layers"),
        ([0, -3], ValueError, "each once"),
        ([], ValueError, "at least one layer"),
        (1, TypeError, "sequence of layer indices"),
    ]:
        with pytest.raises(exc, match=msg):
            MemoryModel(gpt2(), after=after, capacity=8)
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        MemoryModel(gpt2(), after=[0], capacity=0)
    with pytest.raises(ValueError, match="holds 1 memories, the model has 2"):
        mm(ids, memory_state=MemoryStates((mm(ids).memory_state[0],)))
    with pytest.raises(TypeError, match="MemoryStates or None, got MemoryState"):
        mm(ids, memory_state=mm(ids).memory_state[0])
    with pytest.raises(ValueError, match="expected batch size 3, got 2"):
        mm(torch.randint(0, V, (3, 5)), memory_state=mm(ids).memory_state)
    with pytest.raises(ValueError, match="return_dict=False"):
        mm(ids, return_dict=False)
    with pytest.raises(ValueError, match=r"attention_mask must be a \(b n\) tensor"):
        mm(ids, attention_mask=torch.ones(2, 1, 5, 5))


def test_hidden_states_are_reported_after_the_memory():
    """hidden_states[i + 1] is layer i's output with its memory applied, even when transformers
    installed its output recorder (on the first call) before the memory was inserted."""
    torch.manual_seed(0)
    model = gpt2()
    ids1, ids2 = torch.randint(0, V, (2, 2, 6))
    with torch.no_grad():
        base = model(ids2, output_hidden_states=True).hidden_states
        mm = MemoryModel(model, after=[0], capacity=16, fusion_bias_init=0.0)
        state = mm(ids1).memory_state
        out = mm(ids2, memory_state=state, output_hidden_states=True)
        y, _ = mm.memories["0"](base[1], state[0])
    assert_close_dtype(out.hidden_states[1], y)
    assert rel(out.hidden_states[1], base[1]) > 1e-3
