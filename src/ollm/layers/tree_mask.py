"""Tree attention masks: many candidate continuations verified in one pass.

A speculative tree lays its nodes out in consecutive KV slots (parents before children); a node
attends to the whole prefix before the tree and to its own ancestors (itself included), never to
its siblings or cousins, and sits at rotary position ``start + depth``. Outside the tree the
mask is causal (prefix keys precede every node); a sliding window counts positions, not slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TreeMask:
    """Rows ``[start, start + n)`` of the KV slots form a tree: ``ancestors[i, j]`` says node i
    sees node j (j an ancestor of i, or i itself); ``depth[i]`` is i's distance from the
    first node (so its position is ``start + depth[i]``)."""

    start: int  # slot (and position) of node 0
    ancestors: torch.Tensor  # [n, n] bool
    depth: torch.Tensor  # [n] long

    @classmethod
    def from_parents(cls, start: int, parents: Sequence[int]) -> TreeMask:
        """The tree whose node i hangs off ``parents[i]`` (< i; -1: off the prefix)."""
        n = len(parents)
        anc = torch.eye(n, dtype=torch.bool)
        depth = [0] * n
        for i, p in enumerate(parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i}'s parent {p} must be -1 or an earlier node")
            if p >= 0:
                anc[i] |= anc[p]
                depth[i] = depth[p] + 1
        return cls(start, anc, torch.tensor(depth, dtype=torch.long))

    @property
    def size(self) -> int:
        """Nodes in the tree."""
        return len(self.depth)

    def shifted(self, by: int) -> TreeMask:
        """The same tree with every slot ``by`` lower (keys before it were dropped)."""
        return TreeMask(self.start - by, self.ancestors, self.depth)

    def allowed(
        self, q_slots: torch.Tensor, k_slots: torch.Tensor, window: int | None
    ) -> torch.Tensor:
        """Bool [r, k]: which keys ``k_slots`` [1, k] the queries at ``q_slots`` [r, 1] (tree
        rows or earlier rows) see."""
        dev = q_slots.device
        anc, depth = self.ancestors.to(dev), self.depth.to(dev)
        n = self.size
        q_in = q_slots >= self.start
        qi = (q_slots - self.start).clamp(0, n - 1)
        q_pos = torch.where(q_in, self.start + depth[qi], q_slots)
        k_in = (k_slots >= self.start) & (k_slots < self.start + n)
        ki = (k_slots - self.start).clamp(0, n - 1)
        k_pos = torch.where(k_in, self.start + depth[ki], k_slots)
        # A tree row sees tree keys by ancestry; any row sees earlier slots causally.
        allowed = torch.where(q_in & k_in, anc[qi, ki], k_slots <= q_slots)
        if window is not None:
            allowed &= k_pos > q_pos - window
        return allowed
