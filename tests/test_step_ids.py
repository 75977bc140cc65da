"""What the batch engine keeps from one decode step to the next to cut its host time (issue 13):
held block ids memoised per table (`kv.step_ids.HeldMemo`) equal the ones derived afresh after
random joins, leaves, appends, trims, forks, prefix adoptions and swaps; a step's layout made
with the engine's memo equals the one made without; the CPU's two-pass greedy argmax picks
what ``torch.argmax`` picks."""

from __future__ import annotations

import random

import pytest
import torch

from ollm import SamplingParams
from ollm.engine.sampling import argmax_rows
from ollm.kv import packed
from ollm.kv.blocks import BlockManager, OutOfBlocks, chain_keys
from ollm.kv.step_ids import FlatInts, HeldMemo, held_blocks
from test_batch_engine import alone, engine, llms, make_prompts  # noqa: F401 - llms: a fixture


@pytest.mark.parametrize("vocab", [128256, 262144, 4096, 1000, 128257])
def test_argmax_rows_equals_argmax(vocab):
    """Ties (the first maximum), NaN (the first NaN), infinities, all -inf rows, bfloat16
    logits in float32, and widths the tiles do not divide (one argmax)."""
    g = torch.Generator().manual_seed(vocab)
    cases = [
        torch.randn(9, vocab, generator=g),
        torch.randint(0, 4, (17, vocab), generator=g).float(),  # many ties
        torch.randn(3, vocab, generator=g).bfloat16().float(),
        torch.full((2, vocab), float("-inf")),
    ]
    x = torch.randn(6, vocab, generator=g)
    x[1, vocab // 3] = x[1, vocab - 1] = float("nan")
    x[2, 5] = x[2, vocab // 2] = float("inf")
    x[3, vocab - 1] = float("nan")
    x[4, :] = 0.0
    cases.append(x)
    for c in cases:
        assert torch.equal(argmax_rows(c), torch.argmax(c, dim=-1))


def _check(memo: HeldMemo, tables: dict, tier: str) -> None:
    for (group, sid), table in tables.items():
        if not table.blocks:
            continue
        snap = table.snapshot()
        try:
            want = held_blocks(snap, tier, sid, group)
        except RuntimeError:  # a block outside the tier (swapped out): the memo says so too
            with pytest.raises(RuntimeError, match="allocation tier"):
                memo.held(group, sid, snap, tier)
            continue
        got = memo.held(group, sid, snap, tier)
        assert (got.first, got.ids, got.raw, got.run0) == (
            want.first,
            want.ids,
            want.raw,
            want.run0,
        )
        assert torch.equal(torch.frombuffer(bytearray(got.raw), dtype=torch.long),
                           torch.tensor(want.ids, dtype=torch.long))  # fmt: skip


def _random_op(rng: random.Random, mgrs: dict, tables: dict, names: list[str]) -> None:
    """One random join, leave, append, trim, fork, adoption or swap over every group."""
    bt = 4
    sid = rng.choice(names)
    have = (next(iter(mgrs)), sid) in tables
    op = rng.choice(["join", "fork", "leave", "append", "append", "append", "trim", "swap"])
    if not have and op != "fork":
        op = "join"
    if op in ("join", "fork") and have:
        op = "append"
    if op == "join":
        toks = [rng.randrange(3) for _ in range(rng.randrange(1, 40))]
        keys = chain_keys(toks, bt)
        hit = min(m.match_prefix(keys, (len(toks) - 1) // bt) for m in mgrs.values())
        try:
            for g, m in mgrs.items():
                t = tables[(g, sid)] = m.new_table()
                if hit:
                    m.adopt_prefix(t, keys, hit)
                m.append(t, len(toks) - t.length)
                m.register(t, keys)
        except OutOfBlocks:
            for g, m in mgrs.items():
                if (g, sid) in tables:
                    m.free(tables.pop((g, sid)))
            raise
    elif op == "fork":
        others = [s for s in names if (next(iter(mgrs)), s) in tables and s != sid]
        if have or not others:
            return
        src = rng.choice(others)
        for g, m in mgrs.items():
            tables[(g, sid)] = m.fork(tables[(g, src)])
    elif op == "leave":
        for g, m in mgrs.items():
            m.free(tables.pop((g, sid)))
    elif op == "append":
        n = rng.randrange(1, 6)
        if all(m.can_append(tables[(g, sid)], n) for g, m in mgrs.items()):
            for g, m in mgrs.items():
                m.append(tables[(g, sid)], n)
            if rng.random() < 0.5:  # rejected drafts: back to where it was, or part of it
                k = rng.randrange(0, n + 1)
                for g, m in mgrs.items():
                    m.trim(tables[(g, sid)], k)
    elif op == "trim":
        t = tables[(next(iter(mgrs)), sid)]
        k = min(t.length % bt or bt, t.length) if t.length else 0
        if all(m.window is None for m in mgrs.values()):
            for g, m in mgrs.items():
                m.trim(tables[(g, sid)], k)
    elif op == "swap":
        for g, m in mgrs.items():
            t = tables[(g, sid)]
            if m.swap_out_blocks(t) <= m.num_free(["cpu"]) and rng.random() < 0.5:
                m.swap_out(t)
            elif m.swap_in_blocks(t) <= m.num_free():
                m.swap_in(t)


@pytest.mark.parametrize("window", [None, 12])
def test_held_memo_equals_fresh_after_random_ops(window):
    """Hundreds of random table operations over a full group (and a windowed one): after each,
    every table's memoised held blocks equal `held_blocks` of its snapshot; the memo stays
    bounded when sequences leave."""
    rng = random.Random(window or 0)
    mgrs = {"full": BlockManager(4, {"gpu": 400, "cpu": 200}, ["gpu"], "cpu")}
    if window:
        mgrs["sliding"] = BlockManager(4, {"gpu": 400, "cpu": 200}, ["gpu"], "cpu", window)
    tables: dict = {}
    names = [f"s{i}" for i in range(10)]
    memo = HeldMemo()
    for _ in range(600):
        try:
            _random_op(rng, mgrs, tables, names)
        except OutOfBlocks:  # an op that did not apply
            pass
        _check(memo, tables, "gpu")
        memo.keep(sid for _, sid in tables)
        assert len(memo) <= 2 * len(names) * len(mgrs) + 16


def test_flat_ints_parts():
    """Ints and int64 bytes appended in parts make one tensor in order; empty is empty."""
    f = FlatInts()
    assert len(f) == 0 and f.tensor(torch.device("cpu")).numel() == 0
    f.extend([3, -1])
    f.extend_bytes(held_blocks((None, *packed_refs([7, 8, 9])), "gpu").raw)
    f.extend(range(2))
    assert len(f) == 7
    assert f.tensor(torch.device("cpu")).tolist() == [3, -1, 7, 8, 9, 0, 1]


def packed_refs(ids):
    from ollm.kv.blocks import BlockRef

    return tuple(BlockRef("gpu", i) for i in ids)


def _same_layout(a: packed.GroupLayout, b: packed.GroupLayout) -> None:
    assert torch.equal(a.row_block, b.row_block) and torch.equal(a.row_offset, b.row_offset)
    assert a.starts == b.starts and len(a.seqs) == len(b.seqs) and len(a.rest) == len(b.rest)
    for s, t in zip(a.seqs, b.seqs, strict=True):
        fields = (s.row0, s.n, s.start, s.key0, s.ids, s.run0)
        assert fields == (t.row0, t.n, t.start, t.key0, t.ids, t.run0)
        assert torch.equal(s.block_ids, t.block_ids)
    assert len(a.decodes) == len(b.decodes)
    for d, e in zip(a.decodes, b.decodes, strict=True):
        assert torch.equal(d.rows, e.rows) and torch.equal(d.block_ids, e.block_ids)
        assert (d.num_blocks, d.span, d.run, d.shared, d.shared_ids) == (
            e.num_blocks, e.span, e.run, e.shared, e.shared_ids,
        )  # fmt: skip
        assert (d.run_rows is None) == (e.run_rows is None)
        assert d.run_rows is None or torch.equal(d.run_rows, e.run_rows)


def test_engine_layouts_with_memo_equal_fresh(llms, monkeypatch):  # noqa: F811
    """A batch engine with joins at several steps, a cancel, shared prefixes and drafts that
    are partly rejected (trims): every step's layout made with the engine's memo equals the one
    made with an empty memo, and the tokens are each prompt's alone."""
    llm = llms("llama")
    prompts = make_prompts()
    params = SamplingParams(temperature=0, max_new_tokens=12)
    want = alone(llm, prompts, params)
    made = []
    orig = packed.PackedStep._layout

    def both(plan, group, store, tier, device, memo):
        lay = orig(plan, group, store, tier, device, memo)
        _same_layout(lay, orig(plan, group, store, tier, device, packed.HeldMemo()))
        made.append(len(plan.seqs))
        return lay

    monkeypatch.setattr(packed.PackedStep, "_layout", staticmethod(both))
    eng = engine(llm, drafter=lambda toks: list(toks[-2:]))
    ids = {i: eng.add(p, params) for i, p in enumerate(prompts[:5])}
    gone = eng.add(prompts[5], params)
    for i in range(5, len(prompts)):
        for _ in range(2):
            eng.step()
        if i == 6:
            assert eng.cancel(gone)
        ids[i] = eng.add(prompts[i], params)
    eng.run()
    assert [eng.finished[ids[i]].token_ids for i in range(len(prompts))] == want
    assert max(made) > 1 and eng.drafted > eng.accepted_drafts


def test_step_overhead_script_runs(tmp_path):
    """``scripts/step_overhead.py`` on two small batches: every field of each case, the rest
    of a step positive and below the step, a profile of the engine's stages."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "o.json"
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(root / "scripts/step_overhead.py"), "--batches", "2,3",
           "--prompt", "40", "--steps", "2", "--warmup", "1", "--profile-steps", "1",
           "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
    cases = json.loads(out.read_text())["cases"]
    assert [c["batch"] for c in cases] == [2, 3]
    for c in cases:
        assert 0 < c["rest_ms"] < c["step_ms"] and c["layers_ms"] > 0 and c["head_ms"] > 0
        assert "batch.step" in c["profile"]["stages"] and c["profile"]["top"]
