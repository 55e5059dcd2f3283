"""FLOPs of one block per token, written out explicitly (a multiply-add is 2 FLOPs).

Widths: d model width, f FFN hidden width, n segment length (causal: a query sees n/2 keys on
average), hm memory heads of dk/dv, m memory slots, k the top-k read's slots.

| part | forward FLOPs per token | fwd+bwd multiplier |
| --- | --- | --- |
| attention projections (qkv, out) | 8·d² | 3 |
| causal self-attention (scores, weighted sum) | 4·d·n/2 = 2·n·d | 3 |
| FFN | 4·d·f (16·d² at f = 4d) | 3 |
| memory read projections (query, out) | 2·d·hm·dk + 2·hm·dv·d | 3 |
| fusion gate, Linear(2d, d) | 4·d² | 3 |
| writer projections (key, value, gate) | 2·d·hm·(dk + dv + 1) | 1 |
| full read over m slots | 2·m·hm·(dk + dv) | 3 |
| top-k read: scoring all m slots to select | 2·m·hm·dk | 1 |
| top-k read: the k selected slots | 2·k·hm·(dk + dv) | 3 |

The multiplier is the usual 3 (backward = 2 × forward) except where no backward runs: the
writer's outputs only feed the next segment's memory, and the top-k selection runs without
gradient. ``torch.utils.flop_counter.FlopCounterMode`` confirms the projection rows exactly
(``dense_per_token`` below); it does not count CPU SDPA, and a timing shows that the CPU SDPA
backward costs the same whether or not keys and values need gradients, so the read's 3 is the
work the kernels do.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    name: str
    forward: float  # FLOPs per token
    multiplier: int  # fwd+bwd / fwd
    dense: bool  # a Linear layer (FlopCounterMode counts these on every device)


def plain_block(d: int, n: int, f: int) -> list[Part]:
    return [
        Part("attention projections", 8 * d * d, 3, True),
        Part("causal self-attention", 2 * n * d, 3, False),
        Part("FFN", 4 * d * f, 3, True),
    ]


def memory_parts(d: int, hm: int, dk: int, dv: int, m: int, top_k: int | None) -> list[Part]:
    parts = [
        Part("read projections", 2 * d * hm * dk + 2 * hm * dv * d, 3, True),
        Part("fusion gate", 4 * d * d, 3, True),
        Part("writer projections", 2 * d * hm * (dk + dv + 1), 1, True),
    ]
    if top_k is None:
        parts.append(Part(f"full read over {m} slots", 2 * m * hm * (dk + dv), 3, False))
    else:
        k = min(top_k, m)
        parts.append(Part(f"top-{k} selection over {m} slots", 2 * m * hm * dk, 1, False))
        parts.append(Part(f"top-{k} read", 2 * k * hm * (dk + dv), 3, False))
    return parts


def fwd_bwd_per_token(parts: list[Part]) -> float:
    return sum(p.forward * p.multiplier for p in parts)


def dense_per_token(parts: list[Part]) -> float:
    """What FlopCounterMode should count for the Linear layers of one fwd+bwd, per token."""
    return sum(p.forward * p.multiplier for p in parts if p.dense)
