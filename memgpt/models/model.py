"""MemGPTModel: a decoder-only language model of MemGPT blocks over segments of tokens.

A call may hold any number of tokens. Each row's real tokens (``attention_mask`` 1) are laid out
on that row's own segment grid, continuing from where its previous call stopped: row ``b``'s
k-th real token sits at virtual position ``position_b % T + k``, T = segment_len. The grid is then
processed one segment ("round") at a time, all rows in lockstep, each block attending within the
segment and reading the memory written by earlier segments. Padding takes no position, is never
attended to and never written, so a padded row computes exactly what it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from ..layers import MemoryLayer
from ..memory import start_log
from .block import BlockState, MemGPTBlock, SegmentView
from .config import MemGPTConfig
from .state import MemGPTState

__all__ = ["MemGPTModel", "MemGPTOutput", "GenerationOutput"]


@dataclass
class MemGPTOutput:
    """logits: (b n vocab), zero at padding positions; state: carry it into the next call."""

    logits: Tensor
    state: MemGPTState


@dataclass
class GenerationOutput:
    """sequences: (b n+new) the prompt followed by the generated tokens; state after the last one."""

    sequences: Tensor
    state: MemGPTState


def memory_layer(c: MemGPTConfig) -> MemoryLayer:
    """The memory layer a block of this configuration holds."""
    return MemoryLayer(
        c.dim,
        heads=c.memory_heads,
        capacity=c.memory_capacity,
        key_dim=c.key_dim,
        value_dim=c.value_dim,
        scale=c.scale,
        top_k=c.top_k,
        eviction=c.eviction,
        gated_scores=c.gated_scores,
        usage_decay=c.usage_decay,
        fusion_bias_init=c.fusion_bias_init,
        qk_norm=c.qk_norm,
        shift_keys=c.shift_keys,
    )


def _unshared(state: MemGPTState, caller: MemGPTState | None) -> MemGPTState:
    """``state`` with every memory store that still shares a tensor with ``caller``'s cloned
    (a layer that wrote nothing returns the caller's store itself), so donating it is safe."""
    if caller is None:
        return state
    layers = []
    for mine, theirs in zip(state.layers, caller.layers, strict=True):
        ptrs = {t.untyped_storage().data_ptr() for t in theirs.memory.to_dict().values()}
        shared = any(t.untyped_storage().data_ptr() in ptrs for t in mine.memory.to_dict().values())
        layers.append(BlockState(mine.memory.clone(), mine.buffer) if shared else mine)
    return MemGPTState(tuple(layers), state.position, state.previous)


class MemGPTModel(nn.Module):
    """``out = model(input_ids, state=None, attention_mask=None)`` -> ``out.logits``, ``out.state``."""

    def __init__(self, config: MemGPTConfig) -> None:
        super().__init__()
        if not isinstance(config, MemGPTConfig):
            raise TypeError(f"config must be a MemGPTConfig, got {type(config).__name__}")
        self.config = c = config
        self.token_emb = nn.Embedding(c.vocab_size, c.dim)
        # Embedding of the previous token (index 0 = none, 1 + id otherwise), added to the input.
        self.shift_emb = nn.Embedding(c.vocab_size + 1, c.dim) if c.token_shift else None
        self.pos_emb = nn.Embedding(c.segment_len, c.dim)  # position within the segment
        self.emb_dropout = nn.Dropout(c.dropout)
        blocks = [
            MemGPTBlock(c.dim, c.heads, memory_layer(c), ffn_dim=c.ffn_dim, dropout=c.dropout) for _ in range(c.depth)
        ]
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(c.dim)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.apply(self._init_weights)
        for block in blocks:
            block.memory.fusion.reset_parameters()  # its own documented initialisation
        if c.tie_embeddings:
            self.lm_head.weight = self.token_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Embeddings N(0, 0.02); linear maps N(0, 1/fan_in) with zero bias.

        The fan-in scaling matters for small models: with GPT-2's fixed std 0.02 at dim 64 the
        memory read starts ~6x weaker and segmented recall needed several times more steps to
        leave its plateau (docs/results/demo.md, *What makes the memory learn*).
        """
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def extra_repr(self) -> str:
        return f"segment_len={self.config.segment_len}, memory_capacity={self.config.memory_capacity}"

    # ------------------------------------------------------------------ state
    def _block(self, i: int) -> MemGPTBlock:
        """Block ``i``, typed (an ``nn.ModuleList`` is not): the MemGPTBlocks built in ``__init__``."""
        return cast(MemGPTBlock, self.blocks[i])

    @property
    def _param(self) -> Tensor:
        return self.token_emb.weight

    def empty_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> MemGPTState:
        """The state before any token: empty memories and segment buffers."""
        device = device if device is not None else self._param.device
        dtype = dtype if dtype is not None else self._param.dtype
        T = self.config.segment_len
        layers = tuple(
            self._block(i).empty_state(batch_size, T, device=device, dtype=dtype) for i in range(len(self.blocks))
        )
        zeros = torch.zeros(batch_size, dtype=torch.long, device=device)
        return MemGPTState(layers, zeros, zeros.clone())

    def check_state(self, state: MemGPTState, batch_size: int) -> None:
        """Raise ValueError/TypeError if ``state`` was not made for this model and batch."""
        if not isinstance(state, MemGPTState):
            raise TypeError(f"state must be a MemGPTState or None, got {type(state).__name__}")
        c, p = self.config, self._param
        if len(state.layers) != c.depth:
            raise ValueError(f"state has {len(state.layers)} layers, the model has depth {c.depth}")
        if state.batch_size != batch_size:
            raise ValueError(f"state was made for batch size {state.batch_size}, input has batch size {batch_size}")
        if state.position.device != p.device:
            raise ValueError(f"state is on {state.position.device}, the model on {p.device}")
        reference = self.empty_state(1, device="meta", dtype=p.dtype).layers[0]
        for i, layer in enumerate(state.layers):
            what = f"state layer {i}"
            self._block(i).memory.check_state(layer.memory, batch_size, p.device)
            if layer.memory.dtype != p.dtype:
                raise TypeError(f"{what}: memory dtype {layer.memory.dtype}, the model computes in {p.dtype}")
            for name in ("attn_keys", "attn_values", "keys", "values", "strength"):
                want = tuple(getattr(reference.buffer, name).shape[1:])
                got = tuple(getattr(layer.buffer, name).shape[1:])
                if want != got:
                    raise ValueError(f"{what}: buffer {name} must be (b, *{want}), got (b, *{got})")

    # ------------------------------------------------------------------ forward
    def _layout(
        self, input_ids: Tensor, present: Tensor, offset: Tensor, previous: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int]:
        """Lay each row's real tokens on its segment grid.

        Returns grid_ids (b W), grid_prev (b W) 1 + the id of each position's previous real token
        (0 = none), grid_present (b W), order (b n) the input position of the k-th real token of
        each row (padding after), vpos (b n) its grid position (W for none), the new ``previous``
        (b,), and W = rounds * T.
        """
        b, n = input_ids.shape
        T = self.config.segment_len
        order = (~present).to(torch.int8).argsort(dim=1, stable=True)  # real tokens first, in order
        packed = input_ids.gather(1, order)
        count = present.sum(dim=1)
        k = torch.arange(n, device=input_ids.device)[None, :]
        rounds = int((offset + count).max().add(T - 1).div(T, rounding_mode="floor"))
        W = rounds * T
        vpos = torch.where(k < count[:, None], offset[:, None] + k, W)
        grid_ids = torch.zeros(b, W + 1, dtype=input_ids.dtype, device=input_ids.device).scatter(1, vpos, packed)
        grid_present = torch.zeros(b, W + 1, dtype=torch.bool, device=input_ids.device).scatter(
            1, vpos, k < count[:, None]
        )
        packed_prev = torch.cat([previous[:, None], packed[:, :-1] + 1], dim=1)  # (b n)
        grid_prev = torch.zeros_like(grid_ids).scatter(1, vpos, packed_prev)
        last = packed.gather(1, (count - 1).clamp_min(0)[:, None])[:, 0] + 1
        new_previous = torch.where(count > 0, last, previous)
        return grid_ids[:, :W], grid_prev[:, :W], grid_present[:, :W], order, vpos, new_previous, W

    def forward(
        self,
        input_ids: Tensor,
        state: MemGPTState | None = None,
        attention_mask: Tensor | None = None,
        *,
        donate_state: bool = False,
    ) -> MemGPTOutput:
        """input_ids: (b n) int64; attention_mask: (b n), 1 = real token, 0 = padding (any position).

        Returns logits (b n vocab) and the new state.

        ``donate_state=True`` lets the memory writes go into ``state``'s own memory tensors, so a
        write costs O(tokens) instead of a copy of every store; ``state`` is consumed (using it
        again raises). :meth:`generate` does this for the states it makes itself. Under autograd
        the writes are logged (:mod:`memgpt.memory.reversible`): the same gradients, with each
        memory read recomputed in backward; the returned memories carry gradients only through
        the memory ops (``detach()`` them to carry them on to the next window).
        """
        if not isinstance(donate_state, bool):
            raise TypeError(f"donate_state must be a bool, got {type(donate_state).__name__}")
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (b n) tensor, got {got}")
        if input_ids.dtype not in (torch.long, torch.int32):
            raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        b, n = input_ids.shape
        device = self._param.device
        if input_ids.device != device:
            raise ValueError(f"input_ids are on {input_ids.device}, the model on {device}")
        if attention_mask is None:
            present = torch.ones(b, n, dtype=torch.bool, device=device)
        else:
            if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (b, n):
                got = (
                    tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
                )
                raise ValueError(f"attention_mask must be (b n) = {(b, n)}, got {got}")
            if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("attention_mask must hold only 0 and 1 (1 = real token)")
            present = attention_mask.to(device=device, dtype=torch.bool)
        if state is None:
            state = self.empty_state(b)
        else:
            self.check_state(state, b)
        if n and bool(((input_ids < 0) | (input_ids >= self.config.vocab_size)).any()):
            raise ValueError(
                f"input_ids must lie in [0, {self.config.vocab_size}), got min {int(input_ids.min())} "
                f"max {int(input_ids.max())}"
            )
        V, T = self.config.vocab_size, self.config.segment_len
        logits_dtype = self.lm_head.weight.dtype
        if n == 0 or not bool(present.any()):
            return MemGPTOutput(torch.zeros(b, n, V, device=device, dtype=logits_dtype), state)

        offset = state.position % T
        grid_ids, grid_prev, grid_present, order, vpos, previous, W = self._layout(
            input_ids, present, offset, state.previous
        )
        filled = torch.arange(T, device=device)[None, :] < offset[:, None]  # (b T)
        layer_states = list(state.layers)
        if donate_state and torch.is_grad_enabled():
            # Start the write logs before the first read, so that they use the stores as they are.
            layer_states = [BlockState(start_log(ls.memory), ls.buffer) for ls in layer_states]
        pieces = []
        for r in range(W // T):
            seg = slice(r * T, (r + 1) * T)
            seg_present = grid_present[:, seg]
            cols = seg_present.any(dim=0).nonzero().flatten()
            lo, hi = int(cols[0]), int(cols[-1]) + 1  # the slab of positions some row feeds
            flush = (filled | seg_present)[:, T - 1]
            view = SegmentView(
                start=lo,
                present=seg_present[:, lo:hi],
                filled=filled,
                flush=flush,
                cached=bool(filled.any()),
                flushing=bool(flush.any()),
            )
            slab = slice(r * T + lo, r * T + hi)
            x = self.token_emb(grid_ids[:, slab]) + self.pos_emb(torch.arange(lo, hi, device=device))
            if self.shift_emb is not None:
                x = x + self.shift_emb(grid_prev[:, slab])
            x = self.emb_dropout(x)
            for i, block in enumerate(self.blocks):
                x, layer_states[i] = block(x, layer_states[i], view=view, inplace_memory=donate_state)
            logits = self.lm_head(self.norm(x))  # (b w V)
            pieces += [logits.new_zeros(b, lo, V), logits, logits.new_zeros(b, T - hi, V)]
            filled = (filled | seg_present) & ~view.flush[:, None]

        grid_logits = torch.cat(pieces + [logits.new_zeros(b, 1, V)], dim=1)  # (b W+1 V); column W is "none"
        packed = grid_logits.gather(1, vpos[..., None].expand(b, n, V))
        logits = torch.zeros_like(packed).scatter(1, order[..., None].expand(b, n, V), packed)
        new_state = MemGPTState(tuple(layer_states), state.position + present.sum(dim=1), previous)
        if donate_state:  # a store that a usage read replaced was written through its copy: mark it too
            for old, new in zip(state.layers, new_state.layers, strict=True):
                if old.memory is not new.memory and not old.memory._donated:
                    old.memory._donate()
        return MemGPTOutput(logits, new_state)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        state: MemGPTState | None = None,
        *,
        attention_mask: Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        do_sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> GenerationOutput:
        """Decode ``max_new_tokens`` tokens after the prompt, one token per call (KV cache + memory).

        Greedy by default; ``do_sample=True`` samples from ``softmax(logits / temperature)``,
        restricted to the ``top_k`` most likely tokens if given. Every row needs at least one
        real prompt token (or a state that has seen one).
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        out = self(input_ids, state, attention_mask)
        b, n = input_ids.shape
        present = (
            torch.ones(b, n, dtype=torch.bool, device=input_ids.device)
            if attention_mask is None
            else attention_mask.bool()
        )
        if not bool(present.any(dim=1).all()):
            raise ValueError("every row needs at least one real prompt token (attention_mask has an all-zero row)")
        last = n - 1 - present.flip(1).to(torch.int8).argmax(dim=1)  # last real position per row
        logits = out.logits[torch.arange(b, device=input_ids.device), last]  # (b V)
        # The caller's state is never touched; the states made here are, so each memory write
        # costs O(tokens) rather than a copy of the store (the first one copies once if needed).
        state, new_tokens = _unshared(out.state, state), []
        for step in range(max_new_tokens):
            token = self._pick(logits, temperature, top_k, do_sample, generator)  # (b,)
            new_tokens.append(token)
            if step + 1 < max_new_tokens:
                out = self(token[:, None], state, donate_state=True)
                logits, state = out.logits[:, -1], out.state
            else:
                state = self(token[:, None], state, donate_state=True).state
        generated = torch.stack(new_tokens, dim=1) if new_tokens else input_ids.new_zeros(b, 0)
        return GenerationOutput(torch.cat([input_ids, generated.to(input_ids.dtype)], dim=1), state)

    @staticmethod
    def _pick(
        logits: Tensor, temperature: float, top_k: int | None, do_sample: bool, generator: torch.Generator | None
    ) -> Tensor:
        if not do_sample:
            return logits.argmax(dim=-1)
        logits = logits.float() / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
