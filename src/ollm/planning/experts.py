"""Placement per expert (issue 19): the dense part of every layer (attention, norms, router,
shared experts) is placed first, exactly as whole layers are (``plan_placement`` over the store's
dense view); the experts then share what the budgets leave:

* every expert on the device when they all fit (``resident``, no cache);
* else a GPU expert cache of ``cache_slots`` slots of one expert each (at least ``MIN_SLOTS``),
  filled on demand by a policy (LRU or LFU), and every expert's home in pinned RAM while
  ``cpu_memory`` allows (spread evenly over the layers: the first ``ram[i]`` experts of layer i),
  the rest read from the layer store on a miss.

On the CPU device the device *is* RAM: experts in RAM are computed in place, those on disk are
read into the cache slots (RAM). The plan is plain data; ``runtime/experts.py`` executes it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ollm.errors import BudgetError
from ollm.sizes import format_size
from ollm.tiers import Tier

MIB = 1 << 20
MIN_SLOTS = 2  # fewest cache slots: one expert computing while the next one arrives
POLICIES = ("lru", "lfu")
MOE_MODES = ("auto", "expert", "layer")
CPU_MODES = ("auto", "on", "off")
# Expert weights a decode step stacks for one batched matmul at most (``layers/moe.py``): the
# top-k experts of a token at once when that fits (Qwen3-30B-A3B: 8 x 9.4 MB; gpt-oss-20b: 4 x
# 50 MB), fewer per batch for larger experts, one at a time above it (Mixtral's 352 MB).
STACK_BYTES = 256 * MIB


@dataclass(frozen=True)
class ExpertPlan:
    """Where the experts of the sparse layers live and how many the device caches."""

    device: str
    layers: tuple[int, ...]  # sparse layers whose experts are placed one by one
    num_experts: int  # experts per sparse layer
    expert_bytes: int  # one expert's range in the store (what RAM holds and a copy moves)
    resident: bool  # every expert on the device (no cache, nothing streamed)
    ram: tuple[int, ...]  # per entry of ``layers``: its first ram[j] experts live in RAM
    cache_slots: int  # device slots of one expert each (0 when resident)
    group_rows: int  # rows routed at once: each expert is fetched once per group
    policy: str = "lru"  # cache replacement: "lru" or "lfu"
    cpu_compute: str = "auto"  # RAM experts missing from the cache run on the CPU: auto/on/off
    lookahead: bool = False  # predict the next sparse layer's experts and prefetch its misses
    decoded_bytes: int = 0  # coded (MXFP4) experts: one decoded on the device; 0: not coded
    decode_chunk: int = 1  # coded experts decoded at once (their temporaries are reserved)
    coded_slots: bool = False  # coded: slots hold the stored bytes only, computed from codes

    @property
    def slot_bytes(self) -> int:
        """Device bytes of one cache slot: the expert as computed, plus, when coded and decoded
        in the slot, the row its stored bytes land in (``coded_slots``: the stored bytes only)."""
        return self.expert_bytes + (0 if self.coded_slots else self.decoded_bytes)

    @property
    def device_expert_bytes(self) -> int:
        """Device bytes of one resident expert (decoded when coded)."""
        return self.decoded_bytes or self.expert_bytes

    @property
    def total(self) -> int:
        return self.num_experts * len(self.layers)

    def tier_counts(self) -> dict[Tier, int]:
        """How many experts live on the device, in RAM and on disk (cache slots not counted)."""
        if self.resident:
            return {Tier.GPU: self.total, Tier.CPU: 0, Tier.DISK: 0}
        ram = sum(self.ram)
        return {Tier.GPU: 0, Tier.CPU: ram, Tier.DISK: self.total - ram}

    def describe(self) -> list[tuple[str, str]]:
        """(label, value) rows for ``ollm info``."""
        t = self.tier_counts()
        on_cpu = self.device == "cpu"
        where = (
            f"{t[Tier.CPU] + t[Tier.GPU]} in RAM"
            if on_cpu
            else f"{t[Tier.GPU]} on GPU, {t[Tier.CPU]} in RAM"
        )
        rows = [
            (
                "experts",
                f"{self.total} ({self.num_experts} per layer x {len(self.layers)} layers, "
                f"{format_size(self.expert_bytes)} each"
                + (
                    f" as MXFP4, {format_size(self.decoded_bytes)} decoded"
                    + ("; slots computed from their codes" if self.coded_slots else "")
                    if self.decoded_bytes
                    else ""
                )
                + f"): {where}, {t[Tier.DISK]} on disk",
            )
        ]
        if not self.resident:
            share = f"{100 * self.cache_slots / self.total:.1f}% of the experts"
            policy = self.policy.upper()
            if on_cpu:
                cache = f"{self.cache_slots} slots in RAM for the disk experts ({share}), {policy}"
            else:
                cpu = {"auto": "by the cost model", "on": "always", "off": "never"}
                cache = (
                    f"{self.cache_slots} slots on GPU ({share}), {policy}; RAM experts missing "
                    f"from it run on the CPU: {cpu[self.cpu_compute]}"
                )
                if self.lookahead:
                    cache += "; lookahead: the next layer's predicted experts copied early"
            rows.append(("expert cache", cache))
        rows.append(("expert rows per group", str(self.group_rows)))
        return rows


def from_codes(device: str) -> bool:
    """Whether coded (MXFP4) experts in cache slots are computed from their codes on
    ``device`` (``layers/moe_mxfp4.py``'s Triton kernel: CUDA with Triton importable), so a
    slot holds the stored bytes only; else each slot is decoded after its copy lands."""
    import importlib.util

    if not device.startswith("cuda") or importlib.util.find_spec("triton") is None:
        return False
    import torch

    return torch.cuda.is_available()


def group_rows(spec, work, budget: int | None, dtype_bytes: int) -> tuple[int, int]:
    """(rows routed at once, bytes their temporaries take): the [rows x top_k, H] output slots
    (float32 where routing weights stay float32: Mixtral), the gathered rows and one expert's
    intermediates over all rows, within 1/16 of the budget (1 GiB without one), >= 256 rows.
    Each expert a group needs is fetched once per group: an 8k prompt of Qwen3-30B-A3B shapes
    is one group under 8 GiB, so prefill streams each expert once."""
    moe = spec.moe
    cap = max(32 * MIB, (budget or 16 << 30) // 16)
    wide = moe.routing == "softmax_topk" and not moe.weights_in_act_dtype
    slot = 4 if wide else dtype_bytes
    per_row = slot * moe.top_k * spec.hidden_size + dtype_bytes * (
        3 * moe.intermediate_size + 2 * spec.hidden_size
    )
    rows = max(256, min(work.batch * work.prefill_tokens, cap // per_row))
    return rows, rows * per_row


def plan_experts(
    spec,
    store,
    experts,
    device: str,
    gpu_memory: int | None,
    cpu_memory: int | None,
    offload: str,
    work,
    dtype_bytes: int,
    policy: str = "lru",
    slots: int | None = None,
    cpu_compute: str = "auto",
    plan_dense=None,
    lookahead: bool = False,
    coded_slots: bool | None = None,
):
    """The placement of the dense parts (a ``PlacementPlan`` over ``dense_store``) with an
    ``ExpertPlan`` in its ``experts`` field, under the same budgets; raises ``BudgetError``
    when the dense parts and ``MIN_SLOTS`` cache slots do not fit. ``experts`` is the store's
    ``StoreExperts``; ``plan_dense(store, gpu_memory, cpu_memory)`` plans the dense view
    (``plan_placement`` with the caller's other arguments). ``lookahead`` holds only on an
    accelerator with a cache and no dense part streaming (the prediction reads the next
    layer's resident router). ``coded_slots``: coded experts computed from the stored bytes
    in their slots (None: ``from_codes(device)``)."""
    from ollm.storage.expert_codec import decode_chunk
    from ollm.storage.experts import dense_store

    on_gpu = device != "cpu"
    budget = gpu_memory if on_gpu else cpu_memory
    codes = experts.coded and (from_codes(device) if coded_slots is None else coded_slots)
    rows, rows_bytes = _expert_rows(spec, experts, work, budget, dtype_bytes, codes)
    # coded (MXFP4) experts: RAM and copies hold ``stored`` bytes, a resident expert ``dec``,
    # a slot both (its copy lands beside the decoded expert) or, computed from its codes
    # (``codes``), the stored bytes only; else all are one
    stored, dec = experts.expert_bytes, experts.decoded_bytes
    slot = stored if codes else experts.slot_bytes
    layers = tuple(sorted(experts.regions))
    n_exp = max(experts.num_experts(i) for i in layers)
    total = n_exp * len(layers)
    least = MIN_SLOTS if slots is None else max(1, slots)
    reserve = rows_bytes + least * slot
    dense = dense_store(store, experts)
    if budget is not None and budget <= reserve:
        raise BudgetError(f"budget {format_size(budget)} below the experts' minimum")
    sub = None if budget is None else budget - reserve
    plan = plan_dense(dense, sub if on_gpu else gpu_memory, sub if not on_gpu else cpu_memory)
    spare = None if budget is None else budget - plan.peak_device_bytes - reserve
    fits = spare is None or spare + least * slot >= total * dec
    fits = fits and offload != "disk"  # "disk": every expert read from the store on a miss
    if fits and slots is None:
        cache, ram = 0, (0,) * len(layers)
    else:
        cache, ram = _cache_and_ram(plan, dense, experts, layers, n_exp, least, spare, on_gpu,
                                    slots, offload, cpu_memory, slot)  # fmt: skip
    eplan = ExpertPlan(
        device=device,
        layers=layers,
        num_experts=n_exp,
        expert_bytes=stored,
        resident=fits and slots is None,
        ram=ram,
        cache_slots=cache,
        group_rows=rows,
        policy=policy,
        cpu_compute=cpu_compute,
        lookahead=lookahead and on_gpu and not plan.streamed and not (fits and slots is None),
        decoded_bytes=dec if experts.coded else 0,
        decode_chunk=decode_chunk(dec, spec.moe.top_k) if experts.coded else 1,
        coded_slots=codes and not (fits and slots is None),  # resident: decoded at load
    )
    reserved = dict(plan.reserved)
    reserved["experts"] = total * dec if eplan.resident else cache * slot
    reserved["expert rows"] = rows_bytes
    return replace(plan, experts=eplan, reserved=reserved)


def _expert_rows(
    spec, experts, work, budget: int | None, dtype_bytes: int, codes: bool = False
) -> tuple[int, int]:
    """(rows routed at once, bytes reserved for them): ``group_rows``, at least what a decode
    step's stacked experts take, and with coded experts what decoding them takes; computed
    from their codes (``codes``), prefill decodes each expert beside the rows' temporaries
    (the decode kernel's own workspace, a few rows' outputs, is far below the stacked
    experts' reserve it replaces)."""
    rows, rows_bytes = group_rows(spec, work, budget, dtype_bytes)
    dec = experts.decoded_bytes
    if codes:
        from ollm.storage.expert_codec import decode_reserve

        rows_bytes += decode_reserve(dec, 1)
    # a decode step's stacked experts use the rows' temporaries (prefill and decode alternate)
    rows_bytes = max(rows_bytes, min(spec.moe.top_k * dec, max(dec, STACK_BYTES)))
    if experts.coded:  # and so does decoding (slots after their copies; resident ones at load)
        from ollm.storage.expert_codec import decode_reserve

        rows_bytes = max(rows_bytes, decode_reserve(dec, spec.moe.top_k))
    return rows, rows_bytes


def _cache_and_ram(plan, dense, experts, layers, n_exp, least, spare, on_gpu, slots, offload,
                   cpu_memory, slot: int) -> tuple[int, tuple[int, ...]]:  # fmt: skip
    """(cache slots, RAM experts per layer) when not every expert is resident: a GPU's spare
    memory becomes cache slots (``slot`` bytes each) beyond ``least``; on the CPU (RAM is the
    device) it holds experts in place, and the cache only takes the disk experts' misses."""
    total = n_exp * len(layers)
    grow = on_gpu and slots is None and spare is not None
    cache = min(total, least + (spare // slot if grow else 0))
    # pinned RAM holds stored (MXFP4) bytes; on the CPU device RAM experts are computed in
    # place, held decoded (decoded once at load, not on every use)
    per = experts.expert_bytes if on_gpu else experts.decoded_bytes
    ram = _ram_experts(plan, dense, layers, n_exp, per, on_gpu, offload, cpu_memory, spare)
    return cache, ram


def _ram_experts(plan, dense, layers, n_exp, slot, on_gpu, offload, cpu_memory, spare):
    """Experts per layer whose home is RAM (pinned on a GPU machine), spread evenly; the rest
    are read from the store on a miss. On the CPU device RAM is the device: what the budget
    left (``spare``, after the dense parts and the cache slots) holds experts in place."""
    n = len(layers)
    if on_gpu:
        if offload == "disk":
            return (0,) * n
        used = sum(dense.layer_nbytes(i) for i, p in enumerate(plan.layers) if p.tier == Tier.CPU)
        room = None if cpu_memory is None else max(0, cpu_memory - used)
        if offload == "cpu" and room is not None and room < n * n_exp * slot:
            raise BudgetError(
                f"offload='cpu' needs {format_size(n * n_exp * slot)} of pinned RAM for the "
                f"experts, cpu_memory leaves {format_size(room)}; use offload='auto' or 'disk'"
            )
    elif offload == "disk":
        return (0,) * n
    else:
        room = None if spare is None else max(0, spare)
    if room is None:
        return (n_exp,) * n
    count = min(n * n_exp, room // slot)
    return tuple(min(n_exp, count // n + (1 if j < count % n else 0)) for j in range(n))


def cpu_share(
    rates,
    cand: list[int],
    n_misses: int,
    counts: list[int],
    nbytes: int,
    params: int,
    measured: float | None = None,
) -> list[int]:
    """Of a call's ``n_misses`` missing experts, the RAM ones (``cand``) the CPU computes where
    they sit: moved, fewest rows first, while that shortens max(copy time of the rest, CPU
    time); the CPU's first expert also pays the hand-over of the rows to the host and back.
    ``rates``: the machine's ``MachineRates`` (the copies and the CPU share the memory bus);
    ``measured``: seconds per expert the CPU actually took in this run (its wall time, outputs
    handed back) replaces the estimate: the calibration's GEMV of one large matrix can be far
    faster than small experts' (H200 host, bf16 Qwen3-30B-A3B experts: ~4 GB/s per expert while
    the cost model chose the CPU; 31.5 vs 49 tok/s with it off)."""
    from ollm.planning.costmodel import CPU_HANDOFF_S

    copy = rates.copy_s(nbytes, shared=True)
    t_copy, t_cpu, cpu = n_misses * copy, CPU_HANDOFF_S, []
    for e in sorted(cand, key=lambda e: counts[e]):
        c = rates.cpu_layer_s(nbytes, params, counts[e], shared=True)
        if measured is not None:  # the measured time, or more where many rows make it compute
            c = max(measured, rates.cpu_layer_s(0, params, counts[e], shared=True))
        if t_cpu + c >= t_copy - copy:
            break
        t_cpu, t_copy = t_cpu + c, t_copy - copy
        cpu.append(e)
    return cpu
