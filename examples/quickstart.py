"""Quickstart: a drop-in memory layer and a MemGPT language model, state threaded through calls."""

import torch

import memgpt

torch.manual_seed(0)

# 1. A memory layer on its own: y, state = layer(x, state). The state is a plain value.
layer = memgpt.MemoryLayer(64, heads=4, capacity=128)
x1, x2 = torch.randn(2, 16, 64), torch.randn(2, 16, 64)  # (b n d)
y1, mem = layer(x1)  # reads an empty store, then writes x1's 16 tokens
y2, mem = layer(x2, mem)  # reads what x1 wrote
print(y2.shape, mem)  # (2, 16, 64); keys (b h m dk) = (2, 4, 128, 16)

# 2. A language model over segments of 32 tokens, memory carrying everything older.
config = memgpt.MemGPTConfig(vocab_size=256, dim=64, depth=2, heads=4, segment_len=32, memory_capacity=128)
model = memgpt.MemGPTModel(config)
ids = torch.randint(0, 256, (2, 100))
out = model(ids[:, :60])  # first call: 60 tokens (a partial segment is kept)
out = model(ids[:, 60:], out.state.detach())  # second call continues the stream
whole = model(ids)  # the same tokens in one call
print(out.logits.shape, torch.allclose(out.logits, whole.logits[:, 60:], atol=1e-5))
