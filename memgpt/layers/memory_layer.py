"""The drop-in memory layer: read the store, fuse what was read, write this call's tokens."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..memory import USAGE_DECAY, MemoryState, write
from ..memory.checks import check_eviction
from ..memory.reversible import carry_log, start_log
from ._validation import check_input, check_token_mask, positive_int
from .fusion import GatedFusion
from .reader import SoftmaxReader
from .writer import GatedWriter
from .writer import shift_keys as shifted_keys

__all__ = ["MemoryLayer"]


class MemoryLayer(nn.Module):
    """``y, state = layer(x, state, mask)``: reader -> fusion -> writer on x (b n dim).

    Reads the memory as it was before the call (every token of the call sees the same store),
    returns ``y = GatedFusion(x, Read(x))`` and the store with this call's tokens written.
    No norm inside: put it where your model wants it. ``state=None`` is an empty store in x's
    dtype; a given store keeps its own dtype (e.g. bf16 storage under an fp32 model): queries,
    keys and values are cast to it and the read is cast back to x's dtype.

    With ``scale=1.0, gated_scores=False, heads=1`` it computes exactly the seed's formulas.
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 1,
        capacity: int,
        key_dim: int | None = None,
        value_dim: int | None = None,
        scale: float | None = None,
        top_k: int | None = None,
        eviction: str = "fifo",
        gated_scores: bool = True,
        usage_decay: float = USAGE_DECAY,
        fusion_bias_init: float = 0.0,
        qk_norm: bool = False,
        shift_keys: bool = False,
    ) -> None:
        super().__init__()
        check_eviction(eviction)
        if not isinstance(shift_keys, bool):
            raise TypeError(f"shift_keys must be a bool, got {type(shift_keys).__name__} ({shift_keys!r})")
        self.shift_keys = shift_keys
        self.capacity = positive_int("capacity", capacity)
        self.eviction = eviction
        if isinstance(usage_decay, bool) or not isinstance(usage_decay, (int, float)) or not 0 <= usage_decay <= 1:
            raise ValueError(f"usage_decay must be a float in [0, 1], got {usage_decay!r}")
        self.usage_decay = float(usage_decay)
        self.reader = SoftmaxReader(
            dim, heads, key_dim, value_dim, scale=scale, top_k=top_k, gated_scores=gated_scores, qk_norm=qk_norm
        )
        self.writer = GatedWriter(dim, heads, key_dim, value_dim)
        self.fusion = GatedFusion(dim, bias_init=fusion_bias_init)

    @property
    def dim(self) -> int:
        """``d``, the width of the inputs and outputs."""
        return self.reader.dim

    @property
    def heads(self) -> int:
        """``h``, the memory heads."""
        return self.reader.heads

    def extra_repr(self) -> str:
        return (
            f"capacity={self.capacity}, eviction={self.eviction!r}, usage_decay={self.usage_decay}, "
            f"shift_keys={self.shift_keys}"
        )

    def empty_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> MemoryState:
        """An empty store for ``batch_size`` rows: keys (b h m dk), values (b h m dv), no valid slot."""
        r = self.reader
        return MemoryState.empty(batch_size, r.heads, self.capacity, r.key_dim, r.value_dim, device=device, dtype=dtype)

    def check_state(self, state: MemoryState, batch_size: int, device: torch.device) -> None:
        """Raise TypeError/ValueError if ``state`` was not made for this layer, ``batch_size`` rows and
        ``device`` (heads, widths, capacity), or was donated to an in-place write."""
        if not isinstance(state, MemoryState):
            raise TypeError(f"state must be a MemoryState or None, got {type(state).__name__}")
        r = self.reader
        state.check_compatible(
            batch_size=batch_size,
            heads=r.heads,
            key_dim=r.key_dim,
            value_dim=r.value_dim,
            capacity=self.capacity,
            device=device,
        )

    def read(self, x: Tensor, state: MemoryState, mask: Tensor | None = None) -> tuple[Tensor, MemoryState]:
        """Read and fuse: x (b n d) -> (y (b n d), state with usage updated when eviction='usage')."""
        y = self.fusion(x, self.reader(x, state))
        if self.eviction == "usage":
            usage = state.usage + self.reader.usage(x, state, mask)
            state = carry_log(state, state.replace(usage=usage))  # a logged store stays in its log
        return y, state

    def write(self, x: Tensor, state: MemoryState, mask: Tensor | None = None, *, inplace: bool = False) -> MemoryState:
        """Write the tokens of x (b n d) where mask (b n) is True (``inplace``: see :meth:`store`)."""
        keys, values, strength = self.writer(x)
        return self.store(keys, values, strength, state, mask=mask, inplace=inplace)

    def store(
        self,
        keys: Tensor,
        values: Tensor,
        strength: Tensor,
        state: MemoryState,
        mask: Tensor | None = None,
        *,
        inplace: bool = False,
    ) -> MemoryState:
        """Write the writer's outputs (keys (b h n dk), values (b h n dv), strength (b h n)).

        ``inplace=True`` writes into ``state``'s tensors and donates it (logged under autograd);
        see :func:`memgpt.memory.write`. With ``shift_keys`` the slot of token t is keyed by token
        t-1's key over the tokens of this call (the first by the key bias): a MemGPTModel stores
        one whole segment per call, so streaming and whole-sequence calls store the same keys.
        """
        if self.shift_keys:
            keys = shifted_keys(keys, self.writer.null_key())
        return write(
            state,
            keys.to(state.dtype),
            values.to(state.dtype),
            strength,
            mask=mask,
            eviction=self.eviction,
            usage_decay=self.usage_decay,
            inplace=inplace,
        )

    def forward(
        self, x: Tensor, state: MemoryState | None = None, mask: Tensor | None = None, *, inplace: bool = False
    ) -> tuple[Tensor, MemoryState]:
        """x: (b n d); state: MemoryState or None (empty); mask: (b n) bool, True = real token.

        Returns y (b n d) and the new state. Padding (mask False) is never written.
        ``inplace=True`` writes into ``state``'s tensors (donating it) instead of a copy; under
        autograd the write is logged: pass ``memgpt.memory.start_log(state)`` the first time so
        that the store is not copied once (see :mod:`memgpt.memory.reversible`).
        """
        check_input("x", x, self.dim)
        b, n, _ = x.shape
        if mask is not None:
            check_token_mask(mask, b, n, x.device)
        if state is None:
            state = self.empty_state(b, device=x.device, dtype=x.dtype)
            if inplace and torch.is_grad_enabled():
                state = start_log(state)  # a fresh store: its log can use it as it is
        else:
            self.check_state(state, b, x.device)
        y, state = self.read(x, state, mask)
        return y, self.write(x, state, mask, inplace=inplace)
