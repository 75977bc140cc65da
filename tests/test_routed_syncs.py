"""One host sync per routed decode layer with the KV in RAM (issue 18): the step's q, the chosen
page ids and the new keys and values come back to the host in one wait for the device
(``kv/routed.py`` ``_paged``), not three (the new slots' two blocking copies into RAM, then q and
the ids); every head's chosen pages are gathered by one op per K/V (``kv/page_read.py``).

Counted on the CPU stand-in accelerator by ``tests/sync_count.py`` (its docstring says what
counts), with what a routed layer adds: ``kv.routed._to_host`` (one stream synchronize on a
GPU) is one sync; the RAM KV and the gather buffers are host memory, and so is whatever an op
makes of host tensors only (the CPU attention's output: sent back through uva's ring, no
sync); a ``.to("cpu")`` of anything else (the new keys written to RAM) is a blocking copy, a
sync. A tiny random-weight Llama with 32 query and 8 KV heads (Llama-3.1-8B's grouping) decodes
with all of its KV offloaded to RAM and ``topk`` attention, tokens equal to the plain CPU run's.
"""

from __future__ import annotations

import collections
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ollm.engine.runner as runner_mod
import ollm.kv.routed as routed_mod
from conftest import make_hf_model, plan_on_device
from ollm import LLM, SamplingParams
from ollm.kv.offload import KVScratch, OffloadedKVCache
from ollm.kv.page_read import PageBuffers, StepSlots, gather_tier
from ollm.layers.attention import AttentionMask, attend
from ollm.layers.routing import TOPK, WINDOW, LayerRouting
from sync_count import counting

HEADS = dict(hidden_size=256, num_attention_heads=32, num_key_value_heads=8)
ATTENTION = dict(attention="topk:3,window:8,sinks:2", attention_page_tokens=4, max_context=256)
PROMPT = [(7 * i + 3) % 256 for i in range(120)]


class _Ops(TorchDispatchMode):
    """Aten ops dispatched (views included), by name; marks what host tensors make as host."""

    def __init__(self, counter=None) -> None:
        super().__init__()
        self.c, self.n, self.by = counter, 0, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        self.by[func.overloadpacket.__name__] += 1
        out = func(*args, **(kwargs or {}))
        if self.c is not None:
            ts = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            ts += [t for a in args if isinstance(a, (list, tuple)) for t in a
                   if isinstance(t, torch.Tensor)]  # fmt: skip
            if ts and all(map(self.c.is_host, ts)):
                for t in out if isinstance(out, (list, tuple)) else (out,):
                    self.c.mark_host(t)
        return out


def _host_memory(c, cache) -> None:
    """``cache``'s RAM KV and its router's gather buffers are host memory (by storage; the
    buffers are made at the first routed read)."""
    by_id = type(c).is_host.__get__(c)

    def is_host(t) -> bool:
        if by_id(t):
            return True
        if not isinstance(t, torch.Tensor):
            return False
        bufs = cache.router.buffers._sets if cache.router is not None else []
        ram = [x for x in (*(cache._bufs or ()), *bufs) if x is not None]
        return t.untyped_storage().data_ptr() in {x.untyped_storage().data_ptr() for x in ram}

    c.is_host = is_host


def routed_decode(tmp_path, monkeypatch, new: int = 8, **overrides) -> tuple[list, dict]:
    """Decode ``new`` tokens of ``PROMPT`` with the tiny Llama (``HEADS`` | ``overrides``), all KV
    in RAM, ``ATTENTION``, on the stand-in; tokens checked against the plain CPU run. Returns per
    decode layer (syncs by kind, aten ops of the layer, aten ops of its attention over the
    cache) and the run's facts."""
    from ollm.engine.replan import routing_summary_bytes
    from ollm.planning.placement import Workload, plan_placement
    from ollm.runtime.prefetch import Prefetcher
    from ollm.storage.store import LayerStore

    make_hf_model("llama", tmp_path / "hf", **(HEADS | overrides))
    params = SamplingParams(max_new_tokens=new, temperature=0)
    kws = dict(device="cpu", cache_dir=tmp_path / "c", progress=False, **ATTENTION)
    layers: list = []
    with LLM(tmp_path / "hf", **kws) as llm:
        reference = llm.generate(PROMPT, params).token_ids
        spec, engine, work = llm.spec, llm.engine, Workload(1, 256, 256)
        plan = plan_placement(spec, llm.store, "cuda:0", None, None, "cpu", work, 4,
                              chunk_tokens=32,
                              summary_bytes=routing_summary_bytes(spec, llm.config, work, 4))  # fmt: skip
        ram = tuple(replace(p, kv_tier="cpu", kv_device_tokens=0, kv_fetch=False)
                    for p in plan.layers)  # fmt: skip
        fake = plan_on_device(replace(plan, layers=ram), "cpu:1")
        llm.prefetcher.close()
        llm.plan = fake
        llm.prefetcher = Prefetcher(LayerStore(llm.store_path), fake, llm.stats)
        runner = runner_mod.Runner(spec, fake, llm.prefetcher, llm.dtype)
        runner.routing = engine.routing
        llm.runner = engine.runner = engine.generator.runner = runner
        with monkeypatch.context() as m, counting(m) as c:
            real_to_host, real_block = routed_mod._to_host, runner_mod.decoder_block

            def to_host(*ts):  # one stream synchronize on a GPU; host copies come back
                if any(t is not None for t in ts):
                    c.gpu.sync("_to_host")
                with torch._C._DisableTorchDispatch():  # the model's copies: not counted
                    out = [None if t is None else t.clone() for t in real_to_host(*ts)]
                for t in out:
                    c.mark_host(t)
                return out

            def block(spec, h, w, kv, *a, **k):
                if h.shape[1] != 1:
                    return real_block(spec, h, w, kv, *a, **k)
                _host_memory(c, kv)
                before = c.gpu.syncs.copy()
                real_attend = type(kv).attend
                inner = []

                def attend(self, *x, **y):
                    with _Ops() as ops:
                        out = real_attend(self, *x, **y)
                    inner.append(ops.n)
                    return out

                m.setattr(type(kv), "attend", attend)
                with _Ops() as ops, _Ops(c):
                    out = real_block(spec, h, w, kv, *a, **k)
                m.setattr(type(kv), "attend", real_attend)
                layers.append((c.gpu.syncs - before, ops.n, sum(inner), ops.by))
                return out

            m.setattr(routed_mod, "_to_host", to_host)
            m.setattr(runner_mod, "decoder_block", block)
            res = llm.generate(PROMPT, params)
        facts = dict(kv_read_fraction=res.metrics.kv_read_fraction, layers=spec.num_layers)
    assert res.token_ids == reference
    assert 0 < res.metrics.kv_read_fraction < 0.5  # routed reads ran
    assert len(layers) == (new - 1) * spec.num_layers
    return layers, facts


def test_one_host_sync_per_routed_decode_layer(tmp_path, monkeypatch):
    """Each routed decode layer waits for the device once (q, the chosen pages and the new keys
    and values read back together), and its attention's ops do not grow with the KV heads."""
    layers, _ = routed_decode(tmp_path, monkeypatch)
    for syncs, _, _, by in layers:
        assert dict(syncs) == {"_to_host": 1}, syncs
        assert by["index_select"] == 2  # every head's sinks, pages, window: one op per K/V
    few, _ = routed_decode(tmp_path / "b", monkeypatch, new=3, num_key_value_heads=2)
    assert max(a for *_, a, _ in layers) == max(a for *_, a, _ in few)


@pytest.mark.parametrize("one_op", [True, False])
def test_pages_of_every_head_gathered_by_one_op(one_op):
    """A tier that is a slice of a larger buffer (odd capacity, first slot past a device part,
    heads not consecutive): one index_select per K/V reads exactly the sinks, chosen pages and
    window of each head (its last page whole: the rows past the keys not in the read); values
    laid out unlike the keys: a copy per part and head, the same read."""
    g = torch.Generator().manual_seed(5)
    full = torch.randn(2, 5, 333, 6, generator=g, dtype=torch.float64)
    off, p = 64, 8  # the tier holds slots [64, 64 + 250)
    k = full[:, :, :250]
    v = (-full)[:, :, 1:251] if one_op else -full[:, :, 1:251]
    step = StepSlots(lo=72, hi=296, end=314, page=p)
    heads = (4, 1, 2)
    ids = torch.stack([torch.randperm(28, generator=g)[:5].sort().values + 9 for _ in range(6)])
    with _Ops() as ops:
        kb, vb, valid, _ = gather_tier(k, v, off, step, heads, ids.view(2, 3, 5), PageBuffers())
    assert ops.by["index_select"] == (2 if one_op else 2 * 2 * 3)
    assert valid is None and kb.shape == (2, 3, 8 + 5 * p + 18, 6)
    for bi in range(2):
        for i, hd in enumerate(heads):
            pages = ids.view(2, 3, 5)[bi, i].tolist()
            slots = [s - off for x in pages for s in range(x * p, x * p + p)]
            want = list(range(0, 8)) + slots + list(range(232, 250))
            assert torch.equal(kb[bi, i], k[bi, hd, want])
            assert torch.equal(vb[bi, i], v[bi, hd, want])


def _offloaded(r: LayerRouting | None, n: int, device_tokens: int = 0) -> torch.Tensor:
    """A decode step over ``n`` random slots in an OffloadedKVCache (routed by ``r``; None:
    not routed) after its prefill; the new slot checked in RAM."""
    g = torch.Generator().manual_seed(2)
    k, v = (torch.randn(1, 4, n + 1, 16, generator=g, dtype=torch.float64) for _ in range(2))
    q = torch.randn(1, 8, 1, 16, generator=g, dtype=torch.float64)
    f64 = torch.float64
    cache = OffloadedKVCache(1, 4, 16, n + 9, f64, KVScratch(1, 4, 16, n + 9, f64, "cpu"),
                             device_tokens=device_tokens)  # fmt: skip
    if r is not None:
        cache.router = routed_mod.Router(r, 1, 16, n + 9, f64, "cpu")
    cache.attend(torch.zeros(1, 8, n, 16, dtype=f64), k[:, :, :n], v[:, :, :n],
                 AttentionMask(0, n, n), 0.25, None)  # fmt: skip
    out = cache.attend(q, k[:, :, n:], v[:, :, n:], AttentionMask(n, 1, n + 1), 0.25, None)
    assert torch.equal(cache.k[:, :, : n + 1 - device_tokens], k[:, :, device_tokens:])
    assert torch.equal(cache.v[:, :, : n + 1 - device_tokens], v[:, :, device_tokens:])
    ref = attend(q, k, v, AttentionMask(n, 1, n + 1), 0.25)  # one part: other kernels
    if r is None:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    return out


@pytest.mark.parametrize("device_tokens", [0, 64])
def test_offloaded_topk_over_every_page_is_full_attention(device_tokens):
    """Top-k over every page with the KV in RAM (and on the device): the cache's exact path, bit
    for bit (the new slot written first); mixed with a window head the paged read itself
    (its top-k heads, to rounding; across two tiers as their float32 log-sum-exps allow)."""
    full = _offloaded(None, 300, device_tokens)
    r = LayerRouting((TOPK,) * 4, window=16, sinks=4, pages=100, page_tokens=8)
    assert torch.equal(_offloaded(r, 300, device_tokens), full)
    r = LayerRouting((TOPK, WINDOW, TOPK, TOPK), window=16, sinks=4, pages=100, page_tokens=8)
    out = _offloaded(r, 300, device_tokens)
    top = [0, 1, 4, 5, 6, 7]  # query heads of KV heads 0, 2, 3
    tol = 1e-6 if device_tokens else 1e-12  # two tiers: merged by float32 log-sum-exps
    torch.testing.assert_close(out[:, top], full[:, top], rtol=tol, atol=tol)
