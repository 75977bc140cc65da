"""Request models (pydantic, validated strictly) and response shapes of the OpenAI API.

Responses are plain dicts shaped as the ``openai`` client's types (``Completion``,
``ChatCompletion``, ``ChatCompletionChunk``); errors use OpenAI's ``{"error": {...}}`` shape.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16  # choices per request
MAX_TOP_LOGPROBS = 20  # vLLM's and OpenAI's bound
MAX_STOP = 16  # stop strings per request
Chunking = Literal["token", "sentence", "paragraph"]


class OllmOptions(BaseModel):
    """ollm's own request options (the ``"ollm"`` field)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    chunking: Chunking | None = None
    """Where streamed pieces end: each token (default), sentence or paragraph ends."""
    speculate: str | None = Field(None, max_length=1024)
    """Speculative decoding for this request ("off", "lookup", "tree:lookup", ...; lossless);
    None: the server's setting (`SamplingParams.speculate`)."""


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False
    """A last chunk with ``usage`` and no choices."""


class _Common(BaseModel):
    """Fields both endpoints take (unknown fields are ignored, as OpenAI's clients send some)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str = Field(max_length=512)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)
    """Lower runs first (vLLM's meaning); reaches the scheduler's request priority."""
    ollm: OllmOptions | None = None

    def stops(self) -> list[str]:
        """The stop strings as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: str | list[int] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False


class ContentPart(BaseModel):
    """A text part of a message's content (images and audio are not supported)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        """The content as one string."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


# -- responses ------------------------------------------------------------------------------------


def error_body(message: str, kind: str = "invalid_request_error", **extra: Any) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": None, "code": None, **extra}}


def new_id(prefix: str) -> str:
    """A response id (``cmpl-...`` / ``chatcmpl-...``)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def envelope(rid: str, obj: str, model: str, choices: list[dict], created: int | None = None):
    """The fields every completion object and chunk has."""
    created = int(time.time()) if created is None else created
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}


def completion_logprobs(entries: list[tuple[str, float, dict[str, float]]], offset: int) -> dict:
    """The legacy completions ``logprobs`` object: tokens, their log-probs, the top ones and
    each token's character offset in the text (from ``offset``)."""
    offsets = []
    for tok, _, _ in entries:
        offsets.append(offset)
        offset += len(tok)
    return {
        "tokens": [t for t, _, _ in entries],
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [top for _, _, top in entries],
        "text_offset": offsets,
    }


def chat_logprobs(entries: list[tuple[str, float, dict[str, float]]]) -> dict:
    """The chat ``logprobs`` object: ``content``, one entry per token with its top ones."""

    def one(tok: str, lp: float) -> dict:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}

    return {
        "content": [
            {**one(tok, lp), "top_logprobs": [one(t, v) for t, v in top.items()]}
            for tok, lp, top in entries
        ],
        "refusal": None,
    }
