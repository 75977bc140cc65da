"""The paged KV pools of a `BatchEngine`, each layer's in the tier its plan puts its KV in.

A KV group (every full-attention layer; each sliding window) has one `BlockManager`: a block id
names the same slot in every layer of the group. The tensors behind it are split by *home*, the
memory a layer's KV lives in (``LayerPlacement.kv_tier``):

* ``device``: the plan's KV device (GPU memory, or RAM on a CPU machine);
* ``ram``: pinned host RAM (``kv_tier == "cpu"``: offloaded KV, and hybrid layers the CPU decodes);
* ``disk``: preallocated, memory-mapped files in a per-engine `KVDirectory` (``kv_tier ==
  "disk"``, or every layer with ``kv_dir``), removed when the engine closes; free space (and
  available RAM for pinned pools) is checked before anything is allocated.

Each (group, home) is one `PagedKVStore` whose allocation tier holds the group's blocks for the
home's layers, plus a swap tier (preempted sequences) in the same kind of memory: pinned RAM for
the device home on a GPU, plain RAM for the RAM home, a file for the disk home. A block move
(copy-on-write, swap) runs on every home's store of its group. ``kv_device_tokens`` (the first
blocks of a split layer kept on the device) is not used here: such a layer's pool is wholly in
its offload tier.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from ollm.errors import OllmError
from ollm.kv.blocks import BlockManager, BlockMove
from ollm.kv.codec_blocks import CodecBlockManager, exact_slots_for
from ollm.kv.codec_paged import CodecPagedStore
from ollm.kv.codecs import KVCodec, codec_for_tier
from ollm.kv.disk import KVDirectory
from ollm.kv.paged import PagedKVStore
from ollm.kv.slabs import SlabPool
from ollm.planning.accounting import kv_group
from ollm.sizes import format_size
from ollm.tiers import Home, KvTier

DEVICE_TIER = "device"  # the allocation tier of every home
SWAP_TIER = "swap"  # where preempted sequences' blocks move to
HOMES = tuple(Home)


def layer_homes(plan, all_disk: bool = False) -> list[Home]:
    """Where each layer's KV pool lives: on disk, in (pinned) RAM or on the device."""
    return [Home.DISK if all_disk else Home.of(p.kv_tier) for p in plan.layers]


def batch_unsupported(runner) -> str | None:
    """Why the batch engine (paged KV, speculation) cannot run this model, or None: its
    linear-attention layers' recurrent state cannot be paged, forked or rolled back; a temporal
    KV schedule re-encodes blocks as they age, and paged pools keep one codec each."""
    if getattr(runner.spec, "linear_attn", None) is not None:
        return (
            f"{runner.spec.family}'s linear-attention layers keep a recurrent state that paged "
            "batching and speculative decoding cannot fork or roll back"
        )
    codec = getattr(runner, "kv_codec", "none")
    if codec != "none" and not all(isinstance(c, KVCodec) for c in _codecs(runner).values()):
        return f"the temporal KV schedule {codec!r} re-encodes blocks as they age (one codec per paged pool)"
    return None


def _codecs(runner, all_disk: bool = False) -> dict[Home, object]:
    """The codec of each home's full-attention pools (``codec_for_tier``: ``auto`` leaves the
    device's exact); homes without one are absent. Paged pools encode every block: the exact
    sinks of the single-request caches (``KVCodec.sinks``) are not kept here (sinks 0)."""
    spec = getattr(runner, "kv_codec", "none")
    if spec == "none":
        return {}
    kv_tier = {Home.DEVICE: KvTier.DEVICE, Home.RAM: KvTier.CPU, Home.DISK: KvTier.DISK}
    out = {}
    for h in set(layer_homes(runner.plan, all_disk)):
        codec = codec_for_tier(spec, kv_tier[h], runner.kv_recent)
        if codec is not None:
            out[h] = replace(codec, sinks=0) if isinstance(codec, KVCodec) else codec
    return out


# Most query tokens one step carries over encoded pools: every block a step writes holds an exact
# slot until the step ends, so this (not the context) sizes the exact slots with the batch.
ENCODED_STEP_TOKENS = 1024


def encoded_limits(runner, step: int, running: int, batch: int) -> tuple[int, int]:
    """(step tokens, running sequences) of a batch engine for ``batch`` sequences: unchanged
    for exact pools; at most ``ENCODED_STEP_TOKENS`` and ``batch`` when a pool is encoded
    (each running sequence keeps its recent window in exact slots)."""
    if not _codecs(runner):
        return step, running
    return min(step, ENCODED_STEP_TOKENS), batch


def codec_block_tokens(runner, block_tokens: int) -> int:
    """``block_tokens`` rounded up to whole codec groups when a pool is encoded (a block is
    encoded as a whole: keys per channel over each group of its tokens)."""
    groups = [c.block for c in _codecs(runner).values() if isinstance(c, KVCodec)]
    g = max(groups, default=1)
    return -(-block_tokens // g) * g


def batch_supported(runner) -> bool:
    """Whether the batch engine can page the plan's KV: the layers that keep KV on the device
    keep it on one device (those in pinned RAM or on disk, hybrid CPU layers included, get
    pools in their tier), and none keeps a recurrent state instead (``batch_unsupported``)."""
    if batch_unsupported(runner) is not None:
        return False
    homes = layer_homes(runner.plan)
    devices = {
        p.kv_device for p, h in zip(runner.plan.layers, homes, strict=True) if h == Home.DEVICE
    }
    return len(devices) <= 1


def kv_groups(runner) -> list[tuple[str, int]]:
    """(group, index in the group) per layer: one group of every full-attention layer and one
    per sliding window, since a block id names the same slot in every layer of a group."""
    counts: dict[str, int] = {}
    out = []
    for layer in runner.spec.layers:
        g = kv_group(layer.window)
        out.append((g, counts.get(g, 0)))
        counts[g] = counts.get(g, 0) + 1
    return out


@dataclass
class EnginePools:
    """Block managers per KV group and the stores of every (group, home)."""

    managers: dict[str, BlockManager]
    stores: dict[str, dict[str, PagedKVStore]]  # group -> home -> store
    layers: list[tuple[str, PagedKVStore, int]]  # per model layer: group, store, index in it
    disk: KVDirectory | None = None
    nbytes: dict[str, int] = field(default_factory=dict)  # per home, swap tiers included

    def copy_blocks(self, group: str, moves: Sequence[BlockMove]) -> None:
        """Run a group's block moves on each home's tensors."""
        if moves:
            for store in self.stores[group].values():
                store.copy_blocks(moves)

    def first_store(self, group: str) -> PagedKVStore:
        """Any store of ``group`` (they share shapes and block ids)."""
        return next(iter(self.stores[group].values()))

    @property
    def encoded(self) -> bool:
        """Whether a group's blocks are stored encoded (`kv.codec_blocks`)."""
        return any(isinstance(m, CodecBlockManager) for m in self.managers.values())

    def sweep(self, tables_of) -> None:
        """Between steps: let encoded groups reuse the exact slots no live window needs
        (``tables_of(group)``: every live sequence's table of that group)."""
        for g, m in self.managers.items():
            if isinstance(m, CodecBlockManager):
                m.sweep(tables_of(g))

    def close(self) -> None:
        """Drop the tensors and remove the disk directory."""
        self.stores.clear()
        self.layers.clear()
        if self.disk is not None:
            self.disk.close()
            self.disk = None


def build_pools(
    runner,
    layer_groups: Sequence[tuple[str, int]],
    blocks: Mapping[str, int],
    swap_blocks: int,
    block_tokens: int,
    windows: Mapping[str, int | None],
    kv_root: str | None = None,
    all_disk: bool = False,
    limits: tuple[int, int] = (1, 0),
    slab_tokens: int = 0,
) -> EnginePools:
    """Managers and stores for ``blocks[group]`` blocks per group (and ``swap_blocks`` of swap
    each), every layer's in its home; refuses up front when RAM or disk cannot hold them.
    A home whose codec (``runner.kv_codec``, ``codec_for_tier``) is set stores the
    full-attention group's blocks encoded, with exact slots for ``limits`` = (most running
    sequences, most tokens a step) (`kv.codec_blocks.exact_slots_for`). ``slab_tokens`` (a
    sequence's most tokens) places each sequence's blocks of a full-attention group in one run
    (`kv.slabs.SlabPool`), which the CPU attends in place."""
    spec, plan = runner.spec, runner.plan
    homes = layer_homes(plan, all_disk)
    on_device = [p.kv_device for p, h in zip(plan.layers, homes, strict=True) if h == Home.DEVICE]
    device = torch.device(on_device[0] if on_device else plan.device)
    elem = torch.finfo(runner.dtype).bits // 8
    block = 2 * block_tokens * spec.num_kv_heads * spec.head_dim * elem
    codecs = _codecs(runner, all_disk)
    managers = {
        g: _manager(g, w, blocks[g], swap_blocks, block_tokens, codecs, limits, slab_tokens)
        for g, w in windows.items()
    }
    need = {h: 0 for h in HOMES}
    counts: dict[tuple[str, str], int] = {}
    for (g, _), h in zip(layer_groups, homes, strict=True):
        counts[(g, h)] = counts.get((g, h), 0) + 1
        m = managers[g]
        if isinstance(m, CodecBlockManager) and h in codecs:
            per = codecs[h].bytes_per_token(spec.head_dim, elem) * spec.num_kv_heads
            need[h] += m.exact_slots * block + -(-int(per * block_tokens) // 16) * 16 * blocks[g]
            continue
        need[h] += blocks[g] * block
        # The device home's swap tier is RAM on a GPU; the others swap within their own kind.
        need[Home.RAM if h == Home.DEVICE and device.type == "cuda" else h] += swap_blocks * block
    _check_ram(need[Home.RAM])
    disk = None
    if need[Home.DISK]:
        from ollm.storage.convert import default_cache_dir

        disk = KVDirectory(kv_root or str(default_cache_dir() / "kv"))
        try:
            disk.check(need[Home.DISK])
        except BaseException:
            disk.close()
            raise
    try:
        stores = {}
        for g in windows:
            pools = {t: p.num_blocks for t, p in managers[g].pools.items()}
            stores[g] = {
                h: _store(runner, counts[(g, h)], pools, block_tokens, h, device, disk, managers[g], codecs.get(h))
                for h in HOMES
                if (g, h) in counts
            }  # fmt: skip
    except BaseException:
        if disk is not None:
            disk.close()
        raise
    seen: dict[tuple[str, str], int] = {}
    layers = []
    for (g, _), h in zip(layer_groups, homes, strict=True):
        i = seen.get((g, h), 0)
        seen[(g, h)] = i + 1
        layers.append((g, stores[g][h], i))
    return EnginePools(managers, stores, layers, disk, need)


def _manager(
    group, window, blocks, swap_blocks, block_tokens, codecs, limits, slab_tokens=0
) -> BlockManager:
    """A group's block manager: encoded (`CodecBlockManager`) for the full-attention group when
    a home has a codec (windowed groups stay exact, as in the single-request caches)."""
    if window is None and codecs:
        if swap_blocks:
            raise ValueError("encoded KV pools have no swap tier: preempted sequences recompute")
        recent = next(iter(codecs.values())).recent
        w = -(-recent // block_tokens)  # the recent window in whole blocks
        slots = exact_slots_for(limits[0], w, limits[1], block_tokens, blocks)
        return CodecBlockManager(
            block_tokens, {DEVICE_TIER: blocks}, recent_blocks=w, exact_slots=slots
        )
    pools: dict = {DEVICE_TIER: blocks}
    if slab_tokens and window is None:
        pools[DEVICE_TIER] = SlabPool(DEVICE_TIER, blocks, -(-slab_tokens // block_tokens))
    if swap_blocks:
        pools[SWAP_TIER] = swap_blocks
    swap = SWAP_TIER if swap_blocks else None
    return BlockManager(block_tokens, pools, (DEVICE_TIER,), swap, window)


def _store(
    runner, n_layers, pools, block_tokens, home, device, disk, manager=None, codec=None
) -> PagedKVStore:
    """One (group, home)'s tensors: its allocation and swap tiers, or with a ``codec`` (and the
    group's `CodecBlockManager`) its codes and exact slots."""
    from ollm.runtime.pinned import pinned_empty

    spec = runner.spec

    def pinned(nbytes: int) -> torch.Tensor:
        return pinned_empty(nbytes, device if device.type == "cuda" else None).zero_()

    storage: dict = {}
    devices = {DEVICE_TIER: device, SWAP_TIER: torch.device("cpu")}
    if home == Home.DEVICE and device.type == "cuda":
        storage[SWAP_TIER] = pinned  # swaps copy asynchronously at the link's full rate
    elif home == Home.RAM:
        devices[DEVICE_TIER] = torch.device("cpu")
        if device.type == "cuda":
            storage[DEVICE_TIER] = pinned  # prefill gathers to the GPU at the pinned rate
    elif home == Home.DISK:
        assert disk is not None
        storage = {DEVICE_TIER: disk.storage, SWAP_TIER: disk.storage}  # fallocate: zeroed
    if codec is not None and isinstance(manager, CodecBlockManager):
        return CodecPagedStore(
            n_layers, manager, codec, spec.num_kv_heads, spec.head_dim, runner.dtype,
            devices[DEVICE_TIER], storage.get(DEVICE_TIER),
        )  # fmt: skip
    return PagedKVStore(
        n_layers, pools, spec.num_kv_heads, block_tokens, spec.head_dim, runner.dtype, devices,
        storage=storage,
    )  # fmt: skip


def _check_ram(nbytes: int) -> None:
    """Refuse pinned-RAM pools the machine cannot hold (as the single-request path does)."""
    if not nbytes:
        return
    import psutil

    avail = psutil.virtual_memory().available
    if nbytes > 0.9 * avail:
        raise OllmError(
            f"the batch's KV pools need {format_size(nbytes)} of pinned RAM but "
            f"{format_size(avail)} is available; use kv_cache='disk' (--kv-cache disk), a "
            "shorter context or a smaller batch"
        )


def workload_blocks(
    windows: Mapping[str, int | None], block_tokens: int, batch: int, context: int, step: int
) -> dict[str, int]:
    """Blocks per KV group for ``batch`` sequences of ``context`` tokens (a window group only
    the blocks a window keeps live when steps carry at most ``step`` query tokens)."""
    return {
        g: batch * BlockManager(block_tokens, {}, window=w).max_live_blocks(context, step)
        for g, w in windows.items()
    }


def planned_blocks(
    plan, groups: set[str], block_tokens: int, batch: int, context: int
) -> dict[str, int] | None:
    """``plan.kv_pools`` (blocks per KV group the planner sized) when they are for these
    ``groups`` and ``block_tokens`` and hold ``batch`` sequences of ``context`` tokens (the
    full blocks of the plan's ``shared_prefix`` once); None otherwise (the caller sizes the
    pools from batch x context)."""
    pools = dict(plan.kv_pools)
    if plan.kv_page_tokens != block_tokens or set(pools) != groups:
        return None
    shared = min(plan.shared_prefix, context) // block_tokens
    if pools.get("full", 1 << 62) < shared + batch * (-(-context // block_tokens) - shared):
        return None
    return pools
