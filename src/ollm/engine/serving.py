"""Many concurrent request streams over one `BatchEngine` (what a server sits on).

``BatchServer.submit(prompt_ids, params) -> RequestStream``: a background thread steps the engine
while any request is unfinished; requests join and leave at every step. A `RequestStream` is an
iterator of text pieces (token ids when there is no tokenizer) with ``.result`` once finished and
``cancel()``. Submissions and cancellations are applied between steps. The engine (and its KV
pools) exists only while there is work: an idle server holds no KV memory, so a single-request
call on the same model never finds a second KV reservation beside its own.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager

from ollm.engine.batch import BatchEngine, EngineMetrics
from ollm.engine.generate import SequenceOutput
from ollm.engine.kvpools import DEVICE_TIER
from ollm.engine.sampling import SamplingParams, TokenLogprob

_END = object()


class RequestStream:
    """One submitted request: iterate for its output pieces as they become final."""

    def __init__(
        self,
        server: BatchServer,
        prompt: list[int],
        params: SamplingParams,
        priority: int = 0,
        logprobs: int | None = None,
        sink: queue.Queue | None = None,
    ) -> None:
        """``sink``: where pieces (then an end marker) go instead of a new queue (anything with
        ``put``: an asyncio bridge). With ``logprobs`` (top-N, >= 0) each token's
        `TokenLogprob` is appended to ``.logprobs`` before its text piece is put."""
        self.prompt, self.params = prompt, params
        self.priority, self.top_logprobs = priority, logprobs
        self.logprobs: list[TokenLogprob] = []
        self.result: SequenceOutput | None = None
        self.error: BaseException | None = None
        self.id: str | None = None  # the engine's request id, once added
        self.submitted_at = time.perf_counter()
        self.first_output_at: float | None = None  # when its first piece became final
        self.finished_at: float | None = None
        self._server = server
        self._queue: queue.Queue = sink if sink is not None else queue.Queue()
        self._done = threading.Event()

    def __iter__(self) -> Iterator[str | int]:
        """Text pieces (or token ids without a tokenizer) until the request ends; raises the
        engine's error if a step failed."""
        while True:
            item = self._queue.get()
            if item is _END:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def wait(self, timeout: float | None = None) -> SequenceOutput | None:
        """Block until the request ends; its output (None on an error or a timeout)."""
        self._done.wait(timeout)
        if self.error is not None:
            raise self.error
        return self.result

    def cancel(self) -> None:
        """Stop generating (applied before the next step); the output so far is kept."""
        self._server._cancel(self)

    @property
    def time_to_first_output(self) -> float | None:
        """Seconds from submission to the first text piece (or token), if any came."""
        return None if self.first_output_at is None else self.first_output_at - self.submitted_at

    def _put(self, item: str | int) -> None:
        if self.first_output_at is None:
            self.first_output_at = time.perf_counter()
        self._queue.put(item)

    def _finish(self, out: SequenceOutput | None, error: BaseException | None = None) -> None:
        self.result, self.error = out, error
        self.finished_at = time.perf_counter()
        self._queue.put(_END)
        self._done.set()


class BatchServer:
    """Runs submitted requests through engines made by ``make_engine`` under ``lock`` (held for
    each step: the owner may re-plan between steps only while the server is idle)."""

    def __init__(
        self,
        make_engine: Callable[[], BatchEngine],
        lock: AbstractContextManager | None = None,
        text: bool = True,
    ) -> None:
        self._make_engine = make_engine
        self._lock = lock if lock is not None else threading.RLock()
        self._text = text
        self._cv = threading.Condition()
        self._pending: list[RequestStream] = []
        self._cancels: list[RequestStream] = []
        self._streams: dict[str, RequestStream] = {}
        self._engine: BatchEngine | None = None
        self._closed = False
        # Counters of engines already closed, and the live engine's state after its last step
        # (read by a server's /metrics from another thread).
        self._retired = {"prefix_hits": 0, "prefix_saved_tokens": 0, "preemptions": 0}
        self._last: EngineMetrics | None = None
        self._thread = threading.Thread(target=self._loop, name="ollm-batch", daemon=True)
        self._thread.start()

    @property
    def idle(self) -> bool:
        """No request is queued or running (no engine, no KV pools)."""
        with self._cv:
            return not self._pending and not self._streams and self._engine is None

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        logprobs: int | None = None,
        sink: queue.Queue | None = None,
    ) -> RequestStream:
        """Queue a request (token ids); it joins the running batch at the next step (see
        `RequestStream` for the keyword arguments)."""
        stream = RequestStream(self, [int(t) for t in prompt], params, priority, logprobs, sink)
        with self._cv:
            if self._closed:
                raise RuntimeError("the batch server is closed")
            self._pending.append(stream)
            self._cv.notify()
        return stream

    def _cancel(self, stream: RequestStream) -> None:
        with self._cv:
            self._cancels.append(stream)
            self._cv.notify()

    def stats(self) -> dict[str, int]:
        """Requests running and waiting (queued here or in the scheduler), KV blocks used and
        held on the device tier, and prefix-cache / preemption totals since the start."""
        with self._cv:
            queued = len(self._pending)
            m = self._last
            totals = dict(self._retired)
        out = {"running": 0, "waiting": queued, "kv_used": 0, "kv_blocks": 0, **totals}
        if m is not None:
            out["running"] = m.running
            out["waiting"] += m.waiting + m.swapped
            out["prefix_hits"] += m.prefix_hits
            out["prefix_saved_tokens"] += m.prefix_saved_tokens
            out["preemptions"] += m.preemptions
            for tiers in m.kv_blocks.values():
                used, free = tiers.get(DEVICE_TIER, (0, 0))
                out["kv_used"] += used
                out["kv_blocks"] += used + free
        return out

    def close(self) -> None:
        """Cancel every request and stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()

    # -- the stepping thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._closed or self._pending or self._cancels or self._streams):
                    self._cv.wait()
                if self._closed:
                    break
                pending, self._pending = self._pending, []
                cancels, self._cancels = self._cancels, []
            try:
                with self._lock:
                    self._apply(pending, cancels)
                    if self._engine is not None and self._engine.has_work():
                        for rid in self._engine.step():
                            self._end(rid)
                    self._snapshot()
                    self._release_if_idle()
            except BaseException as exc:  # a failed step ends every request with its error
                self._fail_all(exc)
            # Python's locks are not fair: unless this thread gives up the GIL here it takes the
            # lock again before a woken waiter (a submit()) runs, which then waits a step or more.
            time.sleep(0)
        with self._lock:
            for stream in list(self._streams.values()) + self._pending:
                stream._finish(None, RuntimeError("the batch server was closed"))
            self._streams.clear()
            self._drop_engine()

    def _apply(self, pending: list[RequestStream], cancels: list[RequestStream]) -> None:
        """Add new requests (making the engine if needed) and cancel others, between steps."""
        for stream in cancels:
            if stream.id is not None and self._engine is not None:
                if self._engine.cancel(stream.id):
                    self._end(stream.id)
            elif stream in pending:
                pending.remove(stream)
                stream._finish(None)
        for stream in pending:
            try:
                if self._engine is None:
                    self._engine = self._make_engine()  # pools: may fail (memory)
                stream.id = self._engine.add(
                    stream.prompt, stream.params, on_text=self._on_text(stream),
                    on_token=None if self._text else self._on_token(stream),
                    priority=stream.priority, logprobs=stream.top_logprobs,
                    on_logprob=lambda _, lp, s=stream: s.logprobs.append(lp),
                )  # fmt: skip
            except Exception as exc:  # a request that can never fit, or no pools: it fails
                stream._finish(None, exc)
                continue
            self._streams[stream.id] = stream

    def _on_text(self, stream: RequestStream) -> Callable[[int, str], None]:
        return lambda _, piece: stream._put(piece)

    def _on_token(self, stream: RequestStream) -> Callable[[int, int], None]:
        return lambda _, tok: stream._put(tok)

    def _end(self, rid: str) -> None:
        stream = self._streams.pop(rid)
        assert self._engine is not None
        stream._finish(self._engine.finished.pop(rid))

    def _release_if_idle(self) -> None:
        if self._engine is not None and not self._engine.has_work() and not self._streams:
            self._drop_engine()  # frees the pools: an idle server holds no KV memory

    def _snapshot(self) -> None:
        if self._engine is not None:
            m = self._engine.metrics()
            with self._cv:
                self._last = m

    def _drop_engine(self) -> None:
        """Close the engine, adding its counters to the totals of closed ones."""
        if self._engine is None:
            return
        m = self._engine.metrics()
        with self._cv:
            self._retired["prefix_hits"] += m.prefix_hits
            self._retired["prefix_saved_tokens"] += m.prefix_saved_tokens
            self._retired["preemptions"] += m.preemptions
            self._last = None
        self._engine.close()
        self._engine = None

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            for stream in self._streams.values():
                stream._finish(None, exc)
            self._streams.clear()
            self._drop_engine()
