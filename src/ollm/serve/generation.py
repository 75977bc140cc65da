"""The bridge from asyncio to the continuous batch: admission, submission, pieces, metrics.

Every choice of every request is one sequence submitted through ``LLM.submit``; its pieces reach
the event loop through a sink (``call_soon_threadsafe``), so no thread waits per request. A
bounded number of sequences may be held at once (beyond it: `Overloaded`, HTTP 429); a request
longer than the planned context is refused before it is queued (`BadRequest`, HTTP 400).
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from ollm.api import LLM
from ollm.engine.sampling import SamplingParams
from ollm.errors import OllmError
from ollm.serve.metrics import ServeMetrics


class BadRequest(Exception):
    """A request the server cannot run (HTTP 400 unless ``status`` says otherwise)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


class Overloaded(Exception):
    """The bounded queue is full (HTTP 429 with ``Retry-After``)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message, self.retry_after = message, retry_after


@dataclass
class Choice:
    """One sequence of a request, as the event loop sees it."""

    index: int
    stream: object = None  # the RequestStream
    first: float | None = None  # perf_counter of its first piece
    last: float | None = None
    gaps: list[float] = field(default_factory=list)
    ended: bool = False


class _Sink:
    """A ``put``-able the stepping thread writes pieces into; hands them to the event loop."""

    def __init__(self, run: Run, index: int) -> None:
        self.run, self.index = run, index

    def put(self, item: object) -> None:
        try:
            self.run.loop.call_soon_threadsafe(self.run._deliver, self.index, item)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass


class Run:
    """The sequences of one HTTP request; iterate ``pieces()`` for (choice, text or None at
    its end)."""

    def __init__(self, engine: ServeEngine, n: int, prompt_tokens: int) -> None:
        self.engine, self.loop = engine, asyncio.get_running_loop()
        self.arrival = time.perf_counter()
        self.prompt_tokens = prompt_tokens
        self.choices = [Choice(i) for i in range(n)]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.failed = False  # a submission failed: the choices were released at once

    def _deliver(self, index: int, item: object) -> None:
        """On the loop: record timing; at a choice's end, release its slot and observe it."""
        c = self.choices[index]
        if self.failed:
            return
        if c.stream is None:  # the submitting thread has not stored its stream yet
            self.loop.call_soon(self._deliver, index, item)
            return
        now = time.perf_counter()
        if isinstance(item, str):
            if c.last is not None:
                c.gaps.append(now - c.last)
            c.first = now if c.first is None else c.first
            c.last = now
            self.queue.put_nowait((index, item))
            return
        if c.ended:
            return
        c.ended = True
        self.engine._release(1)
        out, err = c.stream.result, c.stream.error  # type: ignore[attr-defined]
        tokens = len(out.token_ids) if out is not None else 0
        reason = "error" if err is not None else (out.finish_reason if out else "abort")
        reason = "abort" if reason == "cancelled" else reason
        prompt = self.prompt_tokens if index == 0 else 0  # a request's prompt counts once
        self.engine.metrics.observe(self.arrival, c.first, now, c.gaps, prompt, tokens, str(reason))
        self.queue.put_nowait((index, None))

    async def pieces(self) -> AsyncIterator[tuple[int, str | None]]:
        """Text pieces of every choice as they come; ``(i, None)`` when choice i ends."""
        left = len(self.choices)
        while left:
            index, piece = await self.queue.get()
            left -= piece is None
            yield index, piece

    def cancel(self) -> None:
        """Cancel every unfinished choice (a client left); their KV is freed before the next
        step."""
        for c in self.choices:
            if not c.ended and c.stream is not None:
                c.stream.cancel()  # type: ignore[attr-defined]


class ServeEngine:
    """Holds the model and the limits of one server."""

    def __init__(self, llm: LLM, metrics_name: str, max_pending: int = 256) -> None:
        if llm.tokenizer is None:
            raise OllmError("ollm serve needs a model with a tokenizer")
        self.llm = llm
        self.max_model_len = llm.workload.context
        self.max_pending = max_pending
        self.inflight = 0  # sequences submitted and not ended (event-loop thread only)
        self.prefix_queries = 0  # prompt tokens submitted (vLLM's prefix cache queries)
        # The server's own tokenizer: encoding with the model's would wait for the request lock
        # (the stepping thread decodes with it), i.e. for a step, for every request.
        self._tok = copy.deepcopy(llm.tokenizer)
        self._tok_lock = threading.Lock()
        self.metrics = ServeMetrics(metrics_name, self.state)

    def state(self) -> dict[str, float]:
        """Scheduler, KV and I/O numbers for /metrics."""
        s: dict[str, float] = dict(self.llm.batch_stats())
        io = self.llm.stats.snapshot()
        s["prefix_queries"] = self.prefix_queries
        s["bytes_h2d"], s["bytes_disk"] = io["bytes_h2d"], io["bytes_disk"]
        s["io_wait_seconds"] = io["host_wait_seconds"] + io["gpu_stall_seconds"]
        s["cpu_seconds"] = io["cpu_seconds"]
        return s

    def _release(self, n: int) -> None:
        self.inflight -= n

    def check_length(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """The max_tokens to use (the rest of the context when None); `BadRequest` naming the
        largest size that fits when the request never would."""
        limit = self.max_model_len
        new = limit - prompt_tokens if max_tokens is None else max_tokens
        if prompt_tokens + max(new, 1) > limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + max(new, 1)} tokens ({prompt_tokens} in the prompt, "
                f"{max(new, 1)} for the completion). The largest request that fits has "
                f"prompt + max_tokens <= {limit}.",
                param="max_tokens" if max_tokens is not None else "messages",
            )
        return new

    async def encode(self, text: str | list[int], special: bool) -> list[int]:
        """Token ids (off the event loop: the tokenizer is shared with the stepping thread)."""
        if isinstance(text, list):
            vocab = self.llm.spec.vocab_size
            if any(t < 0 or t >= vocab for t in text):
                raise BadRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
            return text
        return await asyncio.to_thread(self._encode, text, special)

    def _encode(self, text: str, special: bool) -> list[int]:
        with self._tok_lock:
            return list(self._tok(text, add_special_tokens=special)["input_ids"])

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Each token decoded alone."""
        with self._tok_lock:
            return [self._tok.decode([int(t)]) for t in ids]

    async def start(
        self,
        ids: Sequence[int],
        params: list[SamplingParams],
        priority: int,
        logprobs: int | None,
    ) -> Run:
        """Submit one sequence per params; raises `Overloaded` when the queue is full."""
        n = len(params)
        if self.inflight + n > self.max_pending:
            self.metrics.rejected.labels(self.metrics.model, "429").inc()
            raise Overloaded(
                f"the server holds {self.inflight} sequences (at most {self.max_pending}); "
                "retry later",
                retry_after=1,
            )
        self.inflight += n
        run = Run(self, n, len(ids))
        try:
            streams = await asyncio.to_thread(self._submit, run, ids, params, priority, logprobs)
        except OllmError as exc:
            run.failed = True
            self._release(n)
            raise BadRequest(str(exc)) from None
        except BaseException:
            run.failed = True
            self._release(n)
            raise
        for c, s in zip(run.choices, streams, strict=True):
            c.stream = s
        self.prefix_queries += n * len(ids)
        return run

    def _submit(self, run: Run, ids, params, priority, logprobs) -> list:
        streams: list = []
        try:
            for i, p in enumerate(params):
                sink = _Sink(run, i)
                stream = self.llm.submit(ids, p, priority=priority, logprobs=logprobs, sink=sink)  # type: ignore[arg-type]
                run.choices[i].stream = stream
                streams.append(stream)
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        return streams
