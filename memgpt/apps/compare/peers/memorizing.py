"""memorizing-transformers-pytorch: ``MemorizingTransformer`` with its kNN memories (faiss on the
host), as its README shows (``knn_memories = model.create_knn_memories(batch_size=b)``, then
``model(segment, knn_memories=knn_memories)`` on every segment).

Configuration:

- one call reads one segment: causal attention over the segment's tokens (T5 relative position
  bias); the memorizing layer also attends to the ``num_retrieved_memories`` keys/values its
  queries retrieve from the kNN memory, then adds the segment's keys/values to it;
- memorizing layers: the peer's default, one layer at the midpoint (``depth // 2``, layer 1 of 2);
- memory: ``max_knn_memories = 32`` key-value entries per batch row (one per past token, width
  ``dim_head``, shared by the heads), the same number of entries as memgpt's 32-slot store, and
  ``num_retrieved_memories = 32`` (the README's value), as many as the memory is meant to hold, like
  memgpt's softmax over all its slots;
- what the memory really holds (read from ``knn_memory.py`` and checked entry by entry against
  ``index.reconstruct``): the keys/values sit in a per-row memmap ring of ``max_knn_memories``
  rows that always holds the last 32 tokens; the faiss index beside it is reset when its id list
  passes ``max_knn_memories``, but restarts with the overflowing segment while its id list restarts
  empty, so it holds 16, 32 or 48 entries in turn, and after the second reset its positions no
  longer match the ring's rows (``db_offsets`` is never rewound). A search then returns ring rows
  chosen by the wrong keys; with ``num_retrieved_memories = 32`` that means a query reads 16 to 32
  of the last 32 tokens' keys/values, whichever its (stale) matches point at. That is the peer's
  behaviour through its public API and is left as it is;
- the memory lives on the host (faiss HNSW indices, numpy memmaps in a temporary folder made per
  sample and removed when the state is dropped) and is not differentiable: the peer stores detached
  keys/values, so no gradient crosses a segment; ``detach`` has nothing to cut;
- ``heads = shape.heads``, ``dim_head = dim // heads``, ``depth = shape.depth``; everything else the
  library's defaults (no XL memory, feed-forward x4).

The peer's own dependency list names faiss-gpu (CUDA wheels): it is installed with ``--no-deps``
beside faiss-cpu, filelock, joblib and einops-exts (the ``peers`` extra).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from typing import Any

from torch import Tensor

from ..contender import Contender, ModelShape
from ._common import MEMORY_ENTRIES, installed, missing, refused

__all__ = ["PACKAGE", "KNNState", "build"]

PACKAGE = "memorizing-transformers-pytorch==0.4.1"


class KNNState:
    """One sample's kNN memories (one ``KNNMemory`` per memorizing layer, one faiss index per row)
    and the temporary folder holding their memmaps, removed with the state."""

    def __init__(self, model: Any, batch_size: int) -> None:
        self.directory = tempfile.mkdtemp(prefix="memgpt-knn-")
        weakref.finalize(self, shutil.rmtree, self.directory, ignore_errors=True)
        model.knn_memories_directory = self.directory  # create_knn_memories writes its memmaps here
        self.memories = model.create_knn_memories(batch_size=batch_size)
        self.batch_size = batch_size

    def numel(self) -> int:
        """Floats held: the keys and values in the faiss indices (the memmaps are fixed-size)."""
        return sum(knn.index.ntotal * 2 * memory.dim for memory in self.memories for knn in memory.knns)


def build(shape: ModelShape) -> Contender | str:
    try:
        import faiss  # noqa: F401 - the peer needs it at call time
        from memorizing_transformers_pytorch import MemorizingTransformer
    except Exception as err:  # noqa: BLE001 - any import failure means: this peer is missing
        return missing("memorizing-transformers-pytorch (pip install --no-deps) with faiss-cpu", err)
    config = dict(
        package=installed("memorizing-transformers-pytorch"),
        faiss=installed("faiss-cpu"),
        model="MemorizingTransformer",
        dim=shape.dim,
        depth=shape.depth,
        heads=shape.heads,
        dim_head=shape.dim // shape.heads,
        memorizing_layers=(max(1, shape.depth // 2),),
        max_knn_memories=MEMORY_ENTRIES,
        num_retrieved_memories=MEMORY_ENTRIES,
        memory="host-side faiss HNSW per row, not differentiable",
    )
    try:
        model = MemorizingTransformer(
            num_tokens=shape.vocab_size,
            dim=shape.dim,
            depth=shape.depth,
            dim_head=shape.dim // shape.heads,
            heads=shape.heads,
            memorizing_layers=(max(1, shape.depth // 2),),
            max_knn_memories=MEMORY_ENTRIES,
            num_retrieved_memories=MEMORY_ENTRIES,
        )
    except Exception as err:  # noqa: BLE001
        return refused("memorizing-transformers-pytorch", err)

    def step(ids: Tensor, state: KNNState | None) -> tuple[Tensor, KNNState]:
        if state is None or state.batch_size != ids.shape[0]:
            state = KNNState(model, ids.shape[0])
        return model(ids, knn_memories=state.memories), state

    def detach(state: KNNState | None) -> KNNState | None:
        return state  # host-side, never part of the graph

    return Contender("memorizing", model, step, detach, config=config)
