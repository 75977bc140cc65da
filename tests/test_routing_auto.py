"""``--attention auto`` at a context other than the calibration's (issue 18): a top-k choice
keeps its share of the competing pages (the middle between sinks and window), never fewer
pages than calibrated; calibration files of version 1 (no ``middle_pages``) read as calibrated
at their recorded length. Pure: a fake spec and a calibration file in a temporary directory."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from ollm.engine.routing_calibration import (
    CANDIDATE_PAGES,
    _shares,
    middle_pages,
    plan_routing,
    pruning_row,
    save_calibration,
    scaled_pages,
)
from ollm.layers.routing import FULL, TOPK, WINDOW, LayerRouting

# Gemma 3 270M's shape: sliding-window layers, full-attention layers 5, 11, 17, 1 KV head.
SPEC = SimpleNamespace(
    num_layers=18,
    num_kv_heads=1,
    layers=[SimpleNamespace(window=None if i % 6 == 5 else 512) for i in range(18)],
)
CHOICE = [["topk:32"] if i == 5 else ["topk:16"] if i == 11 else ["window"] if i == 17 else None
          for i in range(18)]  # fmt: skip


def _v1(tokens: int = 4096, page_tokens: int = 32) -> dict:
    """A calibration as version 1 wrote it (no middle_pages, no share)."""
    return {
        "version": 1, "model_type": "gemma3_text", "layers": 18, "kv_heads": 1,
        "tokens": tokens, "window": 256, "sinks": 64, "page_tokens": page_tokens,
        "threshold": 0.02, "text": "stdlib", "choice": CHOICE,
        "deviation": [None if c is None else {"window": [0.1]} for c in CHOICE],
    }  # fmt: skip


def _pages(store, context, page_tokens=32, attention="auto") -> list[tuple[tuple, int]]:
    routing = plan_routing(attention, SPEC, store, page_tokens, context=context)
    return [(r.heads, r.pages) for r in routing if r is not None]


def test_middle_pages_are_the_pages_a_decode_step_chooses_among():
    for tokens, window, sinks, page in [(4096, 256, 64, 32), (8192, 256, 64, 32), (96, 8, 2, 4)]:
        r = LayerRouting((TOPK,), window, sinks, 1, page)
        lo, hi = r.middle(tokens - 1)
        assert middle_pages(tokens, window, sinks, page) == (hi - lo) // page
        # the step reads sinks + window + one page: the middle less one page is skipped
        skipped = tokens - r.read_tokens(tokens - 1, tokens)
        assert skipped == (middle_pages(tokens, window, sinks, page) - 1) * page
    assert middle_pages(300, 256, 64, 32) == 0  # nothing between sinks and window yet


@pytest.mark.parametrize("pages,calibrated,context", [(32, 118, 246), (16, 118, 246), (4, 7, 9)])
def test_scaled_pages_keep_the_calibrated_share(pages, calibrated, context):
    k = scaled_pages(pages, calibrated, context)
    assert k == math.ceil(pages * context / calibrated)
    assert k / context >= pages / calibrated > (k - 1) / context  # the least k of that share


def test_scaled_pages_never_fewer_than_calibrated():
    assert scaled_pages(32, 118, None) == 32
    assert scaled_pages(32, 118, 50) == 32  # a shorter context keeps the calibrated count
    assert scaled_pages(32, 118, 118) == 32
    assert scaled_pages(32, 0, 246) == 32  # a degenerate calibration: no share to keep
    ks = [scaled_pages(16, 118, m) for m in range(0, 2000, 37)]
    assert ks == sorted(ks) and min(ks) == 16  # monotone in the context


def test_old_calibration_file_reads_as_calibrated_at_its_length(tmp_path):
    save_calibration(tmp_path, _v1())
    m4k, m8k = middle_pages(4096, 256, 64, 32), middle_pages(8192, 256, 64, 32)
    assert _pages(tmp_path, None) == [((TOPK,), 32), ((TOPK,), 16), ((WINDOW,), 16)]
    assert _pages(tmp_path, 4096) == _pages(tmp_path, None)  # at its own length: as saved
    got = _pages(tmp_path, 8192)
    assert got[:2] == [((TOPK,), -(-32 * m8k // m4k)), ((TOPK,), -(-16 * m8k // m4k))]
    assert got[:2] == [((TOPK,), 67), ((TOPK,), 34)]  # 118 -> 246 competing pages
    assert got[2] == ((WINDOW,), 16)  # a window head reads no pages: nothing to scale
    # calibrated at 8k, the same choice at 8k is taken as it is
    save_calibration(tmp_path, _v1(tokens=8192))
    assert _pages(tmp_path, 8192)[:2] == [((TOPK,), 32), ((TOPK,), 16)]


def test_new_file_fields_agree_with_the_old_reading(tmp_path):
    old = _v1()
    save_calibration(tmp_path, old)
    before = _pages(tmp_path, 16384)
    middle = middle_pages(4096, 256, 64, 32)
    dev = {"window": [0.1], "topk:16": [0.01], "topk:32": [0.005]}  # per KV head
    new = {**old, "version": 2, "middle_pages": middle,
           "deviation": [None if c is None else dev for c in CHOICE]}  # fmt: skip
    new["share"] = [_shares(c, d, middle) for c, d in zip(CHOICE, new["deviation"], strict=True)]
    save_calibration(tmp_path, new)
    assert _pages(tmp_path, 16384) == before
    assert new["share"][5] == [{"pages": 32, "share": round(32 / middle, 6), "deviation": 0.005}]
    assert new["share"][17] == [None] and new["share"][0] is None
    json.dumps(new)  # plain JSON


def test_page_size_of_the_run_and_explicit_pages(tmp_path):
    save_calibration(tmp_path, _v1())
    # pages of 16 slots: the calibrated 32 x 32 slots are 64 pages, the share the same in slots
    k16 = _pages(tmp_path, 8192, page_tokens=16)[0][1]
    k32 = _pages(tmp_path, 8192)[0][1]
    assert abs(k16 * 16 - k32 * 32) <= 32
    assert k16 >= 64
    # auto,topk:P: the given budget, not scaled
    assert _pages(tmp_path, 8192, attention="auto,topk:8") == [
        ((TOPK,), 8),
        ((TOPK,), 8),
        ((WINDOW,), 8),
    ]
    assert FULL not in {h for heads, _ in _pages(tmp_path, 8192) for h in heads}


@pytest.mark.parametrize("window,sinks,page", [(256, 64, 32), (8, 2, 4), (100, 0, 16)])
def test_calibration_measures_from_the_row_where_every_candidate_prunes(window, sinks, page):
    row = pruning_row(1 << 20, window, sinks, page)
    k = max(CANDIDATE_PAGES)
    # the row at slot `row` sees keys [0, row + 1): the first with more than k competing pages
    assert middle_pages(row + 1, window, sinks, page) > k >= middle_pages(row, window, sinks, page)
    assert pruning_row(row, window, sinks, page) == 0  # too short: every row, as in version 1
    assert pruning_row(row + 1, window, sinks, page) == row
