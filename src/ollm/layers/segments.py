"""Routing by segment (issue 18): spans of a prompt the request marks ``full``. Every page of
keys a span touches is read by every routed head of every routed layer at every decode step,
like the sinks, outside the top-k budget: a question or instructions placed before a long
document are never dropped by top-k, and the top-k pages are spent on the document.

Spans are token positions of the prompt as (start, end) pairs, end exclusive; a negative value
counts from the prompt's end and an end of None is the prompt's end (Python slices): ``(0, 200)``
is the first 200 tokens, ``(-40, None)`` the last 40. They are checked for form when given
(``check_spans``) and against the prompt when the request runs (``resolve_spans``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ollm.errors import RequestError

Span = tuple[int, int | None]
PART_MODES = ("full", "routed", "topk")  # a prompt part's attention ("topk" = "routed")


def _whole(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_spans(spans: Iterable[Sequence[int | None]] | None) -> tuple[Span, ...]:
    """``spans`` as a tuple of (start, end) pairs of ints (end may be None); a malformed one is
    a one-line ValueError (``SamplingParams`` turns it into its own error)."""
    out = []
    for span in spans or ():
        pair = tuple(span) if isinstance(span, (tuple, list)) else (span,)
        if len(pair) != 2 or not _whole(pair[0]) or not (pair[1] is None or _whole(pair[1])):
            raise ValueError(f"a full_attention span is a (start, end) pair of ints, not {span!r}")
        a, e = pair
        if e is not None and (a >= 0) == (e >= 0) and a >= e:
            raise ValueError(f"full_attention span {span!r} is empty (start >= end)")
        out.append((a, e))
    return tuple(out)


def parse_spans(text: str) -> tuple[Span, ...]:
    """``"0:200,-40:"`` -> ((0, 200), (-40, None)): slices of the prompt's tokens (the CLI's
    ``--full-attention``); a bad value is a one-line ValueError."""
    out = []
    for item in (p.strip() for p in str(text).split(",")):
        a, sep, e = item.partition(":")
        try:
            if not sep:
                raise ValueError
            out.append((int(a) if a.strip() else 0, int(e) if e.strip() else None))
        except ValueError:
            raise ValueError(
                f"bad span {item!r} in {text!r}: use START:END token slices, e.g. 0:200,-40:"
            ) from None
    return check_spans(out)


def resolve_spans(spans: Iterable[Span], length: int) -> list[tuple[int, int]]:
    """``spans`` as [start, end) positions of a prompt of ``length`` tokens; a span outside the
    prompt or empty is a one-line RequestError."""
    out = []
    for a, e in spans:
        a2 = a + length if a < 0 else a
        e2 = length if e is None else e + length if e < 0 else e
        if not 0 <= a2 < e2 <= length:
            raise RequestError(
                f"full_attention span ({a}, {e}) is outside the prompt of {length} tokens "
                "(or empty)"
            )
        out.append((a2, e2))
    return out


def span_pages(spans: Iterable[tuple[int, int]], page_tokens: int) -> list[int]:
    """Sorted ids of the pages of ``page_tokens`` slots that slot spans [a, b) touch."""
    pages: set[int] = set()
    for a, e in spans:
        pages.update(range(a // page_tokens, -(-e // page_tokens)))
    return sorted(pages)


def is_parts(prompt: object) -> bool:
    """Whether ``prompt`` is one prompt given as parts: a non-empty list of (text, mode)."""
    return (
        isinstance(prompt, (list, tuple))
        and len(prompt) > 0
        and all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], str)
            for p in prompt
        )
    )


def part_spans(
    parts: Sequence[tuple[str, str]], offsets: Sequence[tuple[int, int]]
) -> tuple[Span, ...]:
    """Token spans of the ``full`` parts of a prompt ``"".join(texts)`` whose tokens cover the
    characters ``offsets`` (the tokenizer's offset mapping): a token belongs to a part when
    their characters overlap; special tokens (no characters) to none."""
    bounds, pos = [], 0
    for text, mode in parts:
        if mode not in PART_MODES:
            raise RequestError(f"a prompt part's mode is one of {PART_MODES}, not {mode!r}")
        if mode == "full" and text:
            bounds.append((pos, pos + len(text)))
        pos += len(text)
    spans: list[Span] = []
    for a, e in bounds:
        hit = [i for i, (x, y) in enumerate(offsets) if y > x and x < e and y > a]
        if hit:
            spans.append((hit[0], hit[-1] + 1))
    return tuple(spans)
