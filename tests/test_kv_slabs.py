"""Sequences' blocks in runs (kv/slabs.py) and decode attention over strided views of a
head-major host pool (kv/strided.py): same bookkeeping as a plain pool, same tokens as a gather."""

from __future__ import annotations

import random

import pytest
import torch

from ollm.kv.blocks import BlockManager, BlockPool, OutOfBlocks
from ollm.kv.slabs import SlabPool
from ollm.kv.strided import row_mask, run_view, scatter_rows, strided_run


def test_sequences_get_runs_on_slabs():
    """Each new sequence starts on a free slab and grows block by block inside it; one that
    outgrows its slab continues from the free list."""
    m = BlockManager(4, {"d": SlabPool("d", 40, 10)})
    tables = [m.new_table() for _ in range(3)]
    for t in tables:
        m.append(t, 9)  # 3 blocks each
    for _ in range(20):  # decode: interleaved appends
        for t in tables:
            m.append(t, 1)
    for k, t in enumerate(tables):
        ids = [r.block for r in t.blocks]
        assert ids == list(range(10 * k, 10 * k + len(ids)))  # 29 tokens: 8 blocks, one run
    m.append(tables[0], 16)  # 45 tokens: 12 blocks, more than the slab's 10
    ids = [r.block for r in tables[0].blocks]
    assert ids[:10] == list(range(10)) and all(b >= 30 for b in ids[10:])
    m.free(tables[1])
    t = m.new_table()
    m.append(t, 1)
    assert t.blocks[0].block == 10  # the freed slab is reused first


def test_slab_pool_bookkeeping_matches_a_plain_pool():
    """Random appends, trims, forks, frees and prefix registrations: the slab pool's counts
    equal a plain pool's under the same operations, no block is held twice, and freeing all
    returns every block."""
    rng = random.Random(0)
    for seed in range(30):
        rng.seed(seed)
        a = BlockManager(4, {"d": SlabPool("d", 48, 8)})
        b = BlockManager(4, {"d": BlockPool("d", 48)})
        live: list[tuple] = []
        for _ in range(200):
            op = rng.random()
            if op < 0.3 or not live:
                live.append((a.new_table(), b.new_table()))
            elif op < 0.75:
                ta, tb = rng.choice(live)
                n = rng.randint(1, 9)
                try:
                    a.append(ta, n)
                except OutOfBlocks:
                    with pytest.raises(OutOfBlocks):
                        b.append(tb, n)
                    continue
                b.append(tb, n)
            elif op < 0.85:
                ta, tb = rng.choice(live)
                n = rng.randint(0, ta.length)
                a.trim(ta, n)
                b.trim(tb, n)
            elif op < 0.92:
                ta, tb = rng.choice(live)
                live.append((a.fork(ta), b.fork(tb)))
            else:
                ta, tb = live.pop(rng.randrange(len(live)))
                a.free(ta)
                b.free(tb)
            assert a.num_free() == b.num_free()
            held = [r.block for t, _ in live for r in t.blocks if r is not None]
            pool = a.pools["d"]
            assert all(pool.ref(x) > 0 for x in held)
        for ta, tb in live:
            a.free(ta)
            b.free(tb)
        assert a.num_free() == 48 == b.num_free()
        assert sorted(a.pools["d"]._held) == [0] * 6 and sorted(a.pools["d"]._refd) == [0] * 6


def test_cached_prefix_blocks_do_not_block_a_slab():
    """A slab holding only cached (unreferenced, keyed) blocks is taken by a fresh sequence
    when no slab is wholly free; the cached blocks it takes lose their keys."""
    pool = SlabPool("d", 8, 4)
    m = BlockManager(2, {"d": pool})
    tabs = [m.new_table(), m.new_table()]
    for t in tabs:
        m.append(t, 8)
    for b in range(8):
        pool.register(b, bytes([b]))
    for t in tabs:
        m.free(t)
    assert pool.num_cached == 8 and pool.num_free == 8
    t = m.new_table()
    m.append(t, 3)
    assert [r.block for r in t.blocks] == [0, 1]
    assert pool.lookup(bytes([0])) is None and pool.lookup(bytes([2])) == 2


def test_strided_run_needs_runs_on_one_grid():
    assert strided_run([(0, 1, 2), (10, 11)], [3, 2], 40) == strided_run(
        [(0, 1, 2), (10, 11)], [3, 2], 40
    )
    run = strided_run([(20, 21), (0, 1, 2), (10, 11)], [2, 3, 2], 40)
    assert (run.first, run.stride, run.num_rows, run.rows) == (0, 10, 3, (2, 0, 1))
    assert strided_run([(0, 2), (10, 11)], [2, 2], 40) is None  # not consecutive
    assert strided_run([(0, 1), (0, 1)], [2, 2], 40) is None  # one first block
    assert strided_run([(0, 1), (30, 31)], [2, 2], 40) is not None  # rows 0 and 1 at stride 30
    assert strided_run([(0, 1), (10, 11), (35, 36)], [2, 2, 2], 40) is None  # 8 rows for 3
    assert strided_run([(0, 1), (38, 39)], [2, 2], 39) is None  # past the pool
    assert strided_run([(0, 1, 9), (10, 11)], [2, 2], 40) is not None  # only needed blocks


def test_strided_views_equal_the_gathered_kv():
    """Attention inputs from the view equal a gather of each sequence's blocks; queries and
    masks land on their sequences' rows."""
    g = torch.Generator().manual_seed(0)
    kvh, blocks, bt, d = 2, 40, 4, 8
    pool = torch.randn(2, kvh, blocks, bt, d, generator=g)
    ids = [tuple(range(20, 23)), tuple(range(0, 3)), tuple(range(30, 32))]  # rows 2, 0, 3
    run = strided_run(ids, [3, 3, 2], blocks)
    k, v = run_view(pool, run, 3)
    for j, held in enumerate(ids):
        row = run.rows[j]
        want = pool[0][:, list(held)].reshape(kvh, -1, d)
        torch.testing.assert_close(k[row, :, : want.shape[1]], want, rtol=0, atol=0)
        want_v = pool[1][:, list(held)].reshape(kvh, -1, d)
        torch.testing.assert_close(v[row, :, : want_v.shape[1]], want_v, rtol=0, atol=0)
    index = torch.tensor(run.rows)
    q = torch.randn(3, 4, 1, d, generator=g)
    full = scatter_rows(q, run, index)
    torch.testing.assert_close(full.index_select(0, index), q)
    assert run.num_rows == 4 and full.shape[0] == 4 and full[1].abs().sum() == 0
    keep = torch.zeros(3, 1, 1, 12, dtype=torch.bool)
    assert row_mask(keep, run, index).sum() == 12  # the one unused row sees every key
