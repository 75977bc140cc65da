"""A faithful fast tokenizer from a GGUF's SentencePiece ("llama" model) vocabulary.

transformers 5.x rebuilds Gemma GGUF tokenizers without BPE merges (character-level output, no
BOS), so we build one with the `tokenizers` library: BPE whose merges follow the piece scores
(SentencePiece BPE merges the pair whose result scores highest), byte fallback, control tokens
as special tokens, user-defined pieces matched whole, BOS added when the GGUF says so.
"""

from __future__ import annotations

import re
from typing import Any

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# User-defined pieces that are markers, not text: Gemma 3's GGUF types <start_of_image>,
# <end_of_image> and [multimodal] USER_DEFINED, while its HF tokenizer marks them special (so
# decode(skip_special_tokens=True) drops them). HTML pieces such as <table> stay text.
_MARKER = re.compile(r"<[a-z]+(?:_[a-z]+)+>|\[[a-z]+\]")


def is_marker(piece: str) -> bool:
    """True for a user-defined piece that marks structure (``<start_of_image>``), not text."""
    return _MARKER.fullmatch(piece) is not None


def _field(fields: Any, key: str, default: Any = None) -> Any:
    f = fields.get(key)
    return default if f is None else f.contents()


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by SentencePiece scores: each normal piece, split every way into two
    known pieces, ranked by the piece's score (higher first), ties by the parts' ids."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, piece in enumerate(tokens):
        if types[i] != NORMAL or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            li, ri = vocab.get(left), vocab.get(right)
            if li is not None and ri is not None:
                ranked.append((-scores[i], li, ri, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def build_tokenizer(fields: Any, arch: str):
    """A ``PreTrainedTokenizerFast`` from GGUF tokenizer metadata (``GGUFReader.fields``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tokens = [str(t) for t in _field(fields, "tokenizer.ggml.tokens")]
    scores = [float(s) for s in _field(fields, "tokenizer.ggml.scores", [0.0] * len(tokens))]
    types = [int(t) for t in _field(fields, "tokenizer.ggml.token_type", [NORMAL] * len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = _field(fields, "tokenizer.ggml.unknown_token_id")
    model = BPE(
        vocab=vocab,
        merges=spm_merges(tokens, scores, types),
        unk_token=tokens[unk_id] if unk_id is not None else None,
        byte_fallback=True,
        fuse_unk=True,
    )
    tok = Tokenizer(model)
    prefix = bool(_field(fields, "tokenizer.ggml.add_space_prefix", False))
    norm = [normalizers.Replace(" ", "▁")]
    if prefix:
        norm.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == CONTROL or (ty == USER_DEFINED and is_marker(t))
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == USER_DEFINED and not is_marker(t)
        ]
    )

    def special(key: str) -> str | None:
        i = _field(fields, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None else None

    bos = special("bos")
    if bos is not None and _field(fields, "tokenizer.ggml.add_bos_token", True):
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    # Only the file's own template: a GGUF without one is usually a base model, best run raw.
    template = _field(fields, "tokenizer.chat_template")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=special("eos"),
        unk_token=special("unknown"),
        pad_token=special("padding"),
        chat_template=template,
        clean_up_tokenization_spaces=False,
    )
