"""Routing by segment (issue 18): spans a request marks full are read by every routed head at
every decode step, outside the top-k budget. Against float64 references with explicit key sets
(per sequence, on the paged and the gathered paths, device and tiered caches, routed prefill);
a span covering everything is full attention exactly; no spans (or spans only over sinks and
window) change nothing, bit for bit; spans from parts of a prompt; one-line errors."""

from __future__ import annotations

import threading

import pytest
import torch

from ollm import LLM, SamplingParams
from ollm.api_support import encode_prompts
from ollm.engine.sampling import SamplingParamsError
from ollm.errors import RequestError
from ollm.kv.cache import LayerKVCache
from ollm.kv.offload import KVScratch, OffloadedKVCache
from ollm.kv.routed import Router, force_spans
from ollm.layers.attention import AttentionMask, attend
from ollm.layers.routing import FULL, TOPK, WINDOW, LayerRouting
from ollm.layers.segments import parse_spans, part_spans, resolve_spans, span_pages
from ollm.telemetry.stats import IOStats

B, H, KVH, D, SCALE = 2, 6, 3, 16, 0.25
PT = 16  # page tokens


def _kv(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, KVH, n, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, KVH, n, D, generator=g, dtype=torch.float64)
    q = torch.randn(B, H, 1, D, generator=g, dtype=torch.float64)
    return q, k, v


def _scores(q, k, b, head, pages):
    """Quest upper bounds of the pages, maxed over the group's query heads."""
    g = H // KVH
    qs = q[b, head * g : (head + 1) * g, 0]
    out = []
    for p in pages:
        keys = k[b, head, p * PT : (p + 1) * PT]
        mn, mx = keys.min(0).values, keys.max(0).values
        out.append(float(torch.maximum(qs * mn, qs * mx).sum(-1).max()))
    return out


def _reference(q, k, v, r, n, forced):
    """float64 attention of the decode query at slot n - 1, each head's key set explicit:
    sinks, window, every forced page of the middle and (top-k heads) the best other pages."""
    lo, hi = r.middle(n - 1)
    g = H // KVH
    out = torch.empty(B, H, 1, D, dtype=torch.float64)
    for b in range(B):
        mid = [p for p in range(lo // PT, hi // PT)]
        fp = [p for p in mid if p in forced[b]]
        others = [p for p in mid if p not in forced[b]]
        for hd, mech in enumerate(r.heads):
            keep = torch.zeros(n, dtype=torch.bool)
            if mech == FULL:
                keep[:] = True
            else:
                keep[:lo] = keep[hi:] = True
                chosen = list(fp)
                if mech == TOPK:
                    s = _scores(q, k, b, hd, others)
                    order = sorted(range(len(others)), key=lambda i: -s[i])
                    chosen += [others[i] for i in order[: r.pages]]
                for p in chosen:
                    keep[p * PT : (p + 1) * PT] = True
            qs = q[b, hd * g : (hd + 1) * g, 0]
            s = (qs @ k[b, hd, :n].T) * SCALE
            s[:, ~keep] = -torch.inf
            out[b, hd * g : (hd + 1) * g, 0] = s.softmax(-1) @ v[b, hd, :n]
    return out


def _cache(r, n, spans=None, stats=None, offloaded=False):
    if offloaded:  # the first 48 slots on the "device", the rest in RAM
        scratch = KVScratch(B, KVH, D, n + 8, torch.float64, "cpu")
        cache = OffloadedKVCache(B, KVH, D, n + 8, torch.float64, scratch, device_tokens=48)
    else:
        cache = LayerKVCache(B, KVH, D, n + 8, torch.float64, "cpu")
    cache.router = Router(r, B, D, n + 8, torch.float64, "cpu", stats)
    force_spans([cache], spans)
    return cache


def _decode_last(cache, q, k, v, n, keep=None):
    """Prefill slots [0, n - 1) in two chunks, then the decode query at slot n - 1."""
    for a, e in ((0, 101), (101, n - 1)):
        m = AttentionMask(a, e - a, e, keep)
        z = torch.zeros(B, H, e - a, D, dtype=q.dtype)
        cache.attend(z, k[:, :, a:e], v[:, :, a:e], m, SCALE, None)
    m = AttentionMask(n - 1, 1, n, keep)
    return cache.attend(q, k[:, :, n - 1 :], v[:, :, n - 1 :], m, SCALE, None)


MIXED = LayerRouting((FULL, WINDOW, TOPK), window=40, sinks=5, pages=3, page_tokens=PT)
ROUTED = LayerRouting((TOPK, WINDOW, TOPK), window=40, sinks=5, pages=3, page_tokens=PT)


@pytest.mark.parametrize("offloaded", [False, True])
@pytest.mark.parametrize(
    "spans",
    [
        [[(20, 50)], [(20, 50)]],  # the same pages per sequence: the paged read
        [[(20, 50), (130, 140)], [(70, 75)]],  # different counts: the gathered read, padded
    ],
)
def test_forced_pages_are_read_and_match_float64_reference(spans, offloaded):
    n = 230
    q, k, v = _kv(n)
    for r in (MIXED, ROUTED):
        stats = IOStats()
        out = _decode_last(_cache(r, n, spans, stats, offloaded), q, k, v, n)
        forced = [span_pages(row, PT) for row in spans]
        ref = _reference(q, k, v, r, n, forced)
        routed = [i for i, m in enumerate(r.heads) if m != FULL]
        cols = [h * 2 + j for h in routed for j in range(2)]
        tol = 1e-6 if offloaded else 1e-10  # RAM tiers: the float32 kernel of the paged read
        torch.testing.assert_close(out[:, cols], ref[:, cols], rtol=tol, atol=tol)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        lo, hi = r.middle(n - 1)
        per_seq = [len([p for p in row if lo // PT <= p < hi // PT]) for row in forced]
        f = round(sum(per_seq) / B)
        assert stats.kv_read_tokens == r.read_tokens(n - 1, n, f) > r.read_tokens(n - 1, n)
        # without the spans the forced pages' keys are missed: a different result
        plain = _decode_last(_cache(r, n, None, None, offloaded), q, k, v, n)
        assert not torch.allclose(plain[:, cols], out[:, cols])


def test_forced_pages_with_padding_mask_equal_the_reference():
    """A key padding mask (all real keys) takes the gathered path with spans too."""
    n, spans = 203, [[(30, 40)], [(60, 100)]]
    q, k, v = _kv(n, seed=3)
    keep = torch.ones(B, n + 8, dtype=torch.bool)
    out = _decode_last(_cache(MIXED, n, spans), q, k, v, n, keep)
    ref = _reference(q, k, v, MIXED, n, [span_pages(r, PT) for r in spans])
    torch.testing.assert_close(out[:, 2:], ref[:, 2:], rtol=1e-10, atol=1e-10)


def test_a_span_over_everything_is_full_attention():
    n = 200
    q, k, v = (x.float() for x in _kv(n, seed=2))
    r = LayerRouting((TOPK,) * KVH, window=32, sinks=4, pages=2, page_tokens=PT)
    cache = LayerKVCache(B, KVH, D, n + 8, torch.float32, "cpu")
    cache.router = Router(r, B, D, n + 8, torch.float32, "cpu")
    cache.router.force([[(0, n - 1)]] * B)
    routed = _decode_last(cache, q, k, v, n)
    full = attend(q, k, v, AttentionMask(n - 1, 1, n), SCALE)
    assert torch.equal(routed, full)  # every page read: the exact path, bit for bit
    # a top-k budget that covers the pages a span leaves over: the same
    cache = LayerKVCache(B, KVH, D, n + 8, torch.float32, "cpu")
    cache.router = Router(r, B, D, n + 8, torch.float32, "cpu")
    cache.router.force([[(16, 144)]] * B)  # 8 of the middle's 10 pages; top-k takes the 2 left
    assert torch.equal(_decode_last(cache, q, k, v, n), full)
    # window heads with everything marked full: every key, the exact path too
    q, k, v = _kv(n, seed=2)
    r = LayerRouting((WINDOW, WINDOW, FULL), window=32, sinks=4, page_tokens=PT)
    out = _decode_last(_cache(r, n, [[(0, n - 1)]] * B), q, k, v, n)
    assert torch.equal(out, attend(q, k, v, AttentionMask(n - 1, 1, n), SCALE))


def test_no_spans_change_nothing_bit_for_bit():
    n = 230
    q, k, v = _kv(n, seed=4)
    for r in (MIXED, ROUTED):
        base = _decode_last(_cache(r, n), q, k, v, n)
        lo, hi = r.middle(n - 1)
        for spans in (None, [[], []], [[(0, lo)], [(hi, n - 1)]]):  # none in the middle
            assert torch.equal(_decode_last(_cache(r, n, spans), q, k, v, n), base)


def test_routed_prefill_with_spans_equals_step_by_step_decode():
    n, spans = 160, [[(20, 44)], [(50, 58), (90, 96)]]
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, KVH, n, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, KVH, n, D, generator=g, dtype=torch.float64)
    kw = {"window": 24, "sinks": 3, "pages": 2, "page_tokens": 8}
    heads = (TOPK, WINDOW, FULL)
    whole = LayerKVCache(B, KVH, D, n + 8, torch.float64, "cpu")
    whole.router = Router(
        LayerRouting(heads, prefill=True, **kw), B, D, n + 8, torch.float64, "cpu"
    )
    whole.router.force(spans)
    got = whole.attend(q, k, v, AttentionMask(0, n, n), SCALE, None)
    step = LayerKVCache(B, KVH, D, n + 8, torch.float64, "cpu")
    step.router = Router(LayerRouting(heads, **kw), B, D, n + 8, torch.float64, "cpu")
    step.router.force(spans)
    rows = torch.cat(
        [
            step.attend(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1],
                        AttentionMask(i, 1, i + 1), SCALE, None)
            for i in range(n)
        ],
        2,
    )  # fmt: skip
    torch.testing.assert_close(got[:, :4], rows[:, :4], rtol=1e-10, atol=1e-10)
    unforced = LayerKVCache(B, KVH, D, n + 8, torch.float64, "cpu")
    unforced.router = Router(
        LayerRouting(heads, prefill=True, **kw), B, D, n + 8, torch.float64, "cpu"
    )
    plain = unforced.attend(q, k, v, AttentionMask(0, n, n), SCALE, None)
    assert not torch.allclose(plain[:, :4], got[:, :4])


def test_read_tokens_counts_forced_pages_outside_the_budget():
    r = LayerRouting((TOPK, WINDOW, FULL), window=64, sinks=16, pages=4, page_tokens=16)
    lo, hi = r.middle(999)
    mid = (hi - lo) // 16
    plain = 1000 - (hi - lo)
    assert r.read_tokens(999, 1000, 3) == (plain + 7 * 16) + (plain + 3 * 16) + 1000
    assert r.read_tokens(999, 1000, mid) == 3 * 1000  # all forced: every key, every head
    assert r.read_tokens(999, 1000, 0) == r.read_tokens(999, 1000)


def test_span_parsing_and_one_line_errors():
    assert parse_spans("0:200,-40:") == ((0, 200), (-40, None))
    assert parse_spans(":8") == ((0, 8),)
    assert resolve_spans(((0, 200), (-40, None), (-50, -45)), 300) == [
        (0, 200),
        (260, 300),
        (250, 255),
    ]
    assert span_pages([(5, 17), (40, 41)], 8) == [0, 1, 2, 5]
    assert SamplingParams(full_attention=[[0, 4]]).full_attention == ((0, 4),)
    bad_params = ([(5, 2)], [(1,)], [(0.5, 2)], [(True, 3)], [(-2, -4)], [5])
    for bad in bad_params:
        with pytest.raises(SamplingParamsError) as err:
            SamplingParams(full_attention=bad)
        assert "\n" not in str(err.value)
    for bad in ("3", "a:b", "1:2,x", "4:4"):
        with pytest.raises(ValueError) as err:
            parse_spans(bad)
        assert "\n" not in str(err.value)
    for span in ((0, 301), (-301, None), (299, -1), (300, None)):
        with pytest.raises(RequestError, match="outside the prompt of 300 tokens") as err:
            resolve_spans([span], 300)
        assert "\n" not in str(err.value)
    router = Router(ROUTED, B, D, 100, torch.float32, "cpu")
    with pytest.raises(ValueError, match="batch of 2"):
        router.force([[(0, 4)]])
    with pytest.raises(ValueError, match="outside the cache"):
        router.force([[(0, 4)], [(90, 101)]])


class _CharTokenizer:
    """One token per character (ids = code points), BOS first without characters."""

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        ids = [ord(c) for c in text]
        offs = [(i, i + 1) for i in range(len(text))]
        if add_special_tokens:
            ids, offs = [1, *ids], [(0, 0), *offs]
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = offs
        return out


class _Engine:
    tokenizer = _CharTokenizer()
    lock = threading.RLock()

    def encode(self, prompt, special=True):
        if isinstance(prompt, str):
            return self.tokenizer(prompt, special)["input_ids"]
        return list(prompt)


def test_prompt_parts_give_the_joined_tokens_and_the_full_parts_spans():
    parts = [("You are terse. ", "full"), ("a long document", "routed"), (" Q?", "full")]
    ids, params = encode_prompts(_Engine(), [parts], SamplingParams(), True)
    assert ids == [[1, *map(ord, "You are terse. a long document Q?")]]
    assert params.full_attention == ((1, 16), (31, 34))  # BOS belongs to no part
    shared = SamplingParams(full_attention=[(-2, None)])
    ids, plist = encode_prompts(_Engine(), [parts, "plain"], shared, False)
    assert ids[1] == list(map(ord, "plain"))
    assert plist[0].full_attention == ((-2, None), (0, 15), (30, 33)) and plist[1] is shared
    ids, same = encode_prompts(_Engine(), ["plain", [1, 2]], shared, True)
    assert same is shared and ids == [[1, *map(ord, "plain")], [1, 2]]
    assert part_spans([("", "full"), ("ab", "topk")], [(0, 1), (1, 2)]) == ()
    with pytest.raises(RequestError, match="mode"):
        part_spans([("ab", "dense")], [(0, 1), (1, 2)])


PROMPT = [(7 * i + 3) % 200 + 20 for i in range(150)]


@pytest.fixture(scope="module")
def gemma(hf_models, tmp_path_factory):
    _, path = hf_models("gemma3_text")
    return path, tmp_path_factory.mktemp("segments-cache")


def _llm(gemma, **kw) -> LLM:
    path, cache = gemma
    return LLM(path, device="cpu", cache_dir=cache, progress=False, max_context=256, **kw)


def test_generate_with_spans_through_the_api(gemma):
    greedy = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    with _llm(gemma) as llm:
        full = llm.generate(PROMPT, SamplingParams(**greedy))
    routing = {"attention": "topk:2,window:8,sinks:2", "attention_page_tokens": 4}
    with _llm(gemma, **routing) as llm:
        plain = llm.generate(PROMPT, SamplingParams(**greedy))
        none = llm.generate(PROMPT, SamplingParams(**greedy, full_attention=[(-2, None)]))
        every = llm.generate(PROMPT, SamplingParams(**greedy, full_attention=[(0, None)]))
        some = llm.generate(PROMPT, SamplingParams(**greedy, full_attention=[(20, 60)]))
        with pytest.raises(RequestError, match="outside the prompt of 150 tokens"):
            llm.generate(PROMPT, SamplingParams(**greedy, full_attention=[(100, 151)]))
    assert none.token_ids == plain.token_ids  # its page stays in the window: no change
    assert none.metrics.kv_read_fraction == plain.metrics.kv_read_fraction
    assert every.token_ids == full.token_ids and every.metrics.kv_read_fraction == 1.0
    f = some.metrics.kv_read_fraction
    assert plain.metrics.kv_read_fraction < f < 1.0  # 10 more pages read at every step


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["run", "hi", "--full-attention", "a:b"], "--full-attention"),
        (["run", "hi", "--full-attention", "5:2"], "--full-attention"),
        (["eval", "--passkey-full", "answer"], "--passkey-full"),
    ],
)
def test_cli_span_errors_are_one_line(args, flag):
    from typer.testing import CliRunner

    from ollm.cli import app

    res = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0]


def test_passkey_marks_a_part_full_with_the_same_tokens():
    """``run_passkey(full=...)`` asks with the prompt as parts, one marked full; encoded, the
    parts give the joined prompt's tokens and the marked part's token span."""
    from conftest import char_tokenizer
    from ollm.eval.passkey import run_passkey

    tok = char_tokenizer()
    asked = []

    class _Res:
        text = "12345"
        metrics = None

    class _LLM:
        tokenizer = tok

        def generate(self, prompt, params):
            asked.append(prompt)
            return _Res()

    for full in (None, "question", "facts"):
        run_passkey(_LLM(), [400], [0.5], variants=("single",), full=full)
    plain, question, facts = asked
    assert isinstance(plain, str) and "pass key" in plain
    for parts, name in ((question, "question"), (facts, "facts")):
        assert "".join(t for t, _ in parts) == plain
        (marked,) = [t for t, m in parts if m == "full"]
        assert (name == "facts") == ("The pass key is" in marked and "Remember" in marked)
        engine = _Engine()
        engine.tokenizer = tok
        ids, params = encode_prompts(engine, [parts], SamplingParams(), True)
        assert ids == [tok(plain)["input_ids"]]
        ((a, e),) = params.full_attention
        assert tok.decode(ids[0][a:e]) == marked
    with pytest.raises(ValueError, match="no passkey prompt part"):
        run_passkey(_LLM(), [400], [0.5], full="answer")
