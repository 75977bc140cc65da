"""Batched decode attention over a KV pool in host memory, split between the CPU and the GPU.

A layer whose paged KV pool sits in pinned RAM is attended by the CPU where it sits (only the
queries and outputs cross the link). At large batches that CPU work is the whole step: batch 64
of 2k-token prompts on Llama-3.1-8B shapes reads ~18 GB of KV per step through the host's memory
bus, while the host->GPU link carries ~9 GB of weights and could carry more. `HostSplit` moves
part of the pool to the GPU beside the weights and attends it there, at the same time as the CPU
attends the rest:

* the GPU part is the batch's lowest-numbered held blocks, copied as runs of consecutive pool
  blocks (prompts' blocks are allocated in runs: a few DMA copies per layer, no CPU gather) on a
  side stream into a kept staging buffer, then gathered per sequence on the GPU; the CPU part is every other held block,
  gathered on the CPU as before;
* each sequence's attention is the exact softmax over both parts: each part returns its output
  and log-sum-exp and the two are merged (``merge_lse``), sinks added once after the merge;
* the share of blocks fetched is balanced online: after the CPU part of a layer, a copy that has
  already finished means the link had slack (fetch more next step), one still running means the
  link is the bottleneck (fetch less). The share is fixed within a step (one layout per step and
  KV group), so every layer of a step attends the same way.

GPU memory: the staging buffer and the per-chunk gather live in ``budget`` bytes, which the engine
takes from the plan's prefill scratch (reserved whenever KV is offloaded, idle in decode).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ollm.layers.attention import AttentionMask, blocked_attention_lse, merge_lse, with_sinks
from ollm.runtime.uva import to_device

if TYPE_CHECKING:
    from ollm.kv.packed import DecodeBatch

MERGE_GAP = 4  # blocks between two fetched runs copied rather than issuing another copy
SHARE_STEP = 0.04  # change of the fetched share per step, by the balance of the last step's votes
NEVER = 1 << 62  # position of a padding slot: later than any query, so masked


@dataclass(frozen=True)
class SplitLayout:
    """How one decode batch's sequences are attended in one step (same for every layer of the
    KV group): the pool block ``runs`` are copied to the GPU; ``gpu``/``cpu`` index ``d.seqs``
    for the sequences with blocks in each part, with their gather rows and key masks."""

    runs: tuple[tuple[int, int, int], ...]  # (first block, end block, staging slot) copied
    gpu: torch.Tensor  # [Bg] positions in d.seqs (on the GPU)
    gpu_rows: torch.Tensor  # [Bg * kv_heads * nbg] rows of staging seen as [slots * kvh, bt * D]
    gpu_mask: torch.Tensor  # [Bg, 1, 1, nbg * bt] additive (0 / -inf), query dtype
    nbg: int
    cpu: torch.Tensor  # [Bc] positions in d.seqs (on the CPU)
    cpu_rows: torch.Tensor  # [Bc * kv_heads * nbc] rows of the pool seen as [blocks * kvh, bt * D]
    cpu_mask: torch.Tensor  # [Bc, 1, 1, nbc * bt] additive
    nbc: int

    @property
    def fetched_blocks(self) -> int:
        """Pool blocks copied per layer (gaps merged into runs included)."""
        return sum(b - a for a, b, _ in self.runs)


class HostSplit:
    """The balance of one (KV group, home)'s host pools between the CPU and the GPU.

    ``budget``: GPU bytes for the staging buffer (two thirds) and the gather (one third);
    ``share``: the starting fraction of a batch's held blocks fetched; ``adapt``: balance it
    online; ``device``: where the fetched part is attended (``force`` also splits when the
    queries are on the CPU: tests)."""

    def __init__(
        self,
        budget: int,
        device: torch.device | str,
        share: float = 0.5,
        adapt: bool = True,
        force: bool = False,
    ) -> None:
        self.budget = int(budget)
        self.device = torch.device(device)
        self.share = min(1.0, max(0.0, share))
        self.adapt = adapt
        self.force = force
        self.votes = [0, 0]  # layers whose copy finished before the CPU part / did not
        self.fetched_bytes = 0  # copied to the GPU
        self.cpu_bytes = 0  # K/V gathered and attended by the CPU
        self._staging: torch.Tensor | None = None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def applies(self, pool: torch.Tensor, q_device: torch.device) -> bool:
        """Whether a decode batch over ``pool`` with queries on ``q_device`` is split."""
        host = pool.device.type == "cpu"
        return host and (q_device.type == "cuda" or self.force) and self.budget > 0

    def slots(self, pool: torch.Tensor) -> int:
        """Pool blocks the staging buffer holds (one more slot, kept zero, pads gathers)."""
        block = 2 * pool[0, :, 0].numel() * pool.element_size()
        return max(0, (2 * self.budget) // (3 * block) - 1)

    def staging(self, pool: torch.Tensor) -> torch.Tensor:
        """The kept staging buffer ``[2, kv_heads, slots + 1, bt, D]`` (last slot zero), head-major
        as the pools (`kv/paged.py`)."""
        n = self.slots(pool) + 1
        shape = (2, pool.shape[1], n, *pool.shape[3:])
        buf = self._staging
        if buf is None or buf.shape != shape or buf.dtype != pool.dtype:
            buf = self._staging = torch.zeros(shape, dtype=pool.dtype, device=self.device)
        return buf

    def next_share(self) -> float:
        """Apply the last step's votes: more fetched if copies mostly finished first."""
        done, late = self.votes
        if self.adapt and done + late:
            self.share += SHARE_STEP * (done - late) / (done + late)
            self.share = min(1.0, max(0.0, self.share))
        self.votes = [0, 0]
        return self.share

    def layout(self, d: DecodeBatch, pool: torch.Tensor, window: int | None) -> SplitLayout:
        """The step's split of ``d`` over ``pool`` (built once per step and group)."""
        bt, kvh = pool.shape[3], pool.shape[1]
        held = []
        for s in d.seqs:
            need = -(-(s.start + 1 - s.key0) // bt)
            held.append(s.block_ids[:need].cpu())
        used = torch.unique(torch.cat(held))  # sorted
        # Staging slot of each used block: runs of ids with gaps of at most MERGE_GAP blocks are
        # copied whole (fewer, longer copies; the gap's blocks are copied and never read).
        gap = used[1:] - used[:-1] - 1
        merged = gap <= MERGE_GAP
        slot = torch.zeros(len(used), dtype=torch.long)
        slot[1:] = torch.cumsum(1 + torch.where(merged, gap, 0), 0)
        g = min(round(self.next_share() * len(used)), int((slot < self.slots(pool)).sum()))
        runs, a = [], 0
        for i in range(1, g + 1):  # the first g used ids, in runs
            if i == g or not merged[i - 1]:
                runs.append((int(used[a]), int(used[i - 1]) + 1, int(slot[a])))
                a = i
        last = int(used[g - 1]) if g else -1
        parts: dict[bool, list] = {True: [], False: []}
        for i, (s, ids) in enumerate(zip(d.seqs, held, strict=True)):
            pos = s.key0 + bt * torch.arange(len(ids))  # first position of each held block
            on_gpu = ids <= last
            for side in (True, False):
                sel = on_gpu if side else ~on_gpu
                if bool(sel.any()):
                    ref = slot[torch.searchsorted(used, ids[sel])] if side else ids[sel]
                    parts[side].append((i, ref, pos[sel], s.start))
        zero = self.slots(pool)  # the staging slot kept zero
        g_seqs, g_rows, g_mask, nbg = _rows(parts[True], kvh, bt, window, zero, zero + 1)
        c_seqs, c_rows, c_mask, nbc = _rows(parts[False], kvh, bt, window, None, pool.shape[2])
        dev = self.device
        return SplitLayout(
            tuple(runs), torch.tensor(g_seqs, dtype=torch.long, device=dev), g_rows.to(dev),
            g_mask.to(dev), nbg, torch.tensor(c_seqs, dtype=torch.long), c_rows, c_mask, nbc,
        )  # fmt: skip

    def attend(
        self,
        d: DecodeBatch,
        pool: torch.Tensor,
        qb: torch.Tensor,
        mask: AttentionMask,
        scale: float,
        scratch,
    ) -> torch.Tensor:
        """``qb`` [B, H, 1, D] (on the GPU) over ``d``'s K/V in host ``pool`` -> [B, H, 1, D];
        ``scratch(slot, shape)`` gives kept host buffers for the CPU gather."""
        key = ("split", id(self), pool.shape[2], mask.window)
        lay = d.host_rows.get(key)
        if lay is None:
            lay = d.host_rows[key] = self.layout(d, pool, mask.window)
        event = self._copy(lay, pool) if lay.runs else None
        out = torch.zeros_like(qb)
        lse = torch.full(qb.shape[:3], float("-inf"), device=qb.device)
        if len(lay.cpu):
            o_c, l_c = self._attend_cpu(lay, pool, qb, scale, scratch)
            if event is not None and self.adapt:
                self.votes[0 if event.query() else 1] += 1
            idx = to_device(lay.cpu, qb.device)
            out[idx], lse[idx] = to_device(o_c, qb.device), to_device(l_c, qb.device)
        if len(lay.gpu):
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            o_g, l_g = self._attend_gpu(lay, pool, qb, scale)
            idx = lay.gpu
            o, lg = merge_lse(o_g, l_g, out[idx], lse[idx])
            out[idx], lse[idx] = o, lg
        if mask.sinks is not None:
            out = with_sinks(out, lse, mask.sinks)
        return out

    def _copy(self, lay: SplitLayout, pool: torch.Tensor):
        """Issue the copies of the block runs into the staging buffer; their event (CUDA)."""
        buf = self.staging(pool)
        n = lay.fetched_blocks
        stream = self._stream
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        if stream is not None:  # the staging buffer's last readers ran on the compute stream
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with ctx:
            for a, b, at in lay.runs:  # per head: each a contiguous run of pinned memory
                for i in (0, 1):
                    for h in range(pool.shape[1]):
                        buf[i, h, at : at + b - a].copy_(pool[i, h, a:b], non_blocking=True)
        self.fetched_bytes += 2 * n * pool[0, :, 0].numel() * pool.element_size()
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def _attend_gpu(self, lay: SplitLayout, pool, qb, scale):
        """The fetched part: gathered from staging per sequence, in chunks under a third of the
        budget."""
        buf = self.staging(pool)
        kvh, bt, hd = pool.shape[1], pool.shape[3], pool.shape[4]
        per_seq = 2 * kvh * lay.nbg * bt * hd * pool.element_size()
        chunk = max(1, (self.budget // 3) // max(1, per_seq))
        q = qb.index_select(0, lay.gpu)
        outs, lses = [], []
        span = kvh * lay.nbg
        for a in range(0, len(lay.gpu), chunk):
            b = min(len(lay.gpu), a + chunk)
            rows = lay.gpu_rows[a * span : b * span]
            kv = [
                buf[i].view(-1, bt * hd).index_select(0, rows).view(b - a, kvh, lay.nbg * bt, hd)
                for i in (0, 1)
            ]
            o, lse = _attend_lse(q[a:b], kv[0], kv[1], lay.gpu_mask[a:b], scale)
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)

    def _attend_cpu(self, lay: SplitLayout, pool, qb, scale, scratch):
        """The rest: gathered on the CPU into kept host buffers and attended there."""
        kvh, bt, hd = pool.shape[1], pool.shape[3], pool.shape[4]
        b = len(lay.cpu)
        q = qb.index_select(0, to_device(lay.cpu, qb.device)).to("cpu")
        kv = []
        for i in (0, 1):
            src = pool[i].view(-1, bt * hd)
            buf = scratch(i, (b * kvh * lay.nbc, bt * hd))
            torch.index_select(src, 0, lay.cpu_rows, out=buf)
            kv.append(buf.view(b, kvh, lay.nbc * bt, hd))
        self.cpu_bytes += 2 * b * kvh * lay.nbc * bt * hd * pool.element_size()
        return _attend_lse(q, kv[0], kv[1], lay.cpu_mask, scale)


def _rows(parts: list, kvh: int, bt: int, window: int | None, pad: int | None, blocks: int):
    """(sequences kept, gather rows ``[B * kvh * nb]`` (head h, block b of ``blocks`` -> row
    h * blocks + b of a head-major pool seen as ``[kvh * blocks, bt * D]``), the
    additive key mask ``[B, 1, 1, nb * bt]``, nb) of ``parts`` = (seq, block refs, their first
    positions, query position); padded with block ``pad`` (else the sequence's last ref),
    masked. A part whose keys are all outside the query's window is dropped."""
    nb = max((len(p[1]) for p in parts), default=0)
    refs = torch.empty(len(parts), nb, dtype=torch.long)
    first = torch.full((len(parts), nb), NEVER, dtype=torch.long)
    query = torch.tensor([p[3] for p in parts], dtype=torch.long)[:, None]
    for j, (_, ref, pos, _) in enumerate(parts):
        refs[j, : len(ref)] = ref
        refs[j, len(ref) :] = ref[-1] if pad is None else pad
        first[j, : len(ref)] = pos
    keys = (first[:, :, None] + torch.arange(bt)).view(len(parts), nb * bt)
    keep = keys <= query
    if window is not None:
        keep &= keys > query - window
    live = keep.any(1)
    refs, keep = refs[live], keep[live]
    seqs = [p[0] for p, ok in zip(parts, live.tolist(), strict=True) if ok]
    heads = torch.arange(kvh).view(1, kvh, 1)
    rows = (heads * blocks + refs.view(len(seqs), 1, nb)).reshape(-1)
    mask = torch.zeros(keep.shape).masked_fill_(~keep, float("-inf"))
    return seqs, rows, mask[:, None, None], nb


def _attend_lse(q, k, v, mask, scale):
    """One query per sequence ``q`` [B, H, 1, D] over ``k``/``v`` [B, kvh, S, D] with an additive
    key mask [B, 1, 1, S]: (out [B, H, 1, D], log-sum-exp [B, H, 1] float32). Heads of a KV head
    folded into the query axis (one flash call on the CPU, GQA without repeating K/V)."""
    b, h, _, d = q.shape
    kvh = k.shape[1]
    if q.device.type == "cpu":
        qg = q.reshape(b, kvh, h // kvh, d)
        try:
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qg, k, v, 0.0, False, attn_mask=mask.to(q.dtype), scale=scale
            )
            return o.reshape(b, h, 1, d), lse.reshape(b, h, 1)
        except RuntimeError:  # an older kernel without masks: the blocked path below
            pass
    keep = torch.isfinite(mask)  # [B, 1, 1, S]
    s = k.shape[2]
    m = AttentionMask(s - 1, 1, s)
    return blocked_attention_lse(q, k, v, m, scale, keep)


def split_budget(runner, batch: int, context: int) -> int:
    """GPU bytes a batch engine over ``runner``'s plan (made for ``batch x context``) may use to
    split host-pool decode attention: the plan's prefill scratch (one layer's K/V of the whole
    workload, reserved whenever KV is offloaded and idle in decode) and its KV fetch buffers
    (the paged engine does not fetch whole layers), less one sequence's layer K/V for a prefill
    chunk gathered in the same step. 0 when nothing is offloaded or the plan is not on a GPU."""
    from ollm.planning.accounting import kv_scratch_bytes
    from ollm.planning.placement import Workload
    from ollm.tiers import KvTier

    plan, spec = runner.plan, runner.spec
    if not str(plan.device).startswith("cuda"):
        return 0
    if all(p.kv_tier == KvTier.DEVICE for p in plan.layers):
        return 0
    elem = torch.finfo(runner.dtype).bits // 8
    scratch = kv_scratch_bytes(spec, Workload(batch=batch, context=context), elem)
    if any(p.kv_fetch for p in plan.layers):
        scratch *= 3  # the two fetch buffers (accounting.device_kv_bytes) are idle too
    return max(0, scratch - kv_scratch_bytes(spec, Workload(batch=1, context=context), elem))


def attach(stores, device: torch.device | str, budget: int) -> list[HostSplit]:
    """A `HostSplit` on every pinned-RAM store of ``stores`` (group -> home -> store), sharing
    ``budget`` (each keeps its own staging buffer); the list (empty when none applies)."""
    from ollm.tiers import Home

    ram = [homes[Home.RAM] for homes in stores.values() if Home.RAM in homes]
    if budget <= 0 or not ram or torch.device(device).type != "cuda":
        return []
    out = []
    for store in ram:
        store.split = HostSplit(budget // len(ram), device)
        out.append(store.split)
    return out
