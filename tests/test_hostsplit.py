"""Decode attention over a host KV pool split between the CPU and the GPU (``kv/hostsplit.py``):
every share of fetched blocks gives the exact attention (float64 reference), windows and sinks
included; the batch engine with split host pools gives each prompt's tokens alone."""

from __future__ import annotations

import math

import pytest
import torch

from ollm.kv.hostsplit import HostSplit
from ollm.kv.packed import SeqRows, _decode_batches
from ollm.kv.paged import PagedKVStore
from ollm.layers.attention import AttentionMask
from test_batch_engine import GREEDY, LATE, alone, make_prompts
from test_batch_tiers import engine, llms, spread  # noqa: F401 - llms is a fixture

KVH, BT, D, H = 2, 4, 8, 4
BLOCKS = 48


def _batch(seed: int = 0):
    """A store with random K/V and a decode batch of 5 sequences over scattered blocks: each
    holds a run of prompt blocks and later blocks taken out of order (as decode appends)."""
    g = torch.Generator().manual_seed(seed)
    store = PagedKVStore(1, {"device": BLOCKS}, KVH, BT, D, torch.float32, {"device": "cpu"})
    store.pools["device"].copy_(torch.randn(store.pools["device"].shape, generator=g))
    free = list(range(BLOCKS))
    starts = [6, 21, 13, 30, 2]  # query positions (its own K/V already written)
    key0s = [0, 0, 4, 8, 0]  # a window may have released earlier blocks
    prompt = [-(-(s + 1 - k) // BT) - 1 for s, k in zip(starts, key0s, strict=True)]
    ids = [[free.pop(0) for _ in range(n)] for n in prompt]  # prompt runs, in order
    late = torch.randperm(len(free), generator=g).tolist()
    for seq in ids:  # one more block each, from anywhere
        seq.append(free[late.pop()])
    seqs = [
        SeqRows(i, 1, s, k, torch.tensor(b, dtype=torch.long))
        for i, (s, k, b) in enumerate(zip(starts, key0s, ids, strict=True))
    ]
    (d,) = _decode_batches(seqs, store, torch.device("cpu"))
    q = torch.randn(len(seqs), H, 1, D, generator=g)
    return store, d, q


def _reference(store, d, q, window, sinks, scale):
    """float64 attention of each sequence's query over its keys, one by one."""
    pool = store.pools["device"][0].double()
    out = torch.zeros(q.shape, dtype=torch.float64)
    for j, s in enumerate(d.seqs):
        n = s.start + 1 - s.key0
        ids = s.block_ids[: -(-n // BT)]
        k = pool[0][:, ids].reshape(KVH, -1, D)[:, :n]  # head-major pool [KVH, blocks, BT, D]
        v = pool[1][:, ids].reshape(KVH, -1, D)[:, :n]
        pos = s.key0 + torch.arange(n)
        keep = pos <= s.start
        if window is not None:
            keep &= pos > s.start - window
        for h in range(H):
            logits = (k[h // (H // KVH)] @ q[j, h, 0].double()) * scale
            logits = logits.masked_fill(~keep, -math.inf)
            if sinks is not None:
                logits = torch.cat([logits, sinks[h : h + 1].double()])
                vals = torch.cat([v[h // (H // KVH)], torch.zeros(1, D, dtype=torch.float64)])
            else:
                vals = v[h // (H // KVH)]
            out[j, h, 0] = torch.softmax(logits, 0) @ vals
    return out


@pytest.mark.parametrize("share", [0.0, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("window,sinks", [(None, False), (10, False), (None, True)])
def test_every_share_is_exact(share, window, sinks):
    store, d, q = _batch()
    sink = torch.randn(H) if sinks else None
    split = HostSplit(1 << 30, "cpu", share=share, adapt=False, force=True)
    mask = AttentionMask(0, 1, 1, None, window, sink)
    pool = store.pools["device"][0]
    got = split.attend(d, pool, q, mask, 0.35, store.host_scratch)
    want = _reference(store, d, q, window, sink, 0.35)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    lay = next(v for k, v in d.host_rows.items() if k[0] == "split")
    fetched = lay.fetched_blocks
    assert (fetched == 0) == (share == 0.0)
    assert (len(lay.cpu) == 0) == (share == 1.0)


def test_staging_bounds_the_fetch():
    """A small budget copies at most the staging buffer's slots; the rest stays on the CPU."""
    store, d, q = _batch(1)
    pool = store.pools["device"][0]
    block = 2 * KVH * BT * D * 4
    split = HostSplit(3 * 6 * block // 2, "cpu", share=1.0, adapt=False, force=True)
    assert split.slots(pool) == 5
    got = split.attend(d, pool, q, AttentionMask(0, 1, 1), 0.5, store.host_scratch)
    lay = next(v for k, v in d.host_rows.items() if k[0] == "split")
    assert 0 < lay.fetched_blocks <= 5 and len(lay.cpu) > 0
    assert split.staging(pool)[:, :, -1].abs().sum() == 0  # the padding slot stays zero
    torch.testing.assert_close(
        got.double(), _reference(store, d, q, None, None, 0.5), atol=1e-5, rtol=1e-5
    )


def test_share_follows_the_votes():
    split = HostSplit(1 << 20, "cpu", share=0.5, force=True)
    split.votes = [3, 1]
    assert split.next_share() > 0.5
    split.votes = [0, 4]
    before = split.share
    assert split.next_share() < before
    split.votes = [0, 0]
    assert split.next_share() == split.share  # no votes, no change


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt_oss"])
def test_engine_with_split_host_pools_matches_alone(family, llms, tmp_path):  # noqa: F811
    """The batch engine with its RAM and disk pools split (half the held blocks attended on
    the 'GPU' side, here the CPU too) gives each prompt's greedy tokens alone."""
    llm = llms(family)
    runner = spread(llm)
    prompts = make_prompts()
    want = alone(llm, prompts)
    eng = engine(runner, tmp_path / "kv")
    splits = []
    for homes in eng.pools.stores.values():
        for home in ("ram", "disk"):
            if home in homes:
                homes[home].split = HostSplit(1 << 30, "cpu", share=0.5, force=True)
                splits.append(homes[home].split)
    ids = [eng.add(p, GREEDY) for p in prompts[:-LATE]]
    for _ in range(3):
        eng.step()
    ids += [eng.add(p, GREEDY) for p in prompts[-LATE:]]
    eng.run()
    assert [eng.finished[r].token_ids for r in ids] == want
    assert any(s.fetched_bytes for s in splits) and any(s.cpu_bytes for s in splits)
    assert eng.kv_blocks_used() == 0
    eng.close()


def test_batch_steps_skip_cpu_layers_when_their_attention_dominates():
    """The cost model keeps the plan's CPU layers for one sequence and for a batch of short
    ones, and streams every layer when the CPU would attend many sequences' long KV
    (H200 host rates; Llama-3.1-8B layer of 416 MiB, 4 KiB of KV per token and layer)."""
    from ollm.planning.costmodel import MachineRates, hybrid_step_pays

    rates = MachineRates(54e9, 53e9, 50.8e9, 50.9e9, 14, 3.9e12, 6.4e12, 7.4e14, cpu_attn=8.5e9)
    layer, tok = 416 << 20, 4096
    assert hybrid_step_pays(rates, 16, 32, layer, 2, 1, 2080 * tok)
    assert hybrid_step_pays(rates, 9, 21, layer, 2, 32, 32 * 50 * tok)
    assert not hybrid_step_pays(rates, 16, 32, layer, 2, 16, 16 * 2080 * tok)
    assert hybrid_step_pays(None, 16, 32, layer, 2, 16, 16 * 2080 * tok)  # rates unknown
