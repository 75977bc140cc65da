"""Query rows of a packed step over a shared prefix (``kv/shared_prefill.py``): the prefix
attended once for every row of the group, each sequence's own blocks after it, exact against
float64 attention of each sequence over its gathered keys (sinks included, the prefix as a view
or gathered pieces, own batches cut by rows and by bytes); groups only where blocks are really
shared; the batch engine gives each prompt's tokens alone through it."""

from __future__ import annotations

import math
import types

import pytest
import torch

from ollm.kv import decode_batch, shared_prefill, shared_prefix
from ollm.kv.packed import GroupLayout, PackedLayerKV, SeqRows
from ollm.kv.paged import PagedKVStore
from test_batch_engine import alone, llms  # noqa: F401 - llms is a fixture
from test_shared_prefix import after_first

KVH, BT, D, H = 2, 4, 8, 4
BLOCKS = 64
PREFIX = 6  # shared blocks (24 tokens)
TAILS = [(1, 0), (3, 0), (5, 2), (12, 1), (2, 3)]  # (query rows, own tokens before them)


def _step(scatter: bool, seed: int = 0):
    """A store with random K/V (the step's rows already written) and a step's layout: five
    sequences over the same ``PREFIX`` blocks (consecutive ids, or ``scatter``ed) computing
    ``TAILS`` rows after their own earlier tokens, one sharing nothing; and the queries."""
    g = torch.Generator().manual_seed(seed)
    store = PagedKVStore(1, {"device": BLOCKS}, KVH, BT, D, torch.float32, {"device": "cpu"})
    store.pools["device"].copy_(torch.randn(store.pools["device"].shape, generator=g))
    order = torch.randperm(BLOCKS, generator=g).tolist() if scatter else list(range(BLOCKS))
    prefix, free = order[:PREFIX], order[PREFIX:]
    seqs, row = [], 0
    for n, before in TAILS + [(4, 9)]:
        start = PREFIX * BT + before if len(seqs) < len(TAILS) else before
        own = -(-(start + n) // BT) - (PREFIX if len(seqs) < len(TAILS) else 0)
        ids = (prefix if len(seqs) < len(TAILS) else []) + [free.pop() for _ in range(own)]
        seqs.append(SeqRows(row, n, start, 0, torch.tensor(ids), ids=tuple(ids)))
        row += n
    lay = GroupLayout(torch.empty(0), torch.empty(0), tuple(seqs), (), tuple(seqs))
    lay = shared_prefill.with_prefills(lay, store, torch.device("cpu"))
    return store, lay, torch.randn(1, H, row, D, generator=g)


def _layer(store: PagedKVStore):
    """The attributes of a `PackedLayerKV` that ``attend_group`` reads."""
    layer = types.SimpleNamespace(pool=store.pools["device"][0], store=store)
    layer._gather_rows = lambda i, d: PackedLayerKV._gather_rows(layer, i, d)
    return layer


def _reference(store, s: SeqRows, q: torch.Tensor, sinks, scale: float) -> torch.Tensor:
    """float64 causal attention of ``s``'s query rows ``q`` [H, n, D] over its gathered keys."""
    pool = store.pools["device"][0].double()
    m = s.start + s.n - s.key0
    ids = list(s.ids[: -(-m // BT)])
    k = pool[0][:, ids].reshape(KVH, -1, D)[:, :m]
    v = pool[1][:, ids].reshape(KVH, -1, D)[:, :m]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(s.n):
        keep = torch.arange(m) <= s.start - s.key0 + i
        for h in range(H):
            logits = (k[h // (H // KVH)] @ q[h, i].double()) * scale
            logits = logits.masked_fill(~keep, -math.inf)
            vals = v[h // (H // KVH)]
            if sinks is not None:
                logits = torch.cat([logits, sinks[h : h + 1].double()])
                vals = torch.cat([vals, torch.zeros(1, D, dtype=torch.float64)])
            out[h, i] = torch.softmax(logits, 0) @ vals
    return out


def _check(store, lay, q, sinks=None):
    (g,) = lay.prefills
    out = torch.full_like(q, math.nan)
    mask = types.SimpleNamespace(window=None, sinks=sinks)
    shared_prefill.attend_group(_layer(store), g, q, out, 0, mask, 0.35)
    for s in g.seqs:
        got = out[0, :, s.row0 : s.row0 + s.n]
        want = _reference(store, s, q[0, :, s.row0 : s.row0 + s.n], sinks, 0.35)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    return g, out


@pytest.mark.parametrize("scatter", [False, True])
@pytest.mark.parametrize("sinks", [False, True])
def test_group_attention_is_exact(scatter, sinks):
    store, lay, q = _step(scatter)
    (g,) = lay.prefills
    assert g.shared == PREFIX and len(g.seqs) == len(TAILS)  # the one sharing nothing is not
    # rows 1..12 in one batch would pad 1-row queries to 12: cut where rows more than double
    assert sorted(len(b.seqs) for b in g.own) == [1, 2, 2]
    g, out = _check(store, lay, q, torch.randn(H) if sinks else None)
    alone = lay.seqs[-1]  # untouched: it is attended one by one
    assert out[0, :, alone.row0 : alone.row0 + alone.n].isnan().all()


def test_pieces_and_byte_cuts(monkeypatch):
    """A fragmented prefix gathered in pieces, and own batches cut by GATHER_BYTES: same."""
    monkeypatch.setattr(shared_prefix, "MAX_RUNS", 0)
    monkeypatch.setattr(decode_batch, "GATHER_BYTES", 2 * KVH * BT * D * 4 * 2)
    monkeypatch.setattr(shared_prefill, "GATHER_BYTES", 2 * KVH * BT * D * 4 * 3)
    store, lay, q = _step(scatter=True, seed=1)
    (g,) = lay.prefills
    assert len(g.own) == len(TAILS)  # by rows alone: 3 batches (test above); by bytes: 5
    _check(store, lay, q)


def test_groups_only_over_really_shared_blocks():
    """Sequences diverging before SHARED_MIN_BLOCKS, or whose queries start inside the common
    blocks, are not grouped over them; trees and decode batches' members never are."""
    ids = tuple(range(10))
    a = SeqRows(0, 3, 20, 0, torch.tensor(ids), ids=ids)
    b = SeqRows(3, 2, 9, 0, torch.tensor(ids[:3]), ids=ids[:3])  # its queries in block 2
    assert shared_prefill._common_blocks([a, b], BT) == 2
    c = SeqRows(5, 2, 21, 0, torch.tensor((0, 1, 7, 8, 9, 11)), ids=(0, 1, 7, 8, 9, 11))
    assert shared_prefill._common_blocks([a, c], BT) == 2
    d = SeqRows(7, 2, 21, 0, torch.tensor((0, 5, 7, 8, 9, 11)), ids=(0, 5, 7, 8, 9, 11))
    store = PagedKVStore(1, {"device": 16}, KVH, BT, D, torch.float32, {"device": "cpu"})
    lay = GroupLayout(torch.empty(0), torch.empty(0), (a, d), (), (a, d))
    assert shared_prefill.with_prefills(lay, store, torch.device("cpu")).prefills == ()


def group_sizes(monkeypatch) -> list[int]:
    """The members of every prefill group attended from now on (``attend_group`` wrapped)."""
    calls: list[int] = []
    real = shared_prefill.attend_group
    monkeypatch.setattr(
        shared_prefill,
        "attend_group",
        lambda layer, grp, *a: calls.append(len(grp.seqs)) or real(layer, grp, *a),
    )
    return calls


def test_engine_groups_tails_over_a_cached_prefix(llms, monkeypatch):  # noqa: F811
    """Five prompts over one 40-token prefix arrive after it was prefilled: their tails (and the
    first prompt's decode) are attended as one group in a step, and every prompt gives its
    tokens alone."""
    llm = llms("llama")
    g = torch.Generator().manual_seed(7)
    head = torch.randint(0, 256, (40,), generator=g).tolist()
    prompts = [head + torch.randint(0, 256, (2 + i,), generator=g).tolist() for i in range(6)]
    want = alone(llm, prompts)
    calls = group_sizes(monkeypatch)
    eng, ids = after_first(llm, prompts)
    assert [eng.finished[r].token_ids for r in ids] == want
    assert calls and max(calls) == 6  # the tails and the first prompt's decode row
    assert eng.metrics().prefix_hits >= 5 and eng.kv_blocks_used() == 0
    eng.close()
