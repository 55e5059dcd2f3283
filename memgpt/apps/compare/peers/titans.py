"""titans-pytorch: ``MemoryAsContextTransformer`` (MAC), the variant its README shows, with neural
memory on every layer (its default; the README sets no ``neural_memory_layers``).

Configuration:

- ``segment_len = shape.segment_len``: the local attention window is the segment (plus the learned
  tokens below); ``num_persist_mem_tokens = 4`` and ``num_longterm_mem_tokens = 4`` as the
  library's ``train_mac.py`` sets them for its 32-token window (the README's 16 go with a
  128-token window);
- neural memory on every layer: ``NeuralMemory`` with ``heads = shape.heads`` and the attention's
  ``dim_head`` (the library's default ``MemoryMLP``, depth 2, expansion 4, per head), updated once
  per window of ``segment_len + 4`` positions (the default ``neural_memory_segment_len``);
- attention ``heads = shape.heads``, ``dim_head = dim // heads`` rounded down to an even number
  (its rotary positions need one), ``depth = shape.depth``; everything else the library's
  defaults, including 4 hyper-connection residual streams. On CPU those dominate the cost (their
  Sinkhorn normalisation runs 20 ``F.normalize(p=1)`` per connection, slow in torch's CPU
  kernels): ``num_residual_streams = 1`` makes a training step about 4x faster, but it is not
  what the README builds, so it is left at the default;
- one repair: the per-head initial memory weights alias one tensor in 0.5.5, which AdamW cannot
  update; each gets its own storage after construction (see ``_own_storage``).

How it is fed: the MAC model has no public way to continue from a carried state. Its ``forward``
takes the whole sequence; its ``cache`` path (for ``sample``) decodes one token per call and
still re-embeds the whole prefix at every call. So the adapter carries the sample's tokens so far
as its state and runs the model on all of them at every segment, returning the last segment's
logits: exactly the MAC model on the whole sample (the neural memory carries information from
window to window inside the call, and gradients flow through it), at a cost that grows with the
prefix (quadratic in the number of segments). It stops at ``max_tokens = 1024`` tokens (64
segments): at ~125k parameters one segment at that prefix costs ~7 s of one CPU core at batch
32, so streaming one batch that far already takes minutes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..contender import Contender, ModelShape
from ._common import even_dim_head, installed, missing, refused

__all__ = ["PACKAGE", "MAX_TOKENS", "build"]

PACKAGE = "titans-pytorch==0.5.5"
MAX_TOKENS = 1024
PERSIST_TOKENS = 4
LONGTERM_TOKENS = 4


def _own_storage(model: torch.nn.Module) -> None:
    """titans-pytorch 0.5.5 makes each neural memory's per-head initial weights with
    ``einops.repeat``, which returns a stride-0 view: the heads alias one tensor and an optimizer's
    in-place update (AdamW) refuses it. Upstream has since added a ``.clone()`` there; this does
    the same from outside: every aliased parameter gets its own storage (same values)."""
    for p in model.parameters():
        if p.numel() > 1 and 0 in p.stride():
            p.data = p.data.contiguous()


def build(shape: ModelShape) -> Contender | str:
    try:
        from titans_pytorch import MemoryAsContextTransformer
    except Exception as err:  # noqa: BLE001 - any import failure means: this peer is missing
        return missing("titans-pytorch", err)
    dim_head = even_dim_head(shape.dim, shape.heads)
    config = dict(
        package=installed("titans-pytorch"),
        model="MemoryAsContextTransformer (MAC)",
        dim=shape.dim,
        depth=shape.depth,
        heads=shape.heads,
        dim_head=dim_head,
        segment_len=shape.segment_len,
        num_persist_mem_tokens=PERSIST_TOKENS,
        num_longterm_mem_tokens=LONGTERM_TOKENS,
        neural_memory_layers="all",
        neural_memory=dict(heads=shape.heads, dim_head=dim_head, model="MemoryMLP(depth=2, expansion=4)"),
        fed="whole prefix re-run at every segment",
        max_tokens=MAX_TOKENS,
    )
    try:
        model = MemoryAsContextTransformer(
            num_tokens=shape.vocab_size,
            dim=shape.dim,
            depth=shape.depth,
            segment_len=shape.segment_len,
            num_persist_mem_tokens=PERSIST_TOKENS,
            num_longterm_mem_tokens=LONGTERM_TOKENS,
            dim_head=dim_head,
            heads=shape.heads,
            neural_memory_kwargs=dict(dim_head=dim_head, heads=shape.heads),
        )
    except Exception as err:  # noqa: BLE001
        return refused("titans-pytorch", err)
    _own_storage(model)

    def step(ids: Tensor, prefix: Tensor | None) -> tuple[Tensor, Tensor]:
        prefix = ids if prefix is None else torch.cat((prefix, ids), dim=1)  # (b n)
        if prefix.shape[1] > MAX_TOKENS:
            raise ValueError(f"titans: {prefix.shape[1]} tokens exceed max_tokens={MAX_TOKENS}")
        return model(prefix)[:, -ids.shape[1] :], prefix

    def detach(prefix: Tensor | None) -> Tensor | None:
        return prefix  # token ids: nothing to cut (the graph is rebuilt from them at every segment)

    return Contender("titans", model, step, detach, config=config, max_tokens=MAX_TOKENS)
