"""Decode-time splits the cost model chooses once placement has fixed the tiers: which pinned-RAM
layers the CPU computes (hybrid decode) and which RAM KV layers decode fetches back to the GPU.
Each choice minimises the decode step simulated layer by layer (``costmodel.pipeline_step``)."""

from __future__ import annotations

from ollm.tiers import KvTier, Tier


def choose_kv_fetch(store, layers, rates, work, per_token, predicted, ring, kv_read=None,
                    fetch=True, engine=False, mlp=None):  # fmt: skip
    """Which pinned-RAM KV layers decode attends on the GPU from a prefetched copy (the rest
    attend on the CPU where the KV sits): a fetched layer adds its KV to the copy engine's queue
    (right behind its weights), a CPU one stops the compute chain while the CPU reads it. The
    count and positions (spread by ``interleave``) minimise the step simulated layer by layer
    with the ring's depth (``costmodel.pipeline_step``): a CPU stall is covered only by the copies
    of the next layer or two. ``per_token``: KV bytes per token position of one layer.
    ``kv_read[i]`` < 1: attention routing reads that fraction of layer i's KV per step where it
    sits (``Router``, never fetched): its CPU stall is that fraction of a full read. ``fetch``
    False (no fetch buffers): no layer is fetched, the step is only simulated. ``engine``: the
    batch engine's chain (``costmodel.decode_chain``). ``mlp``: (seconds on the chain, bytes not
    copied) of a layer whose MLP the CPU computes (``mlp_cpu``, ``planning/mlp_cpu.py``)."""
    from dataclasses import replace

    from ollm.planning.costmodel import CPU_HANDOFF_S, decode_chain, interleave, pipeline_step

    gpu_layer, start = decode_chain(engine)

    share = kv_read or [1.0] * len(layers)
    cands = [
        i
        for i, p in enumerate(layers)
        if fetch
        and p.kv_tier == KvTier.CPU
        and p.decode_device != "cpu"
        and share[i] >= 1.0
        and not p.decode_resident  # its KV copy would queue behind a weight copy never issued
    ]
    shared = rates.pcie_busy
    if rates.cpu_attn:  # measured: one query over a KV in RAM; slower beside the copies
        # Several sequences: their attention in one call, at the batched rate where measured
        # (``MachineRates.cpu_attn_rate``: the batch engine reads a head-major pool in place,
        # ``kv/strided.py``; a padded batch's contiguous cache alike). A windowed group's pool,
        # which the engine gathers first, is priced the same (a simplification).
        cpu_rate = rates.cpu_attn_rate(work.batch) * rates.cpu_mem_busy / rates.cpu_mem
    else:
        # cpu_mem is weight bytes per second of a whole decoder layer measured with a KV cache
        # of the context's power-of-two bucket (engine.calibrate.cached_rates): the bytes it really
        # moves per second include that KV.
        bucket = 1 << max(0, work.context - 1).bit_length()
        lb = store.max_layer_nbytes
        cpu_rate = rates.cpu_mem_busy * (lb + per_token // work.batch * bucket) / lb
    # A routed read (gathered pages, attended split between threads) at its own measured rate.
    routed_rate = rates.cpu_routed * rates.cpu_mem_busy / rates.cpu_mem or cpu_rate
    n_cpu = sum(p.decode_device == "cpu" for p in layers)
    # A CPU layer's weights and matmuls, and its KV attention beyond what the weight rate covers
    # (a batch's KV, compressed KV: ``choose_hybrid``'s ``cpu_kv_s``).
    cpu_layer = predicted.get("hybrid cpu s", 0.0) / max(1, n_cpu)
    cpu_layer += predicted.get("hybrid cpu kv s", 0.0)
    copy, base, cpu_kv, host_kv = [], [], [], []
    for i, p in enumerate(layers):
        on_cpu = p.decode_device == "cpu"
        kept = mlp[1] if mlp and p.mlp_cpu else 0  # its MLP stays in RAM
        copy.append(
            0.0 if p.tier == Tier.GPU or on_cpu else (store.layer_nbytes(i) - kept) / shared
        )
        base.append(cpu_layer if on_cpu else gpu_layer + (mlp[0] if kept else 0.0))
        host_kv.append(
            0 if p.kv_tier == KvTier.DEVICE else per_token * (work.context - p.kv_device_tokens)
        )
        # A layer whose KV the CPU reads stops the chain: query over, attention, output back.
        rate, read = (
            (cpu_rate, host_kv[i]) if share[i] >= 1.0 else (routed_rate, host_kv[i] * share[i])
        )
        cpu_kv.append(read / rate + CPU_HANDOFF_S if host_kv[i] and not on_cpu else 0.0)

    def step(x: int) -> float:
        chosen = interleave(cands, x)
        chain = [base[i] + (0.0 if i in chosen else cpu_kv[i]) for i in range(len(layers))]
        fetch = [host_kv[i] / shared if i in chosen else 0.0 for i in range(len(layers))]
        return pipeline_step(chain, copy, max(1, ring), fetch, start_s=start)

    x = min(range(len(cands) + 1), key=lambda k: (round(step(k), 6), k))
    chosen = interleave(cands, x)
    layers = [replace(p, kv_fetch=True) if i in chosen else p for i, p in enumerate(layers)]
    return layers, len(chosen), step(x)


def choose_hybrid(spec, layers, n_res, layer_bytes, head_bytes, rates, work, hybrid, forced, ring,
                  cpu_kv_s=0.0, kv_copy=(), engine=False):  # fmt: skip
    """Choose which pinned-RAM layers the CPU computes in decode (cost model or ``forced``):
    the count (spread by ``interleave``) whose decode step, simulated layer by layer with the
    ring's depth (``costmodel.pipeline_step``), is shortest. Compressed KV: ``cpu_kv_s`` more
    per CPU layer (decoding codes costs more than the exact KV the rates were measured over),
    and ``kv_copy[i]`` encoded bytes copied each step for a GPU-computed layer whose KV is in
    RAM (``kv/compressed.py`` with ``fetch``: into the workspace's one staging store).
    ``engine``: the batch engine's chain (``costmodel.decode_chain``)."""
    from dataclasses import replace

    from ollm.planning.costmodel import (
        CPU_HANDOFF_S,
        LAYER_OVERHEAD_S,
        decode_chain,
        interleave,
        pipeline_step,
        predict_step,
    )

    params = spec.layer_param_count()
    cands = [i for i, p in enumerate(layers) if p.tier == Tier.CPU]
    n_stream = sum(1 for p in layers if p.tier != Tier.GPU)
    stream_only = predict_step(
        rates, n_res, n_stream, 0, layer_bytes, params, head_bytes, work.batch
    )
    predicted = {"stream-only tok/s": stream_only.tokens_per_second}
    if hybrid == "off" or not cands:
        return layers, 0, predicted
    least, start = decode_chain(engine)
    gpu_layer = max(least, rates.gpu_layer_s(layer_bytes, params, work.batch))
    cpu_layer = rates.cpu_layer_s(layer_bytes, params, work.batch, True)
    cpu_layer += LAYER_OVERHEAD_S + CPU_HANDOFF_S + cpu_kv_s
    kv_copy = kv_copy or (0,) * len(layers)

    def simulate(k: int) -> float:
        chosen = interleave(cands, k)
        chain = [cpu_layer if i in chosen else gpu_layer for i in range(len(layers))]
        copy = [
            0.0 if i in chosen or p.tier == Tier.GPU else rates.copy_s(layer_bytes, k > 0)
            for i, p in enumerate(layers)
        ]
        fetch = [
            rates.copy_s(kv_copy[i], k > 0) if p.kv_tier != KvTier.DEVICE and i not in chosen
            else 0.0
            for i, p in enumerate(layers)
        ]  # fmt: skip
        step = pipeline_step(chain, copy, max(1, ring), fetch, 1, start)
        return step + head_bytes / rates.gpu_mem

    if forced is not None:
        k = min(forced, len(cands))
    else:
        k = min(range(len(cands) + 1), key=lambda x: (round(simulate(x), 6), x))
    if k == 0:
        return layers, 0, predicted
    pred = predict_step(rates, n_res, n_stream - k, k, layer_bytes, params, head_bytes, work.batch)
    chosen = interleave(cands, k)
    # The KV of a CPU-decoded layer lives in pinned RAM as an OffloadedKVCache: prefill (on the
    # GPU) writes it through the shared scratch with asynchronous per-head copies, decode attends
    # on the CPU where it sits. A layer whose KV the planner already sent to disk keeps that tier.
    layers = [
        replace(
            p, decode_device="cpu", kv_tier=KvTier.CPU if p.kv_tier == KvTier.DEVICE else p.kv_tier
        )
        if i in chosen
        else p
        for i, p in enumerate(layers)
    ]
    # Largest forward the CPU still computes faster than the copy engine streams the layer.
    switch = int(rates.cpu_flops * layer_bytes / (rates.pcie * 2 * params))
    predicted.update(
        {
            "hybrid tok/s": 1.0 / simulate(k),
            "hybrid copy s": pred.copy_s,
            "hybrid cpu s": pred.cpu_s,
            "hybrid cpu kv s": cpu_kv_s,  # per CPU layer, beyond its weights
        }
    )
    return layers, max(1, switch), predicted


def decode_splits(spec, store, layers, n_res, sz, rates, work, hybrid, cpu_layers, ring, fetch,
                  kv_read=None, simulate=False):  # fmt: skip
    """The cost model's decode choices: RAM layers the CPU computes (hybrid), then, when
    ``fetch`` (KV offloaded and fetch buffers planned), RAM KV layers fetched back to the GPU.
    Returns (layers, cpu_max_tokens, predicted), or None when no KV is worth fetching (unless
    ``simulate``: the step is wanted anyway); with no ``rates`` (no cost model, or not on a
    GPU) the layers as they are. With routing (``kv_read``) the step is always simulated.

    A plan for the batch engine (``sz.engine``) also simulates its layout without CPU layers
    and keeps that when its step is shorter: ``choose_hybrid`` weighs CPU layers against
    streams alone, while the step also stalls on the CPU attention of every layer whose KV is
    in RAM (and the engine's ``StepMode`` streams every layer when that is faster)."""
    if rates is None:
        return layers, 0, {}
    args = (spec, store, layers, n_res, sz, rates, work, hybrid)
    out = _splits(*args, cpu_layers, ring, fetch, kv_read, simulate)
    if out is None or not sz.engine or cpu_layers is not None:
        return out
    if not any(p.decode_device == "cpu" for p in out[0]) or "decode s (KV split)" not in out[2]:
        return out
    alt = _splits(*args, 0, ring, fetch, kv_read, simulate)
    if alt is not None and alt[2]["decode s (KV split)"] < out[2]["decode s (KV split)"] - 1e-9:
        return alt
    return out


def _splits(spec, store, layers, n_res, sz, rates, work, hybrid, cpu_layers, ring, fetch,
            kv_read, simulate):  # fmt: skip
    """``decode_splits`` with ``cpu_layers`` CPU layers (None: the cost model's count)."""
    cpu_kv = sz.cpu_kv_extra_s(rates, work.context)
    if sz.engine:  # a batch step's CPU layer attends every sequence's KV (costmodel.cpu_kv_s):
        # in place over the pool's strided views (slab pools: full attention), else gathered
        in_place = not any(layer.window for layer in spec.layers)
        cpu_kv += rates.cpu_kv_s(sz.per_token * work.context, work.batch, in_place)
    layers, cpu_max_tokens, predicted = choose_hybrid(
        spec, layers, n_res, sz.layer, sz.head_resident, rates, work, hybrid, cpu_layers, ring,
        cpu_kv, sz.kv_copy, bool(sz.engine),
    )  # fmt: skip
    if fetch or kv_read or simulate:
        layers, fetched, step = choose_kv_fetch(
            store, layers, rates, work, sz.per_token, predicted, ring, kv_read, bool(fetch),
            bool(sz.engine),
        )  # fmt: skip
        if fetch and not fetched and not simulate:
            return None
        predicted["decode s (KV split)"] = step
    return layers, cpu_max_tokens, predicted
