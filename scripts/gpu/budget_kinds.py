"""The budget matrix's newer paths (``budget.py --kinds``): cells beside the single-request exact
ones, each planned here first (the minimum, found by bisecting the engine's own ``plan_for``) and
run by ``budget.run_cell`` in a fresh process.

* ``codec``: one request with compressed KV, ``kv_codec`` int4, int8 and auto (auto's measured
  choice per tier, re-planned by ``kv_auto.settle``); the plan's choice is reported.
* ``batch``: several prompts at once through ``llm.generate([...])``: the paged batch engine
  (``batch_supported``), with exact pools and with int4-encoded ones, and exact pools at batch
  32 (the plan sized for the engine's steps, ``planning/batch_step.py``).
* ``moe``: a small Qwen3-30B-A3B-shaped store (few layers and experts), experts placed one by
  one (``moe_offload="expert"``) with the GPU expert cache and lookahead on, at the least budget
  whose plan still places experts with lookahead on and homes experts in RAM (on a GPU).
* ``resident``: one long-ish prompt (8k; 32k too without ``--quick``) with decode-resident
  layers (``decode_resident=True``, opt-in: on an H200 its peak reserved was 8.018 GiB at 8 GiB),
  at the least budget whose plan holds some (on a GPU; the cost model's rates, hybrid
  ``auto`` with ``cpu_layers=0``) and one above it, quick or not: the peak covers the prefill,
  the switch to decode (held layers allocated) and decode.
* ``shared``: 8 prompts whose first 7/8 are the same, on a plan made with ``shared_prefix`` at
  that length (``Workload.shared``: the pools hold the prefix's blocks once, so they are smaller
  than batch x context), at the least budget whose plan keeps every layer's KV pool on the GPU
  (on the CPU: any). The first prompt is prefilled before the others are added (as
  ``bench/batching.py``'s ``prefix_run``): they hit the prefix cache, and decode attends the
  shared blocks once per batch (``kv/shared_prefix.py``). The row reports the prefix hits, the
  shared-prefix attention calls (the most sequences in one, the pools' devices) and the pools'
  blocks planned next to batch x context's.

Per kind one cell just below the planner's minimum (any plan): it must be refused with a
BudgetError naming the minimum ("at least"). Every cell runs with ``hybrid="off"`` so no rates
are needed for the minimum; a plan that still measures rates does so here, in the parent, whose
cache the cells then read (a cell's own peak never includes a calibration).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

MIB = 1 << 20
KINDS = ("exact", "codec", "batch", "moe", "resident", "shared")
NEW_TOKENS = 16
# preset overrides of the stores: (llama3-1b for codec and batch, qwen3-30b-a3b for moe)
MOE_QUICK = dict(num_hidden_layers=4, num_experts=32)
MOE_FULL = dict(num_hidden_layers=8, num_experts=128)


def make_kind_stores(root: Path, kinds: tuple[str, ...], quick: bool,
                     tiny: dict | None = None) -> dict[str, Path]:  # fmt: skip
    """bf16 stores the new kinds need: ``llama`` (codec, batch) and ``moe``. ``tiny``: shape
    overrides per store name (the CPU test's small shapes)."""
    import torch

    from ollm.models.registry import STORE_FAMILIES as FAM
    from ollm.storage.convert import convert
    from ollm.storage.store import is_store
    from ollm.storage.synthetic import SyntheticSource

    tiny = tiny or {}
    want = {"llama": ("llama3-1b", {"num_hidden_layers": 4 if quick else 16})}
    want["moe"] = ("qwen3-30b-a3b", dict(MOE_QUICK if quick else MOE_FULL))
    need = {"llama"} if {"codec", "batch", "resident", "shared"} & set(kinds) else set()
    need |= {"moe"} if "moe" in kinds else set()
    out = {}
    for name in sorted(need):
        preset, over = want[name]
        src = SyntheticSource(preset, families=FAM, **{**over, **tiny.get(name, {})})
        dst = root / f"kinds-{name}"
        if not is_store(dst):
            convert(src, dst, dtype=torch.bfloat16, progress=False, families=FAM)
        out[name] = dst
    return out


def options(cell: dict) -> dict:
    """The LLM options of a cell besides the budget, device and sizes."""
    kind = cell.get("kind", "exact")
    if kind == "exact":
        return {}
    opts: dict = dict(hybrid="off")
    if kind in ("codec", "batch"):
        opts["kv_codec"] = cell["codec"]
    if kind == "moe":
        opts.update(moe_offload="expert", offload="cpu", expert_cpu="off",
                    expert_lookahead=cell.get("lookahead_on", True))  # fmt: skip
    if kind == "resident":  # rates measured (hybrid auto), no CPU-computed layer (none held then)
        opts.update(decode_resident=True, offload="cpu", hybrid="auto", cpu_layers=0)
    if kind == "shared":  # the plan counts the prefix's KV blocks once
        opts["shared_prefix"] = cell["shared"]
    return opts


def _probe(store: Path, device: str, cache: str, batch: int, context: int, opts: dict):
    """An ``Engine`` with its store opened but nothing loaded: enough for ``replan.plan_for``."""
    from ollm.config import EngineConfig
    from ollm.engine.core import Engine

    eng = Engine.__new__(Engine)
    eng.config = EngineConfig(
        model=str(store),
        device=device,
        max_context=context,
        max_batch=batch,
        cache_dir=cache,
        progress=False,
        gpu_memory=1 << 40,
        **opts,
    )  # fmt: skip  (set per plan_at)
    eng.device = eng.config.resolve_device()
    eng._open_store()
    eng.hybrid_demoted, eng.routing = False, None
    return eng


def plan_at(eng, budget: int, batch: int, context: int):
    """``plan_for``'s (plan, rates) under ``budget`` (GPU memory, or RAM on the CPU), for the
    probe's ``shared_prefix`` as the engine plans (``Workload.shared``)."""
    from ollm.engine.replan import plan_for
    from ollm.planning.placement import Workload

    if eng.device.startswith("cuda"):
        eng.gpu_memory = budget
    else:
        eng.config = replace(eng.config, cpu_memory=budget)
    return plan_for(eng, Workload(batch, context, context, eng.config.shared_prefix))


def path_taken(cell: dict, plan) -> bool:
    """Whether ``plan`` takes the path the cell's kind checks (the MoE kind: experts placed one
    by one through the cache, not all resident; on a GPU also with lookahead on and experts
    homed in RAM, or without it (the direct decode and its graphs) every expert in RAM; the
    shared kind: planned for its prefix, every KV pool on the GPU)."""
    if cell.get("kind") == "shared":
        on_gpu = all(p.kv_tier == "device" for p in plan.layers)
        return plan.shared_prefix == cell["shared"] and (plan.device == "cpu" or on_gpu)
    if cell.get("kind") == "resident":  # on the CPU nothing is held (no copy engine)
        return plan.device == "cpu" or bool(plan.decode_resident)
    if cell.get("kind") != "moe":
        return True
    e = plan.experts
    if e is None:
        return False
    on_cpu = plan.device == "cpu"  # RAM is the device: the cache takes the disk experts' misses
    if on_cpu or e.resident:
        return not e.resident
    if not cell.get("lookahead_on", True):  # the direct decode: every expert homed in RAM
        return not e.lookahead and all(r == e.num_experts for r in e.ram)
    return e.lookahead and sum(e.ram) > 0


def minimums(eng, cell: dict) -> tuple[int, int]:
    """(the planner's minimum for any plan, the least budget whose plan takes the cell's path),
    at MiB granularity."""
    from ollm.errors import BudgetError

    batch, context = cell["batch"], cell["prompt"] + NEW_TOKENS

    def accepts(mib: int, on_path: bool) -> bool:
        try:
            plan, _ = plan_at(eng, mib * MIB, batch, context)
        except BudgetError:
            return False
        return path_taken(cell, plan) if on_path else True

    quiet = logging.getLogger("ollm")  # each refused probe of the bisection would warn
    level, _ = quiet.level, quiet.setLevel(logging.ERROR)
    try:
        low = _bisect(1, 1 << 18, lambda mib: accepts(mib, False))  # MiB: lo refused, hi accepted
        # The path may hold only in a window above the minimum (MoE: until every expert is
        # resident): gallop up from the minimum to a budget on it, then bisect below that. Held
        # decode-resident layers' window can be ~150 MiB wide (4 layers, 8k): 32 MiB steps.
        step, prev = 1, low - 1
        while not accepts(low + step - 1, True):
            prev = low + step - 1
            step = step + 32 if cell["kind"] == "resident" else step * 2
            if step > 1 << 18 or (cell["kind"] == "resident" and step > 16 * low):
                raise RuntimeError(f"no budget takes the {cell['kind']} path: {cell}")
        on_path = _bisect(prev, low + step - 1, lambda mib: accepts(mib, True))
    finally:
        quiet.setLevel(level)
    return low * MIB, on_path * MIB


def _bisect(lo: int, hi: int, ok) -> int:
    """The least ``x`` in (lo, hi] with ``ok(x)``, given ``ok(hi)`` and not ``ok(lo)``."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def upper(eng, cell: dict, on_path: int) -> int:
    """A budget well above the path's minimum still on it: 1.25 x, or for the MoE kind the
    minimum plus a quarter of the experts' bytes (more cache slots, experts still in RAM); for
    the resident kind up to 1.25 x while a plan still holds decode-resident layers."""
    work = (cell["batch"], cell["prompt"] + NEW_TOKENS)
    if cell["kind"] == "resident":  # held layers only in a window of budgets: stay inside it
        extra = on_path // 4
        while extra > MIB and not path_taken(cell, plan_at(eng, on_path + extra, *work)[0]):
            extra //= 2
        return on_path + max(MIB, extra // MIB * MIB)
    if cell["kind"] != "moe":
        return int(on_path * 1.25)
    e = plan_at(eng, on_path, *work)[0].experts
    return on_path + max(MIB, (e.total * e.expert_bytes // 4) // MIB * MIB)


def kind_cells(kinds: tuple[str, ...], stores: dict[str, Path], quick: bool, device: str,
               cache: str, prompt: int | None = None) -> list[dict]:  # fmt: skip
    """Rows of the new kinds: one below the minimum (refused), the path's minimum and (unless
    ``quick``) one above it. ``prompt``: one prompt length for every kind (the CPU test's)."""
    heads = []
    if "codec" in kinds:
        for codec in ("int4", "int8", "auto"):
            for p in (prompt,) if prompt else (2048,) if quick else (2048, 32768):
                heads.append(dict(kind="codec", codec=codec, prompt=p, batch=1, store="llama"))
    if "batch" in kinds:
        shapes = ((8, 2048),) if quick else ((8, 2048), (4, 8192))
        for codec in ("none", "int4"):
            for b, p in ((b, prompt or p) for b, p in shapes):
                heads.append(dict(kind="batch", codec=codec, prompt=p, batch=b, store="llama"))
        # exact pools at a larger batch: the plan sized for the batch engine's packed steps
        # (planning/batch_step.py), whose rows no longer scale with batch x chunk
        heads.append(dict(kind="batch", codec="none", prompt=prompt or 2048, batch=32,
                          store="llama"))  # fmt: skip
    if "moe" in kinds:
        for p in (prompt,) if prompt else (2048,) if quick else (2048, 8192):
            for ahead in (True, False):  # lookahead (host path) / direct decode with graphs
                heads.append(dict(kind="moe", prompt=p, batch=1, store="moe", lookahead_on=ahead))
    if "resident" in kinds:
        for p in (prompt,) if prompt else (8192,) if quick else (8192, 32768):
            heads.append(dict(kind="resident", prompt=p, batch=1, store="llama"))
    if "shared" in kinds:  # 8 prompts sharing their first 7/8 (whole 16-token blocks)
        for p in (prompt,) if prompt else (2048,) if quick else (2048, 8192):
            heads.append(dict(kind="shared", prompt=p, batch=8, shared=p * 7 // 8, store="llama"))
    rows = []
    for head in heads:
        head.update(store=str(stores[head["store"]]), dtype="bfloat16", device=device,
                    cache=cache)  # fmt: skip
        eng = _probe(Path(head["store"]), device, cache, head["batch"],
                     head["prompt"] + NEW_TOKENS, options(head))  # fmt: skip
        try:
            low, on_path = minimums(eng, head)
            above = not quick or head["kind"] == "resident"  # resident: always one above
            budgets = (low - MIB, on_path) + ((upper(eng, head, on_path),) if above else ())
            for budget in budgets:  # planned once more here: a calibration happens in this process
                planned = None
                if budget >= low:
                    plan = plan_at(eng, budget, head["batch"], head["prompt"] + NEW_TOKENS)[0]
                    planned = path_taken(head, plan)
                rows.append(dict(head, budget=budget, minimum=low, path_minimum=on_path,
                                 planned_path=planned))  # fmt: skip
        finally:
            eng.store.close()
    return rows


def prompts(cell: dict, vocab: int) -> list[list[int]]:
    """Random prompts of a new-kind cell: the batch kind's at lengths from ``prompt`` down (the
    paged engine runs each at its own length); the shared kind's ``prompt`` long, the first
    ``shared`` ids the same in all."""
    import torch

    g = torch.Generator().manual_seed(cell["prompt"] + cell["batch"])
    n, b = cell["prompt"], cell["batch"]
    if cell["kind"] == "shared":
        head = torch.randint(0, vocab, (cell["shared"],), generator=g).tolist()
        return [head + torch.randint(0, vocab, (n - len(head),), generator=g).tolist()
                for _ in range(b)]  # fmt: skip
    step = n // (4 * b)  # lengths from n down to about 3n/4
    return [torch.randint(0, vocab, (n - step * i,), generator=g).tolist() for i in range(b)]


# What the shared kind's decode did (filled by `generate` in the cell's process, read by `report`).
SHARED_SEEN: dict = {}


def generate(llm, cell: dict, params) -> list:
    """A new-kind cell's generation, one result per prompt: ``llm.generate`` of its prompts,
    or for the shared kind the batch engine on the plan's pools, the first prompt prefilled
    before the others are added (they then hit its cached prefix blocks), counting the calls
    of the shared-prefix attention (``SHARED_SEEN``)."""
    ps = prompts(cell, llm.spec.vocab_size)
    if cell["kind"] != "shared":
        res = llm.generate(ps if len(ps) > 1 else ps[0], params)
        return res if isinstance(res, list) else [res]
    from ollm.engine.batch import BatchEngine
    from ollm.kv import shared_prefix

    w, real = llm.workload, shared_prefix.attend_shared
    seen = SHARED_SEEN
    seen.update(calls=0, most_seqs=0, pools={})

    def counted(layer, d, *rest):  # one call per layer and decode batch with shared blocks
        seen["calls"] += 1
        seen["most_seqs"] = max(seen["most_seqs"], len(d.seqs))
        where = layer.pool.device.type
        seen["pools"][where] = seen["pools"].get(where, 0) + 1
        return real(layer, d, *rest)

    eng = BatchEngine.for_plan(llm.runner, None, (), w.batch, w.context, llm._engine.kv_dir,
                               rates=llm.rates)  # fmt: skip
    shared_prefix.attend_shared = counted  # read at each call (kv/packed.py imports it there)
    try:
        ids = [eng.add(ps[0], params)]
        while ids[0] in eng.live and not eng.live[ids[0]].out.token_ids:
            eng.step()  # the whole first prompt computed: its full blocks keyed for reuse
        ids += [eng.add(p, params) for p in ps[1:]]
        eng.run()
        m = eng.metrics()
        seen.update(prefix_hits=m.prefix_hits, prefix_saved_tokens=m.prefix_saved_tokens,
                    preemptions=m.preemptions, steps=m.steps)  # fmt: skip
        return [eng.finished[r] for r in ids]
    finally:
        shared_prefix.attend_shared = real
        eng.close()


def report(llm, cell: dict, results: list) -> dict:
    """What the cell's path did: the codecs held, whether the paged engine ran, the experts'
    placement and lookahead counts; ``path_ok`` when the path the cell checks was taken."""
    from ollm.engine.kvpools import batch_supported

    plan, kind = llm.plan, cell["kind"]
    out: dict = {"path_ok": path_taken(cell, plan)}
    if kind in ("codec", "batch"):
        choice = getattr(plan, "kv_codecs", None)
        out["kv_codec_held"] = str(llm.runner.kv_codec)[:200]
        out["kv_codecs_auto"] = None if choice is None else choice.summary()
    if kind == "batch":
        out["paged"] = batch_supported(llm.runner)
        out["path_ok"] = out["paged"] and all(len(r.token_ids) == NEW_TOKENS for r in results)
        # exact pools: the plan sized for the batch engine's steps (planning/batch_step.py)
        out["engine_sized"] = bool(plan.batch_parts)
        out["path_ok"] &= out["engine_sized"] == (cell["codec"] == "none")
    if kind == "resident":
        out.update(decode_resident_option=llm.config.decode_resident,
                   decode_rows=plan.decode_rows)  # fmt: skip
    if kind == "moe":
        e = plan.experts
        cache = getattr(llm.prefetcher, "experts", None)
        ahead = getattr(cache, "ahead", None)
        direct = getattr(cache, "direct", None)
        graphs = getattr(direct, "graphs", None)
        out.update(
            experts=None if e is None else {str(k): v for k, v in e.tier_counts().items()},
            cache_slots=None if e is None else e.cache_slots,
            lookahead_planned=None if e is None else e.lookahead,
            lookahead=None if ahead is None else dict(ahead.counts),
            expert_hit_rate=results[0].metrics.expert_hit_rate,
            direct=None if direct is None else direct.mode,
            graph_replays=None if graphs is None else graphs.replays,
        )
    if kind == "shared":
        out.update(_shared_report(plan, cell, results))
        out["path_ok"] &= out.pop("shared_ok")
    return out


def _shared_report(plan, cell: dict, results: list) -> dict:
    """The shared kind's row: the prefix hits, the shared-prefix attention calls (the most
    sequences in one, per pool device), the full-attention pools' blocks planned next to
    batch x context's; ``shared_ok`` when every later prompt hit the prefix, decode attended
    it once for at least the later prompts together, over pools on the plan's device only,
    and each prompt got its tokens."""
    import torch

    seen, b = SHARED_SEEN, cell["batch"]
    unshared = b * -(-(cell["prompt"] + NEW_TOKENS) // max(1, plan.kv_page_tokens))
    ok = seen.get("prefix_hits", 0) >= b - 1 and seen.get("most_seqs", 0) >= b - 1
    ok &= set(seen.get("pools", {})) == {torch.device(plan.device).type}
    ok &= all(len(r.token_ids) == NEW_TOKENS for r in results)
    return dict(shared_prefix=plan.shared_prefix, kv_pool_blocks=dict(plan.kv_pools),
                unshared_pool_blocks=unshared, shared_ok=ok,
                **seen)  # fmt: skip
