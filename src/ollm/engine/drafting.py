"""Drafters for speculative decoding: ``drafter(tokens) -> proposed next tokens``.

A draft costs only query rows of the same weight pass (streamed weights are read once for all of
them), and greedy verification keeps exactly the tokens greedy decoding would pick, so a drafter
that is often right raises tokens per pass and one that is wrong costs only those rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def lookup(tokens: Sequence[int], k: int, ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """The ``k`` tokens that followed the most recent earlier occurrence of the last ``ngram``
    tokens of ``tokens`` (trying shorter tails down to ``min_ngram``); [] when none recurs."""
    toks = list(tokens)
    for n in range(min(ngram, len(toks) - 1), min_ngram - 1, -1):
        tail = toks[-n:]
        # Latest match first: recent context predicts best.
        for i in range(len(toks) - n - 1, -1, -1):
            if toks[i : i + n] == tail:
                return toks[i + n : i + n + k]
    return []


def prompt_lookup(
    ngram: int = 3, k: int = 4, min_ngram: int = 1
) -> Callable[[Sequence[int]], list[int]]:
    """Prompt-lookup drafting (as in transformers' ``prompt_lookup_num_tokens``): find the most
    recent earlier occurrence of the last ``ngram`` tokens (down to ``min_ngram``) and propose
    the ``k`` tokens that followed it. Repetitive text (code, quotes, summaries of the prompt)
    is where it pays."""
    if not 1 <= min_ngram <= ngram or k < 1:
        raise ValueError(f"need 1 <= min_ngram <= ngram and k >= 1 (got {min_ngram}, {ngram}, {k})")

    def draft(tokens: Sequence[int]) -> list[int]:
        return lookup(tokens, k, ngram, min_ngram)

    return draft
