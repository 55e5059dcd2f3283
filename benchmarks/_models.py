"""Same-size baselines built from memgpt's own parts: a plain pre-norm block and a plain KV-cache LM.

Built from the same ``MultiHeadAttention``, ``FeedForward`` and ``LayerNorm`` as ``MemGPTBlock``
(with the same attribute names), so that a comparison isolates the memory layer and nothing else.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from memgpt import MemGPTModel
from memgpt.layers import FeedForward, KVCache, MultiHeadAttention


class PlainBlock(nn.Module):
    """``y, cache = block(x (b n d), cache)``: x + Attn(LN(x)), then + FFN(LN(.)); causal."""

    def __init__(self, dim: int, heads: int, ffn_dim: int | None = None) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> tuple[Tensor, KVCache]:
        a, cache = self.attn(self.attn_norm(x), cache)
        h = x + a
        return h + self.ffn(self.ffn_norm(h)), cache


class PlainLM(nn.Module):
    """A decoder-only LM of PlainBlocks over the whole context (learned absolute positions, tied head).

    ``logits, caches = lm(ids (b n), caches)``: logits (b n vocab); ``caches`` one KVCache per
    block, each (b h t dh), so decoding one token costs O(t) per block.
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int, max_len: int, ffn_dim: int | None = None):
        super().__init__()
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(PlainBlock(dim, heads, ffn_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.apply(MemGPTModel._init_weights)  # the same initialisation as the memory model
        self.lm_head.weight = self.token_emb.weight

    def forward(self, ids: Tensor, caches: list[KVCache] | None = None) -> tuple[Tensor, list[KVCache]]:
        t = 0 if caches is None else caches[0].keys.shape[2]
        if t + ids.shape[1] > self.pos_emb.num_embeddings:
            raise ValueError(f"context {t + ids.shape[1]} exceeds max_len {self.pos_emb.num_embeddings}")
        x = self.token_emb(ids) + self.pos_emb(torch.arange(t, t + ids.shape[1], device=ids.device))
        new = []
        for block, cache in zip(self.blocks, caches or [None] * len(self.blocks)):
            x, cache = block(x, cache)
            new.append(cache)
        return self.lm_head(self.norm(x)), new

    @torch.no_grad()
    def generate(self, ids: Tensor, max_new_tokens: int, caches: list[KVCache] | None = None):
        """Greedy decoding, one token per call, like ``MemGPTModel.generate``: (sequences (b n+new), caches)."""
        logits, caches = self(ids, caches)
        tokens = []
        for _ in range(max_new_tokens):
            token = logits[:, -1].argmax(dim=-1)
            tokens.append(token)
            logits, caches = self(token[:, None], caches)
        return torch.cat([ids, torch.stack(tokens, dim=1)], dim=1) if tokens else ids, caches
