"""A packed step's block ids without per-block Python at every step (issue 13: the host time
between two decode steps).

A decoding sequence's block table changes once every ``block_tokens`` steps (a new block), so
`HeldMemo` keeps, per KV group and sequence, what `PackedStep._layout` derives from the table
(its first held block, the held block ids, those as int64 bytes, the first id of a run): when
the step's table is the last step's (one tuple comparison: the same `BlockRef` objects compare
by identity) the derived values are reused, else derived again. It is a cache of a pure
function of (table, tier), so any change to a table (a new block, a copy-on-write of the last
one, a window's release, a swap, a trim, a fresh sequence under a reused id) derives again.

`FlatInts` assembles the step's one index tensor from such int64 bytes (a join of byte strings,
not a conversion of every block id from a Python int).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ollm.kv.blocks import BlockRef


@dataclass(frozen=True)
class Held:
    """What a step's layout needs of one sequence's block table in one KV group."""

    blocks: tuple[BlockRef | None, ...]  # the table these are derived from
    first: int  # index of its first held block (a window releases leading ones)
    ids: tuple[int, ...]  # held block ids, from ``first`` on
    raw: bytes  # ``ids`` as native int64
    run0: int | None  # ``ids[0]`` when the ids are consecutive, else None


def held_blocks(
    blocks: tuple[BlockRef | None, ...], tier: str, seq_id: str = "", group: str = ""
) -> Held:
    """`Held` of ``blocks``, every held block checked to be in ``tier`` (the error names
    ``seq_id`` and ``group``)."""
    first = 0 if blocks[0] is not None else next(i for i, r in enumerate(blocks) if r is not None)
    held = blocks[first:]
    if not all(ref is not None and ref.tier == tier for ref in held):
        ref = next(r for r in held if r is None or r.tier != tier)
        raise RuntimeError(
            f"sequence {seq_id!r}: a block of KV group {group!r} is not in the allocation tier "
            f"{tier!r} ({ref}); swap-ins run before the step"
        )
    ids = tuple(ref.block for ref in held)  # type: ignore[union-attr]
    run0 = ids[0] if ids == tuple(range(ids[0], ids[0] + len(ids))) else None
    return Held(blocks, first, ids, array("q", ids).tobytes(), run0)


class HeldMemo:
    """`held_blocks` per (group, sequence, tier), reused while the table is unchanged; entries of
    sequences absent from a step are dropped once they outnumber the present ones."""

    def __init__(self) -> None:
        self._memo: dict[tuple[str, str, str], Held] = {}

    def held(self, group: str, seq_id: str, blocks: tuple, tier: str) -> Held:
        """`held_blocks` of ``blocks``, from the memo when the table is the one it holds."""
        key = (group, seq_id, tier)
        h = self._memo.get(key)
        if h is None or h.blocks != blocks:
            h = self._memo[key] = held_blocks(blocks, tier, seq_id, group)
        return h

    def keep(self, seq_ids: Iterable[str]) -> None:
        """Forget the sequences outside ``seq_ids`` when they are the memo's majority."""
        live = set(seq_ids)
        if len(self._memo) > 2 * len(live) * max(1, len({k[0] for k in self._memo})) + 16:
            self._memo = {k: v for k, v in self._memo.items() if k[1] in live}

    def __len__(self) -> int:
        return len(self._memo)


class FlatInts:
    """Int64 values appended in parts (Python ints, or int64 bytes), one tensor at the end."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def extend(self, values: Iterable[int]) -> None:
        """Append Python ints."""
        self.extend_bytes(array("q", values).tobytes())

    def extend_bytes(self, raw: bytes) -> None:
        """Append native int64 bytes (`Held.raw` or a slice of it)."""
        self._parts.append(raw)
        self._n += len(raw) // 8

    def tensor(self, device: torch.device) -> torch.Tensor:
        """Every value as one int64 tensor on ``device``."""
        buf = bytearray(b"".join(self._parts))
        if not buf:
            return torch.empty(0, dtype=torch.long, device=device)
        return torch.frombuffer(buf, dtype=torch.long).to(device)
