"""``TextStream`` (what ``LLM.stream`` returns) and the encoding of prompts given as parts
(routing by segment), kept apart from ``api.py``."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from ollm.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from ollm.api import LLM, GenerationResult

Prompt = str | Sequence[int]
Parts = Sequence[tuple[str, str]]  # one prompt as (text, "full" | "routed") parts


def encode_prompts(engine, prompts: list, params, special: bool) -> tuple[list[list[int]], object]:
    """Token ids of each prompt and the request's params: a prompt given as parts (``Parts``)
    is its texts joined, encoded once, and its ``full`` parts' token spans join its params'
    ``full_attention`` (the params then become one per prompt when there are several)."""
    from dataclasses import replace

    from ollm.layers.segments import is_parts

    if not any(is_parts(p) for p in prompts):
        return [engine.encode(p, special) for p in prompts], params
    shared = isinstance(params, SamplingParams)
    plist = [params] * len(prompts) if shared else list(params)
    if len(plist) != len(prompts):
        from ollm.errors import RequestError

        raise RequestError(f"{len(prompts)} prompts but {len(plist)} sampling params")
    ids, each = [], []
    for p, sp in zip(prompts, plist, strict=True):
        if is_parts(p):
            tokens, spans = encode_parts(engine, p, special)
            sp = replace(sp, full_attention=sp.full_attention + spans)
        else:
            tokens = engine.encode(p, special)
        ids.append(tokens)
        each.append(sp)
    return ids, (each[0] if shared and len(each) == 1 else each)


def encode_parts(engine, parts: Parts, special: bool) -> tuple[list[int], tuple]:
    """(token ids of the parts' texts joined, token spans of the ``full`` parts): one encoding
    of the whole text (the tokens ``generate`` gets for the joined text), each token placed in
    the parts its characters overlap (the tokenizer's offset mapping)."""
    from ollm.errors import RequestError
    from ollm.layers.segments import part_spans

    tok = engine.tokenizer
    if tok is None:
        raise RequestError("this model has no tokenizer: pass token ids and full_attention spans")
    text = "".join(t for t, _ in parts)
    try:
        with engine.lock:
            enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
    except NotImplementedError:
        raise RequestError(
            "this tokenizer gives no character offsets: pass token ids and "
            "SamplingParams(full_attention=...)"
        ) from None
    return list(enc["input_ids"]), part_spans(parts, enc["offset_mapping"])


class _Cancelled(Exception):
    pass


class TextStream:
    """Iterator of generated text pieces; generation runs on a worker thread."""

    def __init__(self, llm: LLM, prompt: Prompt, params: SamplingParams, special: bool) -> None:
        self.result: GenerationResult | None = None
        self._queue: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._thread = threading.Thread(
            target=self._work, args=(llm, prompt, params, special), daemon=True
        )
        self._thread.start()

    def _work(self, llm: LLM, prompt: Prompt, params: SamplingParams, special: bool) -> None:
        def on_text(_: int, piece: str) -> None:
            if self._cancel.is_set():
                raise _Cancelled
            self._queue.put(("text", piece))

        try:
            res = llm.generate(prompt, params, _on_text=on_text, _special=special)
            self._queue.put(("done", res))
        except _Cancelled:
            self._queue.put(("done", None))
        except BaseException as exc:
            self._queue.put(("error", exc))

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                kind, value = self._queue.get()
                if kind == "text":
                    yield value
                elif kind == "done":
                    self.result = value
                    return
                else:
                    raise value
        finally:
            self._cancel.set()
            self._thread.join()
