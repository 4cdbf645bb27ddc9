"""The retrieval policy: how scores are made absolute, cut and grouped."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from llama_index.core.schema import BaseNode

# A score of 0 means "no relation": such chunks are never returned.
TINY_SCORE = float(np.finfo(np.float32).tiny)


def parent_id(child: BaseNode) -> str:
    """The parent a child chunk stands for (parent-child chunking); itself otherwise."""
    return str(child.metadata.get("parent_id", child.node_id))


# Children asked for per parent wanted, at first: several children may share a parent.
CHILDREN_PER_PARENT = 4


def best_parents(ranked: Callable[[int], list[tuple[int, float]]],
                 parent_ids: Callable[[list[int]], list[str]], top_k: int
                 ) -> list[tuple[str, float]]:
    """Parent-child chunking: children are matched, each parent returned once with its
    best child's score. Several children may share a parent, so children are asked for
    in growing batches until ``top_k`` parents are found or no more children pass."""
    want = top_k * CHILDREN_PER_PARENT
    while True:
        children = ranked(want)
        best: dict[str, float] = {}
        for parent, (_, score) in zip(parent_ids([row for row, _ in children]), children,
                                      strict=True):
            best.setdefault(parent, score)
        if len(best) >= top_k or len(children) < want:
            return list(best.items())[:top_k]
        want *= 4
