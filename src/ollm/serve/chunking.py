"""Streamed text cut at natural boundaries: each token, sentence ends or paragraph ends.

Pieces arrive as whole characters (the detokenizer holds back an incomplete UTF-8 sequence), so
cutting between them never splits a multi-byte character.
"""

from __future__ import annotations

import re

# A sentence ends at . ! ? (or their CJK forms, or an ellipsis), then closing quotes or
# brackets, then white space; a line break ends one too.
_SENTENCE = re.compile(r"(?:[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*\s+|\n+)")
_PARAGRAPH = re.compile(r"\n\s*\n")


class Chunker:
    """Buffers pieces and releases text up to the last boundary of its ``mode``."""

    def __init__(self, mode: str = "token") -> None:
        if mode not in ("token", "sentence", "paragraph"):
            raise ValueError(f"chunking must be token, sentence or paragraph, got {mode!r}")
        self.mode = mode
        self._buf = ""

    def feed(self, piece: str) -> str:
        """Add ``piece``; the text ready to send (possibly empty)."""
        if self.mode == "token":
            return piece
        self._buf += piece
        pattern = _SENTENCE if self.mode == "sentence" else _PARAGRAPH
        end = 0
        for m in pattern.finditer(self._buf):
            end = m.end()
        out, self._buf = self._buf[:end], self._buf[end:]
        return out

    def flush(self) -> str:
        """Whatever is left (at the end of the stream)."""
        out, self._buf = self._buf, ""
        return out
