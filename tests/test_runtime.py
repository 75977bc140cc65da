"""Runtime defects of streams, events, pinned memory and the reader thread, played on the CPU:

* a KV fetch buffer is not overwritten before the layer that last attended over it is done, with
  copies following a weight ring of three slots (real data, and a fake stream/event layer that
  checks every copy waits on its buffer's last release event);
* events are recorded on, and streams looked up for, an explicit device;
* page-locked buffers are unregistered when dropped (an unclosed Prefetcher, a failed one);
* a reader that outlives its join never runs beside a new one.
"""

from __future__ import annotations

import gc
import threading
import time
import types
import weakref
from contextlib import nullcontext

import pytest
import torch

from ollm.kv.cache import LayerKVCache
from ollm.kv.offload import KVFetcher, KVScratch, OffloadedKVCache
from ollm.layers.attention import AttentionMask
from ollm.planning.placement import LayerPlacement, PlacementPlan
from ollm.runtime import pinned, prefetch
from ollm.runtime.prefetch import Prefetcher

B, KVH, QH, D, CAP = 1, 2, 4, 8, 48


class _Ring:
    """Plays ``Prefetcher._pump`` for streamed layers that all sit in RAM: weights (and so the
    KV copies behind them, through ``on_issue``) are issued cyclically up to ``slots`` layers
    ahead of the last layer released."""

    def __init__(self, fetcher: KVFetcher, layers: list[int], slots: int) -> None:
        self.fetcher, self.layers, self.slots = fetcher, layers, slots
        self.issued = self.released = 0

    def pump(self) -> None:
        while self.issued - self.released < self.slots:
            self.fetcher.issue_layer(self.layers[self.issued % len(self.layers)])
            self.issued += 1

    def done(self) -> None:
        self.released += 1
        self.pump()


def _play(layers: int, fetched: list[int], ring_slots: int, steps: int, stream=None):
    """Prefill then decode ``steps`` tokens through ``layers`` streamed layers, of which those in
    ``fetched`` have their KV fetched (two fetch buffers, copies following a weight ring of
    ``ring_slots``); each fetched layer's output is compared with a plain cache's. Returns the
    number of takes that found their copy issued ahead."""
    torch.manual_seed(0)
    scratch = KVScratch(B, KVH, D, CAP, torch.float32, "cpu")
    caches = [OffloadedKVCache(B, KVH, D, CAP, torch.float32, scratch, 1) for _ in fetched]
    refs = [LayerKVCache(B, KVH, D, CAP, torch.float32, "cpu") for _ in fetched]
    fetcher = KVFetcher(caches)
    fetcher.attach(list(fetched), stream)
    ring = _Ring(fetcher, list(range(layers)), ring_slots)
    ahead, length = 0, 0
    for t in [20] + [1] * steps:
        if t <= fetcher.decode_tokens:
            fetcher.start_step()  # as Runner._forward does for a decode step
        else:
            fetcher.active = False
        mask = AttentionMask(length, t, length + t, None)
        for layer in range(layers):
            ring.pump()
            if layer in fetched:
                cache, ref = caches[fetched.index(layer)], refs[fetched.index(layer)]
                ahead += t == 1 and id(cache) in fetcher._pending
                q, k, v = (torch.randn(B, h, t, D) for h in (QH, KVH, KVH))
                got = cache.attend(q, k, v, mask, 0.3, None)
                torch.testing.assert_close(got, ref.attend(q, k, v, mask, 0.3, None))
            ring.done()
        length += t
    return ahead


# (streamed layers, fetched layers, ring slots)
CASES = [(6, [1, 2, 3], 3), (8, [0, 1, 2, 3, 4], 4), (4, [0, 1, 2, 3], 2), (4, [0, 1, 2, 3], 3)]


@pytest.mark.parametrize(("layers", "fetched", "ring"), CASES)
def test_consecutive_fetched_layers_with_a_deep_ring(layers, fetched, ring):
    """Layers 1-3 of 6 fetched, ring of three: the copy for layer 3 is issued when layer 0 is
    released, before layer 1 (the same buffer of two) has attended. It must not land before
    that; on the CPU copies land at once, so a copy issued early overwrites layer 1's KV and
    its attention output differs from a plain cache's. After the first decode step (whose first
    layers' weights were issued during prefill) every copy still goes ahead of use."""
    steps = 4
    assert _play(layers, fetched, ring, steps) >= (steps - 1) * len(fetched)


class _Clock:
    t = 0

    @classmethod
    def tick(cls) -> int:
        cls.t += 1
        return cls.t


class _FakeEvent:
    """A CUDA event: ``recorded`` is the host time of the last record (None: never)."""

    def __init__(self, *args, **kwargs) -> None:
        self.recorded: int | None = None

    def record(self, stream=None) -> None:
        assert stream is not None, "an event must be recorded on an explicit stream"
        self.recorded = _Clock.tick()

    def synchronize(self) -> None:
        pass


class _FakeStream:
    """A CUDA stream: like ``cudaStreamWaitEvent``, waiting on an event not yet recorded waits
    for nothing, so only (event, recorded-at-wait-time) pairs are kept."""

    def __init__(self, *args, **kwargs) -> None:
        self.waits: list[tuple[_FakeEvent, int | None]] = []

    def wait_event(self, ev: _FakeEvent) -> None:
        self.waits.append((ev, ev.recorded))


def _fake_cuda(monkeypatch, log: list) -> tuple[_FakeStream, _FakeStream]:
    """Replace torch.cuda's streams and events (the fetcher then runs its CUDA bookkeeping on
    CPU tensors); ``current_stream`` fails unless given a device."""
    copy_stream, compute = _FakeStream(), _FakeStream()

    def current_stream(device=None):
        assert device is not None, "current_stream() without a device is the current device's"
        return compute

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    real_init, real_take, real_release = KVFetcher.__init__, KVFetcher.take, KVFetcher.release
    real_copy = KVFetcher._copy

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self._cuda = True  # play the CUDA device's bookkeeping

    def copy(self, cache, slot):
        real_copy(self, cache, slot)  # waits, then copies: log what it had waited on by then
        waited = {id(ev) for ev, at in copy_stream.waits if at is not None}
        log.append(("copy", slot, id(cache), waited))

    def take(self, cache):
        kb, vb, slot = real_take(self, cache)
        log.append(("take", slot, id(cache), None))
        return kb, vb, slot

    def release(self, slot):
        entry = ["release", slot, None, None]
        log.append(entry)  # before the copies this release issues
        real_release(self, slot)
        entry[3] = self._free[slot]

    monkeypatch.setattr(KVFetcher, "__init__", init)
    monkeypatch.setattr(KVFetcher, "_copy", copy)
    monkeypatch.setattr(KVFetcher, "take", take)
    monkeypatch.setattr(KVFetcher, "release", release)
    return copy_stream, compute


@pytest.mark.parametrize(("layers", "fetched", "ring"), CASES)
def test_fetch_copy_waits_on_the_buffers_last_release_event(monkeypatch, layers, fetched, ring):
    """With fake streams and events: each layer reads the copy made for it, and the next copy
    into that buffer is issued after the layer released it, behind the event it recorded."""
    log: list = []
    copy_stream, _ = _fake_cuda(monkeypatch, log)
    _play(layers, fetched, ring, steps=4, stream=copy_stream)
    takes = [i for i, e in enumerate(log) if e[0] == "take"]
    assert len(takes) == len(fetched) * 4
    for t in takes:
        _, slot, cache, _ = log[t]
        before = [e for e in log[:t] if e[1] == slot and e[0] == "copy"]
        assert before[-1][2] == cache, "the buffer holds another layer's KV when read"
        after = [e for e in log[t + 1 :] if e[1] == slot and e[0] in ("copy", "release")]
        assert after[0][0] == "release", "the buffer was refilled before its reader was done"
        freed = after[0][3]
        later_copies = [e for e in after if e[0] == "copy"]
        if later_copies:
            assert id(freed) in later_copies[0][3], "the refill did not wait on the release"


# -- pinned memory --------------------------------------------------------------------------------
class _FakeCudart:
    """cudaHostRegister / cudaHostUnregister that count the live registrations."""

    def __init__(self) -> None:
        self.live: set[int] = set()

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:
        assert ptr not in self.live
        self.live.add(ptr)
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:
        self.live.remove(ptr)
        return 0


@pytest.fixture
def cudart(monkeypatch) -> _FakeCudart:
    rt = _FakeCudart()
    monkeypatch.setattr(pinned, "_cudart", lambda: rt)
    return rt


def test_pinned_buffer_is_unregistered_with_its_last_view(cudart):
    buf = pinned.pinned_empty(1 << 16)
    view = buf[100:].view(torch.float32)
    assert len(cudart.live) == 1 and pinned.live_registrations() == 1
    del buf
    gc.collect()
    assert len(cudart.live) == 1  # a view still uses the pages
    view.fill_(1.0)
    del view
    gc.collect()
    assert not cudart.live and pinned.live_registrations() == 0
    early = pinned.pinned_empty(4096)
    pinned.unpin(early)  # given back at once, and not a second time when the memory goes
    assert not cudart.live
    del early
    gc.collect()
    assert not cudart.live


def _plan(store, tiers: list[str], device: str = "cpu:1") -> PlacementPlan:
    """A plan for an accelerator played by the CPU under another name (host copies of "cpu"
    tier layers are page-locked for it, "disk" layers are read by the reader thread)."""
    _, s = store
    return PlacementPlan(
        device=device,
        layers=tuple(LayerPlacement(t, device) for t in tiers),
        embed_device="cpu",
        head_device="cpu",
        ring_slots=2,
        staging_slots=2,
        layer_bytes=s.max_layer_nbytes,
        mlp_chunk_tokens=0,
        budget=None,
    )


def test_dropped_prefetcher_stops_its_reader_and_unpins(store, cudart):
    from ollm.telemetry.stats import IOStats

    _, s = store
    pf = Prefetcher(s, _plan(store, ["gpu", "cpu", "disk", "disk"]), IOStats())
    assert cudart.live  # the pinned host copy of layer 1, the staging buffers
    reader = pf._own.reader.thread
    assert reader is not None and reader.is_alive()
    ref = weakref.ref(pf)
    del pf
    gc.collect()
    assert ref() is None, "something (the reader thread) keeps the Prefetcher alive"
    reader.join(timeout=5)
    assert not reader.is_alive() and not cudart.live


def test_failed_prefetcher_constructor_unpins_what_it_pinned(store, cudart, monkeypatch):
    from ollm.telemetry.stats import IOStats

    _, s = store
    calls = []
    real = type(s).read_into

    def read_into(self, name, dest, verify=True):
        calls.append(name)
        if len(calls) == 2:
            raise OSError("disk gone")
        return real(self, name, dest, verify)

    monkeypatch.setattr(type(s), "read_into", read_into)
    with pytest.raises(OSError, match="disk gone"):
        Prefetcher(s, _plan(store, ["cpu", "cpu", "cpu", "disk"]), IOStats())
    assert len(calls) == 2 and not cudart.live  # the first layer's copy was pinned, then freed


# -- reader thread ----------------------------------------------------------------------------------
def test_reader_outliving_its_join_never_runs_beside_a_new_one(store, monkeypatch):
    """Joins that time out (played by capping every timeout at 50 ms) while the reader is in a
    slow read: reset() must still not start a second reader before the first has exited."""
    from ollm.telemetry.stats import IOStats

    _, s = store
    real = type(s).read_into
    active, overlaps = [0], [0]
    lock = threading.Lock()

    def slow_read(self, name, dest, verify=True):
        with lock:
            active[0] += 1
            overlaps[0] = max(overlaps[0], active[0])
        try:
            time.sleep(0.3)
            return real(self, name, dest, verify)
        finally:
            with lock:
                active[0] -= 1

    class ShortJoin(threading.Thread):
        def join(self, timeout=None):
            super().join(0.05 if timeout is None else min(timeout, 0.05))

    proxy = types.SimpleNamespace(
        Thread=ShortJoin, Condition=threading.Condition, current_thread=threading.current_thread
    )
    monkeypatch.setattr(prefetch, "threading", proxy)
    monkeypatch.setattr(prefetch, "READER_JOIN_WARN_S", 0.05, raising=False)
    monkeypatch.setattr(type(s), "read_into", slow_read)
    plan = _plan(store, ["gpu", "disk", "disk", "disk"], device="cpu")
    pf = Prefetcher(s, plan, IOStats())
    try:
        time.sleep(0.1)  # the reader is inside its first read
        pf.reset()
        for i in range(1, 4):
            assert pf.get(i) is not None
            pf.release(i)
    finally:
        pf.close()
    assert overlaps[0] == 1, "two readers filled buffers at once"


# -- device passing -----------------------------------------------------------------------------------
def test_cuda_calls_name_their_device_or_stream():
    """``device="cuda:1"``: a bare ``torch.cuda.synchronize()``/``current_stream()`` or
    ``event.record()`` acts on the current device (cuda:0). The runtime's modules give every
    such call its device or stream (the two-GPU run is in scripts/gpu/runtime.py)."""
    import ast
    import inspect

    from ollm.engine import calibrate, generate, runner
    from ollm.kv import offload
    from ollm.planning import costmodel
    from ollm.telemetry import timeline

    bare = []
    for mod in (prefetch, pinned, offload, runner, generate, timeline, costmodel, calibrate):
        for node in ast.walk(ast.parse(inspect.getsource(mod))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            name = node.func.attr
            if name in ("synchronize", "current_stream", "record") and not node.args:
                receiver = ast.unparse(node.func.value)
                if name != "synchronize" or receiver == "torch.cuda":  # event.synchronize() is fine
                    bare.append(f"{mod.__name__}:{node.lineno} {ast.unparse(node)}")
    assert not bare, bare


def test_dropped_llm_gives_back_its_prefetcher(hf_models, tmp_path, cudart):
    """An ``LLM`` never closed, streaming from disk (a live reader thread): once dropped, its
    Prefetcher is collected, the reader ends and no page stays registered."""
    from ollm import LLM, SamplingParams

    _, path = hf_models("llama")
    llm = LLM(path, device="cpu", offload="disk", cache_dir=tmp_path, progress=False)
    llm.generate([1, 2, 3], SamplingParams(max_new_tokens=2, temperature=0))
    reader = llm.prefetcher._own.reader.thread
    ref = weakref.ref(llm.prefetcher)
    del llm
    gc.collect()
    assert ref() is None
    reader.join(timeout=5)
    assert not reader.is_alive() and not cudart.live
