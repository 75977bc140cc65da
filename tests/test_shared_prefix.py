"""Decode batches whose sequences share leading blocks (a cached prompt prefix) attend the prefix
once for all their queries (``kv/shared_prefix.py``): exact against float64 attention of each
sequence over its own keys (windows and sinks included, the prefix as views or gathered pieces),
found only where blocks are really shared, and the batch engine gives each prompt's tokens
alone through it."""

from __future__ import annotations

import types

import pytest
import torch

from ollm.kv import decode_batch, shared_prefix
from ollm.kv.packed import PackedLayerKV, SeqRows, _decode_batches
from ollm.kv.paged import PagedKVStore
from ollm.layers.attention import AttentionMask
from test_batch_engine import GREEDY, alone, engine, llms  # noqa: F401 - llms is a fixture
from test_hostsplit import BT, KVH, D, H, _reference

BLOCKS = 64
PREFIX = 6  # shared blocks (24 tokens)


def _batch(scatter: bool, seed: int = 0):
    """A store with random K/V and one decode batch: 5 sequences holding the same ``PREFIX``
    blocks (consecutive ids, or ``scatter``ed over the pool) and then 1-3 blocks of their own;
    plus one sequence sharing nothing."""
    g = torch.Generator().manual_seed(seed)
    store = PagedKVStore(1, {"device": BLOCKS}, KVH, BT, D, torch.float32, {"device": "cpu"})
    store.pools["device"].copy_(torch.randn(store.pools["device"].shape, generator=g))
    order = torch.randperm(BLOCKS, generator=g).tolist() if scatter else list(range(BLOCKS))
    prefix, free = order[:PREFIX], order[PREFIX:]
    starts = [PREFIX * BT + 1, PREFIX * BT + 9, PREFIX * BT + 4, PREFIX * BT + 11, PREFIX * BT]
    ids = [prefix + [free.pop() for _ in range(-(-(s + 1) // BT) - PREFIX)] for s in starts]
    starts.append(13)  # its own blocks only
    ids.append([free.pop() for _ in range(4)])
    seqs = [
        SeqRows(i, 1, s, 0, torch.tensor(b, dtype=torch.long), ids=tuple(b))
        for i, (s, b) in enumerate(zip(starts, ids, strict=True))
    ]
    return store, seqs, torch.randn(len(seqs), H, 1, D, generator=g)


def _layer(store: PagedKVStore):
    """The attributes of a `PackedLayerKV` that ``attend_shared`` reads."""
    layer = types.SimpleNamespace(pool=store.pools["device"][0], store=store)
    layer._gather_rows = lambda i, d: PackedLayerKV._gather_rows(layer, i, d)
    return layer


@pytest.mark.parametrize("scatter", [False, True])
@pytest.mark.parametrize("window,sinks", [(None, False), (10, False), (None, True), (17, True)])
def test_shared_prefix_attention_is_exact(scatter, window, sinks):
    store, seqs, q = _batch(scatter)
    batches = _decode_batches(seqs, store, torch.device("cpu"))
    (d,) = [b for b in batches if b.shared]
    assert d.shared == PREFIX and len(d.seqs) == 5  # the sequence sharing nothing is not in it
    sink = torch.randn(H) if sinks else None
    mask = AttentionMask(0, 1, 1, None, window, sink)
    rows = torch.tensor([s.row0 for s in d.seqs])
    got = shared_prefix.attend_shared(_layer(store), d, q[rows], mask, 0.35)
    want = _reference(store, d, q[rows], window, sink, 0.35)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_fragmented_prefix_is_gathered_in_pieces(monkeypatch):
    """A prefix in many runs is gathered in pieces of at most GATHER_BYTES, same result."""
    store, seqs, q = _batch(scatter=True, seed=1)
    (d,) = [b for b in _decode_batches(seqs, store, torch.device("cpu")) if b.shared]
    piece = 2 * KVH * BT * D * 4 * 2  # two blocks of K and V
    monkeypatch.setattr(shared_prefix, "MAX_RUNS", 0)
    monkeypatch.setattr(decode_batch, "GATHER_BYTES", piece)
    layer, rows = _layer(store), torch.tensor([s.row0 for s in d.seqs])
    parts = list(shared_prefix.prefix_parts(layer.pool, d.shared_ids, BT, q, None, d))
    assert len(parts) == PREFIX // 2 and all(k.shape[2] == 2 * BT for k, _, _ in parts)
    mask = AttentionMask(0, 1, 1)
    got = shared_prefix.attend_shared(layer, d, q[rows], mask, 0.35)
    want = _reference(store, d, q[rows], None, None, 0.35)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_only_really_shared_blocks_count():
    """Same first block but diverging later: the common part only; a sequence whose new token
    sits in the last common block keeps it as its own; fewer than SHARED_MIN_BLOCKS: none."""
    bt = 4
    a = (0, 1, 0, 0, (5, 6, 7, 8, 9), None)  # (row0, rows, start, key0, ids, tree)
    b = (1, 1, 17, 0, (5, 6, 7, 20, 21), None)
    assert decode_batch.shared_blocks([a, b], bt) == 0  # a's new token is in block 0
    a = (0, 1, 19, 0, (5, 6, 7, 8, 9), None)
    assert decode_batch.shared_blocks([a, b], bt) == 3
    c = (2, 1, 11, 0, (5, 6, 7), None)  # needs 3 blocks: shares at most 2 of its own
    assert decode_batch.shared_blocks([a, b, c], bt) == 2
    d = (3, 1, 19, 4, (6, 7, 8, 9, 10), None)  # another first slot
    assert decode_batch.shared_blocks([a, d], bt) == 0


def after_first(llm, prompts):
    """A batch engine that prefilled ``prompts[0]`` alone (its blocks cached) before the others
    arrived, run to the end: (the engine, the requests' ids in order)."""
    eng = engine(llm)
    ids = [eng.add(prompts[0], GREEDY)]
    eng.step()
    ids += [eng.add(p, GREEDY) for p in prompts[1:]]
    eng.run()
    return eng, ids


def test_engine_attends_shared_prefixes_once(llms, monkeypatch):  # noqa: F811
    """Six prompts over one 40-token prefix (the first prefilled before the others arrive) and
    two sharing nothing, in one batch: decode steps attend the prefix once per batch, and every
    prompt gives its tokens alone."""
    llm = llms("llama")
    g = torch.Generator().manual_seed(5)
    head = torch.randint(0, 256, (40,), generator=g).tolist()
    prompts = [head + torch.randint(0, 256, (2 + 3 * i,), generator=g).tolist() for i in range(6)]
    prompts += [torch.randint(0, 256, (9 + i,), generator=g).tolist() for i in range(2)]
    want = alone(llm, prompts)
    calls = []
    real = shared_prefix.attend_shared
    monkeypatch.setattr(
        shared_prefix,
        "attend_shared",
        lambda layer, d, *a: calls.append(len(d.seqs)) or real(layer, d, *a),
    )
    eng, ids = after_first(llm, prompts)
    assert [eng.finished[r].token_ids for r in ids] == want
    assert calls and max(calls) >= 5
    assert eng.metrics().prefix_hits >= 5 and eng.kv_blocks_used() == 0
    eng.close()


def test_copy_by_runs_equals_the_gather():
    """A sequence's blocks copied run by run (a shared prefix's run, then its own blocks) give
    the gathered K/V, cut at its length."""
    from ollm.kv.run_copy import block_runs, copy_runs

    pool = torch.randn(KVH, BLOCKS, BT, D)
    ids = (7, 8, 9, 10, 30, 31, 2)
    runs = block_runs(ids)
    assert runs == [(0, 7, 4), (4, 30, 2), (6, 2, 1)]
    assert block_runs(ids, 5) == [(5, 31, 1), (6, 2, 1)]
    n = len(ids) * BT - 3
    got = copy_runs(pool, runs, n, torch.device("cpu"))
    want = pool[:, list(ids)].reshape(KVH, -1, D)[:, :n].unsqueeze(0)
    assert torch.equal(got, want)
