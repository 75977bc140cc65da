"""Streaming text out of generated token ids: incremental detokenization and stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ollm.errors import OllmError

__all__ = ["IncrementalDetokenizer", "StopMatcher"]

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces that never split a multi-byte character.

    Uses the prefix-offset / read-offset scheme (as in vLLM): each ``push`` decodes only the
    tokens from ``prefix_offset`` on and diffs that against the decode of
    ``ids[prefix_offset:read_offset]``. Decoding both with the same leading tokens keeps
    SentencePiece's leading-space handling consistent, so the pieces concatenate to
    ``tokenizer.decode(all_ids, skip_special_tokens=...)``.

    With ``skip_special_tokens``, added tokens that are structural markers but not typed special
    (``<start_of_image>`` in layer stores converted from a Gemma 3 GGUF before the tokenizer
    marked them special) are dropped too, as transformers' own Gemma 3 tokenizer drops them.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._hidden = _marker_ids(tokenizer) if skip_special_tokens else frozenset()
        self.ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # end of the text already emitted
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset])
        self._pieces: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        if self._hidden:
            ids = [i for i in ids if i not in self._hidden]
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, final: bool) -> str:
        new_text = self._decode(self.ids[self._prefix_offset :])
        prefix = self._prefix_text
        if len(new_text) <= len(prefix) or (not final and new_text.endswith(_REPLACEMENT)):
            return ""  # nothing new, or a character is still incomplete
        piece = new_text[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        self._pieces.append(piece)
        return piece

    def push(self, token_id: int) -> str:
        """Add one token; return the new complete text ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever text remains (e.g. a trailing incomplete byte sequence as U+FFFD)."""
        if self._read_offset == len(self.ids):
            return ""
        return self._advance(final=True)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)


def _marker_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of added, non-special tokens that look like markers (see ``is_marker``)."""
    from ollm.storage.gguf_tokenizer import is_marker

    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return frozenset(
        int(i)
        for i, t in added.items()
        if not getattr(t, "special", False) and is_marker(str(getattr(t, "content", t)))
    )


class StopMatcher:
    """Finds stop strings in streamed text; holds back a tail that might begin a stop string.

    The emitted text always equals the full text cut just before the earliest occurrence of
    any stop string, however the text is split into pieces. A found stop is only final once
    no earlier-starting (longer) stop can still complete.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            stops = (stops,)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise OllmError(f"stop strings must be non-empty str, got {s!r}")
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(stops))
        self._max_len = max((len(s) for s in self.stops), default=0)
        self._buf = ""  # text received but not yet emitted
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """True once a stop string has been found."""
        return self._stopped

    def _pending_start(self) -> int | None:
        """Earliest index j where ``buf[j:]`` is a proper prefix of some stop string."""
        buf = self._buf
        for j in range(max(0, len(buf) - self._max_len + 1), len(buf)):
            tail = buf[j:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stops):
                return j
        return None

    def _scan(self, final: bool) -> str:
        buf = self._buf
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        match = min(found) if found else None
        pending = None if final else self._pending_start()
        if match is not None and (pending is None or pending >= match):
            self._stopped = True
            self._buf = ""
            return buf[:match]
        cut = len(buf) if pending is None else pending
        self._buf = buf[cut:]
        return buf[:cut]

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add a piece; return (text safe to emit now, stopped)."""
        if self._stopped:
            return "", True
        if not self.stops:
            return piece, False
        self._buf += piece
        out = self._scan(final=False)
        return out, self._stopped

    def flush(self) -> str:
        """Release held-back text at the end (cut before a stop that the end confirms)."""
        if self._stopped:
            return ""
        out = self._scan(final=True)
        self._buf = ""
        return out
