"""Drop a memory layer after any block that maps (b n d) -> (b n d).

Semantics ("each call is one segment"): every token of a call reads the memory as the
*earlier* calls left it (never this call's own writes), then the call's real tokens are
written. The state is explicit: ``y, state = wrapped(x, state)``.

Scale. A memory layer inserted into an existing residual stream must not care how large that
stream is (a randomly initialised GPT-2's is ~0.02 per element; trained models' can be orders of
magnitude larger). :class:`ResidualMemory` therefore runs the memory layer on the stream's *direction*
``u = h / rms(h)`` and puts the result back at the stream's scale::

    y = rms(h) * Fusion(u, Read(u, M)),   M' = Write(u, M)

so ``y - h = rms(h) * (1 - lambda) * (r - u)``: the relative change of each token is
``(1 - lambda) |r - u| / |u|`` whatever the scale of ``h``. With the drop-in fusion bias
(:data:`DROP_IN_FUSION_BIAS` = 6, ``lambda`` = 0.9975 at insertion) that is at most about
0.25 % per inserted layer (``|r| << |u|`` at initialisation; measured figures: docs/how-to/own-model.md,
*Identity at insertion*). With an empty memory the read is zero and ``y = lambda * h``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..layers import MemoryLayer
from ..layers._validation import check_input
from ..memory import MemoryState

__all__ = ["DROP_IN_FUSION_BIAS", "drop_in_bias", "drop_in_memory", "ResidualMemory", "WithMemory"]

# sigmoid(6) = 0.99753: the fusion keeps 99.75 % of the stream at insertion.
DROP_IN_FUSION_BIAS = 6.0
"""Fusion gate bias of one inserted memory layer: ``lambda = sigmoid(6) = 0.9975``, nearly the identity."""


def drop_in_bias(layers: int) -> float:
    """Fusion bias for ``layers`` memory layers inserted into one model: ``6 + ln(layers)``.

    Each inserted layer changes the stream by about ``1 - lambda ~ exp(-bias)``, and the changes
    add up along the depth (measured: memory after all 12 layers of a GPT-2 at bias 6 moved its
    logits by 1.2 %, after one layer by 0.15 %). Adding ``ln(layers)`` keeps the total at what
    one layer at bias 6 costs, and no larger bias than needed (a closed gate learns slowly).
    """
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be an int >= 1, got {layers!r}")
    return DROP_IN_FUSION_BIAS + math.log(layers)


def drop_in_memory(
    dim: int, *, capacity: int, heads: int = 1, fusion_bias_init: float = DROP_IN_FUSION_BIAS, **kwargs
) -> MemoryLayer:
    """A :class:`MemoryLayer` initialised near the identity, for insertion into an existing model.

    Same arguments as ``MemoryLayer``; only the default ``fusion_bias_init`` differs (6.0).
    """
    return MemoryLayer(dim, heads=heads, capacity=capacity, fusion_bias_init=fusion_bias_init, **kwargs)


class ResidualMemory(nn.Module):
    """``y, state = rm(h, state=None, mask=None)``: a memory layer on a residual stream h (b n d).

    ``y = rms(h) * layer(h / rms(h))`` (see the module docstring): scale-free reads and writes, and
    a change to ``h`` proportional to ``h``. ``mask`` (b n) bool, True = real token: padding is
    never written. ``state`` None is an empty store in h's dtype.
    """

    def __init__(self, layer: MemoryLayer, *, eps: float = 1e-6) -> None:
        super().__init__()
        if not isinstance(layer, MemoryLayer):
            raise TypeError(f"layer must be a MemoryLayer, got {type(layer).__name__}")
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0):
            raise ValueError(f"eps must be a float > 0, got {eps!r}")
        self.layer = layer
        self.eps = float(eps)

    @property
    def dim(self) -> int:
        """``d``, the width of the stream."""
        return self.layer.dim

    def extra_repr(self) -> str:
        return f"eps={self.eps}"

    def empty_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> MemoryState:
        """An empty store for ``batch_size`` rows (see :meth:`MemoryLayer.empty_state`)."""
        return self.layer.empty_state(batch_size, device=device, dtype=dtype)

    def forward(
        self, h: Tensor, state: MemoryState | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, MemoryState]:
        """h: (b n d); mask: (b n) bool or None -> y (b n d), the new state."""
        check_input("h", h, self.dim)
        # The rms in float32 at least: a bf16 mean of squares over d elements loses digits.
        wide = torch.promote_types(h.dtype, torch.float32)
        rms = h.to(wide).pow(2).mean(dim=-1, keepdim=True).add(self.eps).sqrt()  # (b n 1)
        u = (h.to(wide) / rms).to(h.dtype)
        fused, state = self.layer(u, state, mask)
        return (fused.to(wide) * rms).to(h.dtype), state


class WithMemory(nn.Module):
    """``y, state = wrapped(x, state=None, mask=None, **block_kwargs)``: ``block`` then memory.

    ``block`` is any module mapping x (b n d) to a tensor of the same shape (a
    ``torch.nn.TransformerEncoderLayer(..., batch_first=True)``, a user's block);
    ``block_kwargs`` go to it unchanged. ``memory``: a :class:`MemoryLayer` (use
    :func:`drop_in_memory` to start near the identity) or a :class:`ResidualMemory`.
    ``mask`` (b n) bool, True = real token, concerns the memory only: padding is never written
    (give the block its own padding mask in its own convention). Wrapping k blocks of one model,
    use ``drop_in_memory(d, capacity=..., fusion_bias_init=drop_in_bias(k))``: the changes of
    the inserted layers add up.
    """

    def __init__(self, block: nn.Module, memory: MemoryLayer | ResidualMemory) -> None:
        super().__init__()
        if not isinstance(block, nn.Module):
            raise TypeError(f"block must be a torch.nn.Module, got {type(block).__name__}")
        if (
            isinstance(block, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
            and not block.self_attn.batch_first
        ):
            raise ValueError(
                f"{type(block).__name__} must be built with batch_first=True: WithMemory works on (b n d), "
                "the layer expects (n b d)"
            )
        if isinstance(memory, MemoryLayer):
            memory = ResidualMemory(memory)
        if not isinstance(memory, ResidualMemory):
            raise TypeError(f"memory must be a MemoryLayer or ResidualMemory, got {type(memory).__name__}")
        self.block = block
        self.memory = memory

    def empty_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> MemoryState:
        """An empty store for ``batch_size`` rows of the memory after the block."""
        return self.memory.empty_state(batch_size, device=device, dtype=dtype)

    def forward(
        self, x: Tensor, state: MemoryState | None = None, mask: Tensor | None = None, **block_kwargs
    ) -> tuple[Tensor, MemoryState]:
        """x: (b n d) -> y (b n d), the new memory state."""
        check_input("x", x, self.memory.dim)
        h = self.block(x, **block_kwargs)
        if not isinstance(h, Tensor) or h.shape != x.shape:
            got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise ValueError(f"the wrapped block must return a tensor of the input's shape {tuple(x.shape)}, got {got}")
        return self.memory(h, state, mask)
