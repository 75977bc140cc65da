"""Paged KV: block manager bookkeeping (kv/blocks.py) and the tensor pools (kv/paged.py).

The property test drives random append / trim / fork / free / swap / prefix-hit sequences through
both against a plain reference (a Python list of per-sequence K/V): gathered K/V always equal the
reference, every block's reference count equals the number of tables that hold it, and after
freeing everything every pool is empty again. K/V at position p is a function of the token prefix
``tokens[: p + 1]`` (as in a real model), which is what makes prefix sharing exact.
"""

from __future__ import annotations

import functools
import random
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from ollm.kv.blocks import BlockManager, BlockMove, BlockRef, OutOfBlocks, chain_keys
from ollm.kv.paged import PagedKVStore

B, LAYERS, HEADS, DIM = 4, 2, 2, 3


@functools.lru_cache(maxsize=1 << 16)
def kv_of(prefix: tuple[int, ...], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of the last token of ``prefix`` in ``layer``: a deterministic function of the prefix."""
    rng = random.Random(hash((prefix, layer)))
    vals = torch.tensor([rng.random() for _ in range(2 * HEADS * DIM)])
    k, v = vals.view(2, HEADS, DIM)
    return k, v


def ref_kv(tokens: list[int], layer: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference K/V [HEADS, hi - lo, DIM] of positions [lo, hi)."""
    pairs = [kv_of(tuple(tokens[: p + 1]), layer) for p in range(lo, hi)]
    if not pairs:
        return torch.empty(HEADS, 0, DIM), torch.empty(HEADS, 0, DIM)
    return torch.stack([k for k, _ in pairs], 1), torch.stack([v for _, v in pairs], 1)


class _Seq:
    def __init__(self, table, tokens):
        self.table, self.tokens, self.swapped, self.last_append = table, tokens, False, 0


class PagedMachine(RuleBasedStateMachine):
    """Random operations on one KV group against the reference."""

    window: int | None = None
    pools = {"gpu": 9, "cpu": 10}
    alloc, swap_tier = ("gpu",), "cpu"
    devices: dict[str, str] = {}

    def __init__(self) -> None:
        super().__init__()
        self.mgr = BlockManager(B, self.pools, self.alloc, self.swap_tier, self.window)
        devices = {t: self.devices.get(t, "cpu") for t in self.pools}
        self.store = PagedKVStore(LAYERS, self.pools, HEADS, B, DIM, torch.float32, devices)
        self.live: list[_Seq] = []

    seqs = Bundle("seqs")

    def _write(self, seq: _Seq, start: int) -> None:
        for layer in range(LAYERS):
            k, v = ref_kv(seq.tokens, layer, start, len(seq.tokens))
            self.store.write(layer, seq.table, start, k, v)
        self.mgr.register(seq.table, chain_keys(seq.tokens, B))

    @rule(target=seqs, prompt=st.lists(st.integers(0, 1), min_size=1, max_size=14))
    def new_seq(self, prompt):
        keys = chain_keys(prompt, B)
        n = self.mgr.match_prefix(keys, (len(prompt) - 1) // B)
        table = self.mgr.new_table()
        free, revived = self.mgr.num_free(), self.mgr.revived_blocks(keys, n)
        self.mgr.adopt_prefix(table, keys, n)
        assert self.mgr.num_free() == free - revived
        seq = _Seq(table, list(prompt))
        if not self.mgr.can_append(table, len(prompt) - n * B):
            self.mgr.free(table)
            return seq  # not live: later rules skip it
        self.store.copy_blocks(self.mgr.append(table, len(prompt) - n * B))
        self._write(seq, n * B)
        seq.last_append = len(prompt) - n * B
        self.live.append(seq)
        return seq

    @rule(seq=seqs, extra=st.lists(st.integers(0, 1), min_size=1, max_size=6))
    def append(self, seq, extra):
        if seq not in self.live or seq.swapped:
            return
        before = (list(seq.table.blocks), seq.table.length, self.mgr.usage())
        try:
            moves = self.mgr.append(seq.table, len(extra))
        except OutOfBlocks:
            assert (list(seq.table.blocks), seq.table.length, self.mgr.usage()) == before
            return
        self.store.copy_blocks(moves)
        start = len(seq.tokens)
        seq.tokens += extra
        seq.last_append = len(extra)
        self._write(seq, start)

    @rule(seq=seqs, data=st.data())
    def trim(self, seq, data):
        if seq not in self.live or seq.swapped:
            return
        limit = seq.last_append if self.window else seq.table.length
        n = data.draw(st.integers(0, limit))
        self.mgr.trim(seq.table, n)
        del seq.tokens[len(seq.tokens) - n :]
        seq.last_append -= min(n, seq.last_append)

    @rule(target=seqs, seq=seqs)
    def fork(self, seq):
        if seq not in self.live or seq.swapped:
            return seq
        child = _Seq(self.mgr.fork(seq.table), list(seq.tokens))
        child.last_append = seq.last_append
        self.live.append(child)
        return child

    @rule(seq=seqs)
    def free(self, seq):
        if seq in self.live:
            self.mgr.free(seq.table)
            self.live.remove(seq)

    @rule(seq=seqs)
    def swap(self, seq):
        if seq not in self.live:
            return
        if seq.swapped:
            if self.mgr.swap_in_blocks(seq.table) <= self.mgr.num_free():
                self.store.copy_blocks(self.mgr.swap_in(seq.table))
                seq.swapped = False
        elif self.mgr.swap_out_blocks(seq.table) <= self.mgr.num_free([self.swap_tier]):
            self.store.copy_blocks(self.mgr.swap_out(seq.table))
            seq.swapped = True

    @invariant()
    def kv_matches_reference(self):
        for seq in self.live:
            t = seq.table
            assert t.length == len(seq.tokens)
            for layer in range(LAYERS):
                k, v = self.store.gather(layer, t, device="cpu")
                rk, rv = ref_kv(seq.tokens, layer, t.start_token, t.length)
                torch.testing.assert_close(k, rk, rtol=0, atol=0)
                torch.testing.assert_close(v, rv, rtol=0, atol=0)

    @invariant()
    def refcounts_match_tables(self):
        held = Counter(r for s in self.live for r in s.table.blocks if r is not None)
        for tier, pool in self.mgr.pools.items():
            for b in range(pool.num_blocks):
                assert pool.ref(b) == held[BlockRef(tier, b)]
            assert pool.num_used == sum(1 for r in held if r.tier == tier)
        if self.window is not None:
            for s in self.live:  # a window holds no block a later query cannot see
                assert s.table.start_token <= max(
                    0, s.table.length - s.last_append - self.window + 1
                )

    def teardown(self):
        for seq in self.live:
            self.mgr.free(seq.table)
        assert all(used == 0 for used, _ in self.mgr.usage().values())
        for tier, pool in self.mgr.pools.items():
            assert pool.num_free == pool.num_blocks, tier


class WindowedMachine(PagedMachine):
    window = 6


class TieredMachine(PagedMachine):
    """Tables spanning two allocation tiers (device first, then RAM), swapped to a third."""

    pools = {"gpu": 3, "cpu": 6, "disk": 10}
    alloc, swap_tier = ("gpu", "cpu"), "disk"


_settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)
)
TestPaged = PagedMachine.TestCase
TestPaged.settings = _settings
TestPagedWindowed = WindowedMachine.TestCase
TestPagedWindowed.settings = _settings
TestPagedTiered = TieredMachine.TestCase
TestPagedTiered.settings = _settings


class CudaMachine(TieredMachine):
    """The device tier really on the GPU: cross-device writes, gathers, swaps."""

    devices = {"gpu": "cuda"}


TestPagedCuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(
    CudaMachine.TestCase
)
TestPagedCuda.settings = _settings


# -- targeted cases -------------------------------------------------------------------------


def test_fork_copies_the_shared_partial_block_on_write():
    mgr = BlockManager(B, {"gpu": 4})
    a = mgr.new_table()
    mgr.append(a, 6)  # one full block, one with 2 of 4 slots
    b = mgr.fork(a)
    assert mgr.usage()["gpu"] == (2, 2)
    moves = mgr.append(b, 1)
    assert moves == [BlockMove("gpu", a.blocks[1].block, "gpu", b.blocks[1].block)]
    assert a.blocks[0] == b.blocks[0] and a.blocks[1] != b.blocks[1]
    assert mgr.append(a, 1) == []  # now exclusively owned again: written in place
    mgr.free(a)
    mgr.free(b)
    assert mgr.usage()["gpu"] == (0, 4)


def test_failed_append_changes_nothing():
    mgr = BlockManager(B, {"gpu": 2})
    t = mgr.new_table()
    mgr.append(t, 7)
    with pytest.raises(OutOfBlocks):
        mgr.append(t, 2)
    assert t.length == 7 and len(t.blocks) == 2 and mgr.usage()["gpu"] == (2, 0)


def test_prefix_hit_reuses_blocks_and_counts_saved_tokens():
    mgr = BlockManager(B, {"gpu": 8})
    prompt = list(range(11))
    a = mgr.new_table()
    mgr.append(a, len(prompt))
    mgr.register(a, chain_keys(prompt, B))
    mgr.free(a)  # the two full blocks stay cached
    assert mgr.usage()["gpu"] == (0, 8) and mgr.pools["gpu"].num_cached == 2
    other = prompt[:8] + [99, 98]
    keys = chain_keys(other, B)
    assert mgr.match_prefix(keys, (len(other) - 1) // B) == 2
    assert mgr.match_prefix(chain_keys([1, *prompt[1:]], B), 2) == 0  # chained: block 0 differs
    b = mgr.new_table()
    mgr.adopt_prefix(b, keys, 2)
    assert (mgr.prefix_hits, mgr.prefix_saved_tokens, b.length) == (1, 8, 8)
    assert mgr.pools["gpu"].num_cached == 0 and mgr.usage()["gpu"] == (2, 6)


def test_cached_blocks_are_evicted_least_recently_used_tail_first():
    mgr = BlockManager(B, {"gpu": 3})
    t = mgr.new_table()
    toks = list(range(12))
    mgr.append(t, 12)
    mgr.register(t, chain_keys(toks, B))
    mgr.free(t)
    keys = chain_keys(toks, B)
    fresh = mgr.new_table()
    mgr.append(fresh, 1)  # evicts the tail block first, so the head of the prefix survives
    assert mgr.match_prefix(keys, 3) == 2


def test_window_releases_blocks_and_refuses_deep_trim():
    mgr = BlockManager(B, {"gpu": 4}, window=5)
    t = mgr.new_table()
    for _ in range(40):  # 40 tokens in a 4-block pool: the window recycles
        mgr.append(t, 1)
    assert t.length == 40 and mgr.usage()["gpu"][0] <= 3
    assert t.start_token <= 40 - 5 + 1 - 1
    mgr.trim(t, 1)
    ref, off = t.slot(38)
    assert (ref, off) == (t.blocks[9], 2)
    for pos in (-1, 39, t.start_token - 1):  # outside, past the end, released by the window
        with pytest.raises(IndexError):
            t.slot(pos)
    with pytest.raises(ValueError, match="window"):
        mgr.trim(t, 8)


def test_chain_keys_extend_incrementally():
    toks = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    assert chain_keys(toks, 3, chain_keys(toks[:4], 3)) == chain_keys(toks, 3)
    assert len(set(chain_keys([7] * 9, 3))) == 3  # same tokens, different prefixes


def test_file_backed_tier_round_trips(tmp_path):
    mgr = BlockManager(B, {"gpu": 2, "disk": 3}, alloc_tiers=("gpu",), swap_tier="disk")
    store = PagedKVStore(
        1,
        {"gpu": 2, "disk": 3},
        HEADS,
        B,
        DIM,
        torch.float32,
        {"gpu": "cpu"},
        files={"disk": tmp_path / "kv.bin"},
    )
    t = mgr.new_table()
    mgr.append(t, 7)
    k, v = torch.randn(HEADS, 7, DIM), torch.randn(HEADS, 7, DIM)
    store.write(0, t, 0, k, v)
    store.copy_blocks(mgr.swap_out(t))
    assert {r.tier for r in t.blocks} == {"disk"}
    got_k, got_v = store.gather(0, t)
    torch.testing.assert_close(got_k, k)
    torch.testing.assert_close(got_v, v)
    assert (tmp_path / "kv.bin").stat().st_size == store.pools["disk"].numel() * 4


def test_gather_a_prefix_across_tiers_onto_one_device():
    mgr = BlockManager(B, {"gpu": 1, "cpu": 3}, alloc_tiers=("gpu", "cpu"))
    store = PagedKVStore(
        2, {"gpu": 1, "cpu": 3}, HEADS, B, DIM, torch.float32, {"gpu": "cpu", "cpu": "cpu"}
    )
    t = mgr.new_table()
    mgr.append(t, 10)
    assert [r.tier for r in t.blocks] == ["gpu", "cpu", "cpu"]  # device first, then RAM
    k, v = torch.randn(HEADS, 10, DIM), torch.randn(HEADS, 10, DIM)
    store.write(1, t, 0, k[:, :3], v[:, :3])
    store.write(1, t, 3, k[:, 3:], v[:, 3:])  # a write that straddles blocks and tiers
    got_k, got_v = store.gather(1, t, upto=7, device="cpu")
    torch.testing.assert_close(got_k, k[:, :7])
    torch.testing.assert_close(got_v, v[:, :7])
    with pytest.raises(IndexError):
        store.write(1, t, 8, k[:, :3], v[:, :3])  # past the appended length


def test_batched_block_copies_equal_one_by_one():
    rng = random.Random(7)
    tiers = {"gpu": 4, "cpu": 4}
    a = PagedKVStore(1, tiers, 1, 2, 2, torch.float32, {"gpu": "cpu", "cpu": "cpu"})
    b = PagedKVStore(1, tiers, 1, 2, 2, torch.float32, {"gpu": "cpu", "cpu": "cpu"})
    for _ in range(60):  # short move lists, compared each time: later moves would hide errors
        for t in tiers:
            a.pools[t].copy_(torch.randn(a.pools[t].shape))
            b.pools[t].copy_(a.pools[t])
        pairs = [("gpu", "gpu"), ("gpu", "cpu"), ("cpu", "gpu"), ("cpu", "cpu")]
        moves = [
            BlockMove(src, rng.randrange(4), dst, rng.randrange(4))
            for src, dst in (
                rng.choice(pairs[: rng.randint(1, 4)]) for _ in range(rng.randint(1, 6))
            )
        ]
        a.copy_blocks(moves)
        for m in moves:  # the reference: strictly one after another
            src = b.pools[m.src_tier][:, :, :, m.src_block].clone()  # [layers, 2, heads, ...]
            b.pools[m.dst_tier][:, :, :, m.dst_block] = src
        for t in tiers:
            torch.testing.assert_close(a.pools[t], b.pools[t], rtol=0, atol=0)


@settings(max_examples=200, deadline=None)
@given(
    cached=st.lists(st.booleans(), min_size=1, max_size=12),
    window=st.one_of(st.none(), st.integers(1, 14)),
    limit=st.integers(0, 12),
)
def test_match_prefix_is_the_longest_adoptable_prefix(cached, window, limit):
    """``match_prefix`` (one pass over run lengths) equals the brute-force largest ``n`` with
    ``can_adopt``, for any pattern of cached and evicted blocks."""
    mgr = BlockManager(B, {"gpu": 16}, window=window)
    tokens = list(range(len(cached) * B))
    keys = chain_keys(tokens, B)
    for j, c in enumerate(cached):
        if c:  # a cached block: written once under its key, then left unreferenced
            t = mgr.new_table()
            mgr.append(t, B)
            mgr.pools["gpu"].register(t.blocks[0].block, keys[j])
            mgr.free(t)
    brute = max(n for n in range(min(limit, len(keys)) + 1) if mgr.can_adopt(keys, n))
    assert mgr.match_prefix(keys, limit) == brute
