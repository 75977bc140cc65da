"""Helpers of the expert cache (``runtime/experts.py``): coded (MXFP4) experts decoded on the
device (a layer's resident experts once at load; a slot after its copy lands, before its first
use), and warming a cache from a calibration run's routing counts."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from ollm.runtime.expert_stacks import stacked_views, uniform_rows
from ollm.runtime.experts_policy import Lfu
from ollm.runtime.pinned import unpin
from ollm.storage.expert_codec import decode_into

if TYPE_CHECKING:
    from ollm.runtime.experts import ExpertCache

READ_THREADS = 4  # disk misses read at once (and pinned staging buffers on a GPU)


def load_decoded(cache: ExpertCache, i: int, host: torch.Tensor, m: int) -> None:
    """Layer i's first ``m`` coded experts (``host``: their stored bytes, read back to back)
    decoded into one device buffer of decoded ranges, the plan's ``decode_chunk`` experts at a
    time; the host bytes dropped. They become views (and, all resident, [E, ...] stacks): the
    resident experts, or the RAM experts the CPU device computes in place."""
    st = cache.experts
    r, layouts = st.regions[i], st.decoded[i]
    rows = uniform_rows(host, r.offsets[:m], r.sizes[:m])
    if rows is None or len({tuple(ts) for ts in st.tensors[i]}) != 1:
        raise RuntimeError(f"coded experts of layer {i} are not at one stride and layout")
    size = max(n for _, n in layouts)
    dec = torch.empty(m, size, dtype=torch.uint8, device=cache.device)
    stacks = stacked_views(dec, layouts[0][0])
    chunk = cache.plan.decode_chunk
    for a in range(0, m, chunk):
        part = rows[a : a + chunk].to(cache.device)
        cache.stats.add(bytes_h2d=part.numel() if cache.device.type != "cpu" else 0)
        idx = list(range(a, a + part.shape[0]))
        decode_into(part, list(range(len(idx))), st.tensors[i][0], stacks, idx, st.dtype, chunk)
    if cache.cuda:
        torch.cuda.current_stream(cache.device).synchronize()
        unpin(host)
        cache._pinned.remove(host)
    if cache.plan.resident:
        cache._layer_stacks[i] = stacks
    for e in range(m):
        cache._views[(i, e)] = {n: v[e] for n, v in stacks.items()}


def decode_slots(cache: ExpertCache, batch: list[tuple[int, int]]) -> None:
    """Decode the slots of ``batch`` (expert, slot) whose copies landed undecoded (coded
    experts), per layout, on the compute stream (queued after the copies), before their first
    use: the slot's raw row (stored bytes) into its decoded row."""
    todo: dict[int, list[int]] = {}
    for _, s in batch:
        if s in cache.undecoded:
            todo.setdefault(cache.slot_layout[s], []).append(s)  # type: ignore[arg-type]
            cache.undecoded.discard(s)
    st = cache.experts
    chunk = cache.plan.decode_chunk
    for lay, ss in todo.items():
        i, e = cache._rep[lay]
        decode_into(cache.raw, ss, st.tensors[i][e], cache._stacks(lay), ss, st.dtype, chunk)


def warm_cache(cache: ExpertCache, freq: Mapping[tuple[int, int], int]) -> int:
    """``ExpertCache.warm``: LFU counts seeded with ``freq``, the empty slots filled with the
    most used experts neither cached nor computed in place; returns how many were loaded."""
    if cache.plan.resident:
        return 0
    if isinstance(cache.policy, Lfu):
        for key, n in freq.items():
            cache.policy.uses[key] = cache.policy.uses.get(key, 0) + n
        cache.policy.buckets = {}  # cached keys move to the buckets of their seeded counts
        for key in cache.where:
            cache.policy.add(key)
    loaded = 0
    for key in sorted(freq, key=lambda k: (-freq[k], k)):
        i, e = key
        if not cache._empty:
            break
        if key in cache.where or i not in cache._index:
            continue
        if cache.in_place and e < cache.plan.ram[cache._index[i]]:
            continue  # computed where it sits
        inflight: deque = deque()
        cache._issue(i, deque([e]), inflight)
        cache._done(list(inflight))
        loaded += len(inflight)
    cache.pinned.clear()
    return loaded


def read_miss(cache: ExpertCache, i: int, e: int, s: int) -> Future:
    """Start reading disk expert e of layer i (``ExpertCache._read``): into the next pinned
    staging buffer (GPU; after that buffer's last copy is done), or straight into slot s; the
    future gives the staging index (None for a slot)."""
    if cache._pool is None:
        cache._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="ollm-experts")
    if not cache.cuda:
        dst = (cache.raw if cache.coded else cache.slots)[s, : cache.experts.regions[i].sizes[e]]
        return cache._pool.submit(_read_into, cache, i, e, dst, None, None)
    k = cache._next_staging % len(cache._staging)
    cache._next_staging = k + 1
    return cache._pool.submit(_read_into, cache, i, e, cache._staging[k], cache._staging_done[k], k)


def _read_into(cache: ExpertCache, i: int, e: int, dst: torch.Tensor, after, k: int | None):
    if after is not None:
        after.synchronize()  # the staging buffer's previous copy has finished
    cache.stats.add(bytes_disk=cache.experts.read_range(i, e, e + 1, dst))
    return k


def cuda_state(cache: ExpertCache, n: int) -> None:
    """A CUDA cache's copy stream, its n slots' copy and last-use events, disk staging buffers."""
    plan = cache.plan
    cache.copy_stream = torch.cuda.Stream(cache.device)
    cache.ready = [None] * n
    # events are ordered on their streams: waiting on the newest implies the others
    cache.ready_seq, cache.free_seq, cache._seq = [0] * n, [0] * n, 0
    cache.free = [None] * n
    disk = any(r < plan.num_experts for r in plan.ram) and not plan.resident
    cache._staging = [cache._pin(plan.expert_bytes) for _ in range(READ_THREADS * disk)]
    cache._staging_done = [None] * len(cache._staging)
    cache._next_staging = 0
