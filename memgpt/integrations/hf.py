"""Memory layers inserted into a Hugging Face transformer (GPT-2, Llama-family, BERT encoders).

::

    from memgpt.integrations.hf import MemoryModel

    mm = MemoryModel(gpt2, after=[5, 11], capacity=1024, heads=4)    # hooks, nothing rewritten
    out = mm(input_ids, attention_mask=mask)                          # first segment: empty memory
    out = mm(next_ids, attention_mask=next_mask, memory_state=out.memory_state.detach())
    out.logits, out.memory_state                                      # the HF output + the new memory
    gen = mm.generate(prompt, attention_mask=pmask, memory_state=out.memory_state, max_new_tokens=20)
    gen.sequences, gen.memory_state                                   # greedy/sampling, memory carried

Each call is one segment: its tokens read what earlier calls wrote, then its real tokens
(``attention_mask`` 1) are written. The memory after layer ``i`` is a :class:`ResidualMemory`
applied to that layer's output hidden states, initialised near the identity.

How the state reaches the layers: :class:`MemoryModel` registers a forward hook on each chosen
layer; during one call of :meth:`MemoryModel.forward` a context variable holds that call's
memory stores and token mask, and the hooks read and replace them. Nothing lives on a module
between calls; calling the inner model directly while the hooks are installed raises (use
:meth:`MemoryModel.remove` to take them out).

``transformers`` is imported only when a :class:`MemoryModel` is built (extra ``hf``).
"""

from __future__ import annotations

import contextvars
import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..memory import MemoryState
from .states import MemoryStates
from .wrap import ResidualMemory, drop_in_bias, drop_in_memory

__all__ = ["MemoryModel", "find_layers"]


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # name the extra, not just the module
        raise ImportError("memgpt.integrations.hf needs the Hugging Face extra: pip install 'memgpt-layers[hf]'") from e
    return transformers


@dataclass
class _Call:
    """What one MemoryModel.forward call shares with its hooks (lives only during the call)."""

    states: dict[int, MemoryState | None]
    attention_mask: Tensor | None
    new: dict[int, MemoryState] = field(default_factory=dict)
    written: set[int] = field(default_factory=set)  # generate: the layers any inner forward wrote

    def advance(self, attention_mask: Tensor | None) -> None:
        """generate: the next inner forward reads what the previous one wrote, under its own mask."""
        self.written.update(self.new)
        self.states.update(self.new)
        self.new = {}
        self.attention_mask = attention_mask

    def token_mask(self, h: Tensor) -> Tensor | None:
        """(b n) bool for hidden states h (b n d): the last n columns of the attention mask
        (with a KV cache the mask spans the cached tokens too, as in Hugging Face)."""
        if self.attention_mask is None:
            return None
        b, n = h.shape[:2]
        am = self.attention_mask
        if am.shape[0] != b or am.shape[1] < n:
            raise ValueError(f"attention_mask {tuple(am.shape)} does not cover hidden states (b n) = {(b, n)}")
        return am[:, am.shape[1] - n :].to(device=h.device) != 0


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("memgpt_hf_call", default=None)


def _layers_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "num_hidden_layers", None)


def find_layers(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer layers: ``(dotted path, ModuleList)``.

    Without ``path``: the one ``nn.ModuleList`` holding ``config.num_hidden_layers`` modules of
    one class (``transformer.h`` in GPT-2, ``model.layers`` in Llama, ``encoder.layer`` in BERT).
    """
    if path is not None:
        try:
            layers = model.get_submodule(path)
        except AttributeError as e:
            raise ValueError(f"layers_path {path!r} names no submodule of {type(model).__name__}") from e
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"layers_path {path!r} must name an nn.ModuleList, got {type(layers).__name__}")
        return path, layers
    n = _layers_count(model)
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n) and len({type(x) for x in m}) == 1
    ]
    if len(candidates) != 1:
        found = [f"{name} ({len(m)} x {type(m[0]).__name__})" for name, m in candidates] or ["none"]
        raise ValueError(
            f"cannot tell which ModuleList of {type(model).__name__} holds its {n} transformer layers; "
            f"candidates: {', '.join(found)}. Pass layers_path='...'"
        )
    return candidates[0]


def _checkpointing(model: nn.Module) -> bool:
    # transformers 5 renamed the property (the old name warns); 4.x has only the old one.
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


class MemoryModel(nn.Module):
    """A Hugging Face model with memory layers after the layers ``after`` (indices, -1 = last).

    ``out = mm(input_ids, attention_mask=None, memory_state=None, **hf_kwargs)`` returns the
    model's own output (``out.logits``, ``out.last_hidden_state``, ``out.loss``...) with
    ``out.memory_state`` added: a :class:`MemoryStates`, one store per inserted layer, to pass
    to the next call. Everything but ``input_ids`` goes by keyword (so that the attention mask,
    which decides what is written, is never missed).

    ``capacity``, ``heads`` and ``memory_kwargs`` configure each :class:`MemoryLayer`.
    ``fusion_bias_init`` None starts near the identity: :func:`drop_in_bias` of the number of
    inserted layers (6 for one, 6 + ln k for k), so the whole model changes about as much as one
    layer at bias 6 does. For a model trained from scratch, an open gate (0.0) learns faster.
    ``dim`` defaults to ``config.hidden_size``; ``layers_path`` to :func:`find_layers`' choice.
    Parameters: ``mm.model.*`` (the wrapped model, unchanged) and ``mm.memories.<i>.layer.*``.
    """

    def __init__(
        self,
        model: nn.Module,
        after: Sequence[int],
        *,
        capacity: int,
        heads: int = 1,
        fusion_bias_init: float | None = None,
        dim: int | None = None,
        layers_path: str | None = None,
        **memory_kwargs: Any,
    ) -> None:
        super().__init__()
        _require_transformers()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.layers_path, layers = find_layers(model, layers_path)
        self.after = self._indices(after, len(layers))
        if dim is None:
            dim = getattr(getattr(model, "config", None), "hidden_size", None)
            if dim is None:
                raise ValueError(f"{type(model).__name__} has no config.hidden_size: pass dim=")
        self.model = model
        if fusion_bias_init is None:
            fusion_bias_init = drop_in_bias(len(self.after))
        memories = {}
        for i in self.after:
            layer = drop_in_memory(
                dim, capacity=capacity, heads=heads, fusion_bias_init=fusion_bias_init, **memory_kwargs
            )
            p = next(layers[i].parameters(), None)  # sit beside the layer (dtype, device map)
            memories[str(i)] = ResidualMemory(layer if p is None else layer.to(device=p.device, dtype=p.dtype))
        self.memories = nn.ModuleDict(memories)
        # prepend: run before any hook transformers installed earlier (its output_hidden_states
        # recorder), so that hidden states are reported with the memory applied, as in 4.x.
        self._handles = [
            layers[i].register_forward_hook(functools.partial(self._hook, i), prepend=True) for i in self.after
        ]

    @staticmethod
    def _indices(after: Sequence[int], n: int) -> tuple[int, ...]:
        if isinstance(after, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in after):
            raise TypeError(f"after must be a sequence of layer indices (ints), got {after!r}")
        out = []
        for i in after:
            if not -n <= i < n:
                raise ValueError(f"layer index {i} is out of range for {n} layers")
            out.append(i % n)
        if not out or len(set(out)) != len(out):
            raise ValueError(f"after must name at least one layer, each once; got {list(after)} ({n} layers)")
        return tuple(sorted(out))

    def extra_repr(self) -> str:
        return f"layers_path={self.layers_path!r}, after={list(self.after)}"

    def empty_memory_state(self, batch_size: int) -> MemoryStates:
        """Empty stores for ``batch_size`` rows, each on its memory layer's device and dtype."""
        states = []
        for i in self.after:
            memory = cast(ResidualMemory, self.memories[str(i)])  # what __init__ put there; ModuleDict is untyped
            p = next(memory.parameters())
            states.append(memory.empty_state(batch_size, device=p.device, dtype=p.dtype))
        return MemoryStates(tuple(states))

    def memory_parameters(self):
        """The parameters of the inserted memory layers only (e.g. a higher learning rate)."""
        return self.memories.parameters()

    def remove(self) -> nn.Module:
        """Take the hooks out; returns the inner model, which computes as before insertion."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.model

    def _hook(self, index: int, module: nn.Module, args: tuple, output: Any) -> Any:
        call = _CALL.get()
        if call is None:
            raise RuntimeError(
                f"a memory layer is inserted after layer {index}: call the MemoryModel wrapper, not the inner "
                "model (or MemoryModel.remove() the hooks)"
            )
        if index in call.new:
            raise RuntimeError(f"layer {index} ran twice in one call; its memory would be written twice")
        h = output[0] if isinstance(output, tuple) else output  # transformers 4.x layers return tuples
        y, call.new[index] = self.memories[str(index)](h, call.states[index], call.token_mask(h))
        return (y, *output[1:]) if isinstance(output, tuple) else y

    def forward(self, input_ids: Tensor | None = None, *, memory_state: MemoryStates | None = None, **kwargs: Any):
        """input_ids: (b n); attention_mask (keyword): (b n) or (b t) with a KV cache, 1 = real token.

        Returns the wrapped model's output with ``memory_state`` (a MemoryStates) added.
        """
        if kwargs.get("return_dict") is False:
            raise ValueError("return_dict=False is not supported: the memory state travels on the output object")
        if self.training and _checkpointing(self.model):
            raise ValueError(
                "gradient checkpointing re-runs layers in the backward pass, outside the call that carries the "
                "memory state; disable it on the wrapped model"
            )
        self._check_hooks()
        call = _Call(self._states(memory_state), _checked_mask(kwargs.get("attention_mask")))
        token = _CALL.set(call)
        try:
            out = self.model(input_ids, **kwargs) if input_ids is not None else self.model(**kwargs)
        finally:
            _CALL.reset(token)
        missing = [i for i in self.after if i not in call.new]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in this call, so their memory was not updated")
        out["memory_state"] = MemoryStates(tuple(call.new[i] for i in self.after))
        return out

    def generate(self, input_ids: Tensor | None = None, *, memory_state: MemoryStates | None = None, **kwargs: Any):
        """The wrapped model's Hugging Face ``generate``, with the memory carried through decoding.

        Every forward pass ``generate`` makes (the prompt, then one per new token, reusing the KV
        cache) is a call as in :meth:`forward`: its real tokens read the memory the previous
        pass left, then are written. ``memory_state`` (a MemoryStates of ``b`` rows, or None:
        empty) is what the prompt reads. Returns ``generate``'s output object
        (``return_dict_in_generate`` is always on: ``out.sequences``, ...) with ``memory_state``
        added: the prompt and every generated token but the last, which no forward pass saw
        (feed it to the next call). With ``num_return_sequences=k`` each row's memory is
        repeated k times, as ``generate`` repeats the prompt.

        Greedy decoding and sampling only: beam search reorders the KV cache and not the memory;
        assisted and contrastive decoding run tokens they then drop, which the memory would
        keep; ``use_cache=False`` re-runs the whole sequence each step, writing it again.
        A model without a language-model head (e.g. a BERT encoder) raises TypeError.
        """
        generate = getattr(self.model, "generate", None)
        can_generate = getattr(self.model, "can_generate", None)
        if not callable(generate) or (callable(can_generate) and not can_generate()):
            raise TypeError(
                f"{type(self.model).__name__} cannot generate (it has no language-model head); call the MemoryModel "
                "itself, mm(input_ids, attention_mask=..., memory_state=...), which returns its outputs and the memory"
            )
        if kwargs.get("return_dict_in_generate") is False:
            raise ValueError(
                "return_dict_in_generate=False is not supported: the memory state travels on the output object"
            )
        self._check_hooks()
        kwargs["return_dict_in_generate"] = True
        copies = self._check_decoding(kwargs)
        if memory_state is not None and copies > 1 and isinstance(memory_state, MemoryStates):
            rows = torch.arange(memory_state.batch_size, device=memory_state[0].device)
            memory_state = memory_state.index_select(rows.repeat_interleave(copies))  # as generate repeats the prompt
        call = _Call(self._states(memory_state), None)
        # Each inner forward (entered through the wrapped model's __call__) moves the call on.
        step = self.model.register_forward_pre_hook(
            lambda _module, _args, kw: call.advance(_checked_mask(kw.get("attention_mask"))), with_kwargs=True
        )
        token = _CALL.set(call)
        try:
            out = generate(input_ids, **kwargs) if input_ids is not None else generate(**kwargs)
        finally:
            _CALL.reset(token)
            step.remove()
        call.advance(None)
        missing = [i for i in self.after if i not in call.written]
        if missing:
            raise RuntimeError(f"layers {missing} never ran during generate, so their memory was not updated")
        out["memory_state"] = MemoryStates(tuple(cast(MemoryState, call.states[i]) for i in self.after))
        return out

    def _check_decoding(self, kwargs: dict[str, Any]) -> int:
        """Refuse the decoding methods the memory cannot follow; returns num_return_sequences."""
        if kwargs.get("custom_generate") is not None:
            raise ValueError("custom_generate is not supported by MemoryModel.generate: its decoding is unknown")
        transformers = _require_transformers()
        base = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        config = copy.deepcopy(base) if base is not None else transformers.GenerationConfig()
        config.update(**{k: v for k, v in kwargs.items() if k != "generation_config"})
        mode = config.get_generation_mode(kwargs.get("assistant_model"))
        mode = str(getattr(mode, "value", mode))
        if mode not in ("greedy_search", "sample"):
            raise ValueError(
                f"MemoryModel.generate decodes greedily or by sampling (num_beams=1, no assistant), got {mode}: "
                "beams reorder the KV cache but not the memory, and assisted or contrastive decoding would write "
                "tokens it then drops"
            )
        if config.use_cache is False:
            raise ValueError(
                "use_cache=False is not supported by MemoryModel.generate: each step would re-run, and so write "
                "into the memory again, every token so far"
            )
        return int(config.num_return_sequences or 1)

    def _check_hooks(self) -> None:
        if len(self._handles) != len(self.after):
            raise RuntimeError("the memory hooks were removed (MemoryModel.remove()); call the inner model directly")

    def _states(self, memory_state: MemoryStates | None) -> dict[int, MemoryState | None]:
        """The store each inserted layer reads first (None: an empty one), checked against the model."""
        if memory_state is None:
            return {i: None for i in self.after}
        if not isinstance(memory_state, MemoryStates):
            raise TypeError(f"memory_state must be a MemoryStates or None, got {type(memory_state).__name__}")
        if len(memory_state) != len(self.after):
            raise ValueError(
                f"memory_state holds {len(memory_state)} memories, the model has {len(self.after)} "
                f"(after layers {list(self.after)})"
            )
        return dict(zip(self.after, memory_state))


def _checked_mask(mask: Any) -> Tensor | None:
    if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask must be a (b n) tensor, 1 = real token, got {got}")
    return mask
