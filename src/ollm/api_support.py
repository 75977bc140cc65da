"""``TextStream`` (what ``LLM.stream`` returns), kept apart from ``api.py``."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from ollm.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from ollm.api import LLM, GenerationResult

Prompt = str | Sequence[int]


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
