"""The two generating endpoints: parameters from a request, the run, its response or stream.

``/v1/completions`` and ``/v1/chat/completions`` share everything but the prompt (text or token
ids; a chat rendered with the model's template) and the shapes of choices, deltas and log-probs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ollm.engine.sampling import SamplingParams, SamplingParamsError
from ollm.errors import OllmError
from ollm.serve import protocol as P
from ollm.serve.chunking import Chunker
from ollm.serve.generation import BadRequest, Run, ServeEngine


@dataclass
class Job:
    """A validated request, ready to run."""

    chat: bool
    req: P.CompletionRequest | P.ChatRequest
    ids: list[int]
    params: list[SamplingParams]
    top_logprobs: int | None  # None: no log-probs
    chunking: str
    model: str


def sampling_params(req: P.CompletionRequest | P.ChatRequest, max_new: int) -> list[SamplingParams]:
    """One params per choice; seeded choices get seed, seed + 1, ... so they differ."""
    stops = req.stops()
    if len(stops) > P.MAX_STOP:
        raise BadRequest(f"at most {P.MAX_STOP} stop strings, got {len(stops)}", param="stop")
    try:
        return [
            SamplingParams(
                max_new_tokens=max_new,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                seed=None if req.seed is None else req.seed + i,
                stop=stops,
                speculate=None if req.ollm is None else req.ollm.speculate,
            )  # fmt: skip
            for i in range(req.n)
        ]
    except SamplingParamsError as exc:
        raise BadRequest(str(exc)) from None


async def make_job(
    engine: ServeEngine, req: P.CompletionRequest | P.ChatRequest, model: str, chunking: str
) -> Job:
    """Validate a parsed request against the model and the limits; encode its prompt."""
    if req.model != model:
        raise BadRequest(
            f"The model `{req.model}` does not exist; this server serves `{model}`",
            param="model",
            status=404,
        )
    if isinstance(req, P.ChatRequest):
        msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = await asyncio.to_thread(engine.llm.render_chat, msgs)
        except (ValueError, OllmError) as exc:
            raise BadRequest(str(exc), param="messages") from None
        except Exception as exc:  # a template that rejects the conversation (jinja raises)
            raise BadRequest(f"the chat template failed: {exc}", param="messages") from None
        ids = await engine.encode(text, special=False)
        max_tokens = req.max_completion_tokens or req.max_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        top = (req.top_logprobs or 0) if req.logprobs else None
    else:
        if req.echo:
            raise BadRequest("echo is not supported", param="echo")
        ids = await engine.encode(req.prompt, special=True)
        max_tokens, top = req.max_tokens, req.logprobs
    if not ids:
        raise BadRequest("the prompt is empty (no tokens)", param="prompt")
    max_new = engine.check_length(len(ids), max_tokens)
    opts = req.ollm.chunking if req.ollm is not None else None
    return Job(
        isinstance(req, P.ChatRequest), req, ids, sampling_params(req, max_new), top,
        opts or chunking, model,
    )  # fmt: skip


def _finish_reason(stream) -> str:
    out = stream.result
    reason = out.finish_reason if out is not None else None
    return reason if reason in ("stop", "length") else "stop"


async def _logprob_entries(engine: ServeEngine, lps: list) -> list[tuple[str, float, dict]]:
    """(token text, log-prob, {top token text: log-prob}) per `TokenLogprob`."""
    if not lps:
        return []
    ids = [lp.token for lp in lps] + [t for lp in lps for t, _ in lp.top]
    strings = await asyncio.to_thread(engine.token_strings, ids)
    names = dict(zip(ids, strings, strict=True))
    return [(names[lp.token], lp.logprob, {names[t]: v for t, v in lp.top}) for lp in lps]


def _choice_error(run: Run) -> BaseException | None:
    for c in run.choices:
        err = c.stream.error  # type: ignore[attr-defined]
        if err is not None:
            return err
    return None


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def respond(engine: ServeEngine, request: Request, job: Job) -> Response:
    """Run ``job``: a JSON response, or an SSE stream when it asked for one."""
    run = await engine.start(job.ids, job.params, job.req.priority, job.top_logprobs)
    if job.req.stream:
        return StreamingResponse(_events(engine, job, run), media_type="text/event-stream")
    drain = asyncio.ensure_future(_drain(run))
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({drain, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not drain.done():  # the client left (or the server stops): free the sequences
            drain.cancel()
            run.cancel()
    if not drain.done() or drain.cancelled():
        return Response(status_code=499)
    err = _choice_error(run)
    if err is not None:
        return _error_response(err)
    choices, completion = [], 0
    for c in run.choices:
        s = c.stream
        out = s.result  # type: ignore[attr-defined]
        completion += len(out.token_ids)
        entries = None
        if job.top_logprobs is not None:
            entries = await _logprob_entries(engine, s.logprobs)  # type: ignore[attr-defined]
        choices.append(_final_choice(job, c.index, out.text, _finish_reason(s), entries))
    obj = "chat.completion" if job.chat else "text_completion"
    body = P.envelope(P.new_id("chatcmpl" if job.chat else "cmpl"), obj, job.model, choices)
    body["usage"] = P.usage(len(job.ids), completion)
    return JSONResponse(body)


def _error_response(err: BaseException) -> JSONResponse:
    if isinstance(err, OllmError):
        return JSONResponse(P.error_body(str(err)), status_code=400)
    return JSONResponse(P.error_body(f"generation failed: {err}", "server_error"), 500)


async def _drain(run: Run) -> None:
    async for _ in run.pieces():
        pass


def _final_choice(job: Job, index: int, text: str, reason: str, entries) -> dict:
    if job.chat:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "finish_reason": reason,
            "logprobs": None if entries is None else P.chat_logprobs(entries),
        }
    lp = None if entries is None else P.completion_logprobs(entries, 0)
    return {"index": index, "text": text, "finish_reason": reason, "logprobs": lp}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _events(engine: ServeEngine, job: Job, run: Run) -> AsyncIterator[str]:
    """SSE chunks of every choice, then usage (if asked) and ``[DONE]``; leaving early (the
    client disconnected) cancels the sequences still running."""
    rid = P.new_id("chatcmpl" if job.chat else "cmpl")
    obj = "chat.completion.chunk" if job.chat else "text_completion"
    usage_asked = job.req.stream_options is not None and job.req.stream_options.include_usage
    chunkers = [Chunker(job.chunking) for _ in run.choices]
    sent_lp = [0] * len(run.choices)  # log-probs already sent, per choice
    offsets = [0] * len(run.choices)  # characters already sent (completions' text_offset)

    async def chunk(i: int, text: str, reason: str | None = None) -> str:
        entries = None
        if job.top_logprobs is not None:
            lps = run.choices[i].stream.logprobs  # type: ignore[attr-defined]
            entries = await _logprob_entries(engine, lps[sent_lp[i] : len(lps)])
            sent_lp[i] += len(entries)
        if job.chat:
            delta = {"content": text} if text else {}
            lp = None if entries is None else P.chat_logprobs(entries)
            choice = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": lp}
        else:
            lp = None if entries is None else P.completion_logprobs(entries, offsets[i])
            choice = {"index": i, "text": text, "finish_reason": reason, "logprobs": lp}
        offsets[i] += len(text)
        body = P.envelope(rid, obj, job.model, [choice])
        if usage_asked:
            body["usage"] = None
        return _sse(body)

    try:
        if job.chat:
            for c in run.choices:
                role = {"index": c.index, "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None, "logprobs": None}  # fmt: skip
                yield _sse(P.envelope(rid, obj, job.model, [role]))
        completion = 0
        async for i, piece in run.pieces():
            if piece is not None:
                text = chunkers[i].feed(piece)
                if text:
                    yield await chunk(i, text)
                continue
            stream = run.choices[i].stream
            err = stream.error  # type: ignore[attr-defined]
            if err is not None:
                yield _sse(P.error_body(str(err), "server_error"))
                continue
            completion += len(stream.result.token_ids)  # type: ignore[attr-defined]
            yield await chunk(i, chunkers[i].flush(), _finish_reason(stream))
        if usage_asked:
            body = P.envelope(rid, obj, job.model, [])
            body["usage"] = P.usage(len(job.ids), completion)
            yield _sse(body)
        yield _sse("[DONE]")
    finally:
        run.cancel()  # no-op for choices that ended
