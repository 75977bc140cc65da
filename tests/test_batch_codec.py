"""Encoded paged KV (issue 17): the batch engine's pools with a KV codec give the tokens of the
single-request path with the same codec; bytes per block are the encoded ones; a repeated
document is stored once (prefix keys) with the tokens of the unshared run; trim, fork and free
across encoded blocks; no block or exact slot leaks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import make_hf_model
from ollm import LLM, SamplingParams
from ollm.engine.batch import BatchEngine
from ollm.engine.kvpools import batch_unsupported
from ollm.engine.runner import Runner
from ollm.kv.blocks import chain_keys
from ollm.kv.codec_blocks import CodecBlockManager
from ollm.kv.codec_paged import CodecPagedStore
from ollm.kv.codecs import parse_kv_codec

GREEDY = SamplingParams(temperature=0, max_new_tokens=12)
RECENT = 32  # one block of 32 exact behind the block being filled
TIERS = ("cpu", "disk")  # layer i keeps its KV in TIERS[i % 2]: pinned-RAM and disk pools


def prompts(n: int = 4, seed: int = 3) -> list[list[int]]:
    """Prompts of 70 to 130 tokens: several 32-token blocks leave the recent window."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (70 + 20 * i,), generator=g).tolist() for i in range(n)]


@pytest.fixture(scope="module", params=["llama", "gemma3_text"])
def coded(request, tmp_path_factory):
    """(family, LLM with ``kv_codec="int8"``) on the CPU, prefill chunked at 32 rows."""
    d = tmp_path_factory.mktemp(f"codec-{request.param}")
    make_hf_model(request.param, d / "hf")
    kw = dict(max_batch=1, max_context=256, prefill_chunk=32, progress=False)
    llm = LLM(
        d / "hf", device="cpu", cache_dir=d / "cache", kv_codec="int8", kv_recent=RECENT, **kw
    )
    yield request.param, llm
    llm.close()


def host_runner(llm: LLM, codec: str = "int8") -> Runner:
    """A runner over ``llm``'s weights whose plan keeps layer i's KV in ``TIERS[i % 2]``."""
    layers = tuple(replace(p, kv_tier=TIERS[i % 2]) for i, p in enumerate(llm.plan.layers))
    runner = Runner(llm.spec, replace(llm.plan, layers=layers), llm.prefetcher, llm.dtype)
    runner.kv_codec, runner.kv_recent = codec, RECENT
    return runner


def engine(runner: Runner, kv_dir, **kw) -> BatchEngine:
    args = dict(block_tokens=32, max_batch=4, max_context=256, max_step_tokens=64)
    return BatchEngine(runner, None, (), kv_dir=str(kv_dir), **{**args, **kw})


def full_manager(eng: BatchEngine) -> CodecBlockManager:
    m = eng.pools.managers["full"]
    assert isinstance(m, CodecBlockManager)
    return m


# sinks:0: the paged pools encode every block (``kvpools._codecs``), the single-request caches
# keep an int4 codec's first tokens exact unless told not to
@pytest.mark.parametrize("codec", ["int8", "k:int4,v:int8,sinks:0"])
def test_batch_with_codec_matches_single_request_path(codec, coded, tmp_path):
    """4 prompts over encoded RAM and disk pools: the tokens of each prompt run alone through
    the single-request compressed caches with the same codec, and log-probs close to that
    path's teacher-forced ones (``score``, decode-faithful too), while exact KV's differ by
    more (the blocks really are encoded); every block returned."""
    family, base = coded
    ps = prompts()
    llm = base
    if codec != "int8":
        kw = dict(max_batch=1, max_context=256, prefill_chunk=32, progress=False)
        llm = LLM(base.store_path, device="cpu", kv_codec=codec, kv_recent=RECENT, **kw)
    want = [llm.generate(p, GREEDY).token_ids for p in ps]
    # pages of the codec's block (int4 keys: 16 tokens), so both paths encode at the same edges
    bt = 16 if codec.startswith("k:int4") else 32
    eng = engine(host_runner(llm, codec), tmp_path / "kv", block_tokens=bt)
    stores = eng.pools.stores["full"]
    assert set(stores) == {"ram", "disk"}
    assert all(isinstance(s, CodecPagedStore) for s in stores.values())
    got_lp: dict[int, list[float]] = {}

    def on_logprob(i, lp):
        got_lp.setdefault(i, []).append(lp.logprob)

    ids = [eng.add(p, GREEDY, index=i, logprobs=0, on_logprob=on_logprob) for i, p in enumerate(ps)]
    eng.run()
    assert [eng.finished[r].token_ids for r in ids] == want
    gap = err = 0.0
    with LLM(base.store_path, device="cpu", max_context=256, progress=False) as exact:
        for i, p in enumerate(ps):
            ref = llm.score(p + want[i])[len(p) - 1 :]
            got = torch.tensor(got_lp[i])
            assert torch.allclose(got, ref, atol=1e-3), (family, got, ref)
            err = max(err, float((got - ref).abs().max()))
            gap = max(gap, float((exact.score(p + want[i])[len(p) - 1 :] - got).abs().max()))
    assert gap > 1e-3 and gap > 3 * err, (gap, err)  # exact KV's differ: blocks are encoded
    m = full_manager(eng)
    assert eng.kv_blocks_used() == 0 and m.num_free() == m.capacity_blocks()
    eng.close()
    if llm is not base:
        llm.close()


def test_encoded_bytes_per_block_and_exact_slots(coded, tmp_path):
    """An int8 block stores the codec's bytes per token (codes plus float16 parameters), under
    a third of an exact float32 block; with two running sequences the exact slots (their
    recent windows and a step's blocks) are a small share of the blocks, so the pools take
    far less memory than exact ones of as many blocks."""
    _, llm = coded
    kw = dict(max_batch=2, max_context=2048, max_running=2)
    eng = engine(host_runner(llm), tmp_path / "kv", **kw)
    store = eng.pools.stores["full"]["ram"]
    spec = llm.spec
    elem = torch.finfo(llm.dtype).bits // 8
    exact = 2 * 32 * spec.num_kv_heads * spec.head_dim * elem
    codec = parse_kv_codec("int8", RECENT)
    per = codec.bytes_per_token(spec.head_dim, elem) * 32 * spec.num_kv_heads
    assert per <= store.encoded_block_bytes() <= per + 4 * 16  # four tensors, 16-byte aligned
    assert store.encoded_block_bytes() < exact / 3
    m = full_manager(eng)
    assert m.exact_slots < m.capacity_blocks() // 4
    n_layers = len(store.codes)
    assert store.nbytes < n_layers * m.capacity_blocks() * exact * 0.75
    eng.close()


def test_repeated_document_stored_once(coded, tmp_path):
    """A 128-token document asked about by three requests, one after another: its encoded
    blocks are stored once (pool blocks used count it once), and the tokens equal the run
    without prefix sharing."""
    _, llm = coded
    g = torch.Generator().manual_seed(7)
    doc = torch.randint(0, 256, (128,), generator=g).tolist()
    asks = [doc + torch.randint(0, 256, (9 + 5 * i,), generator=g).tolist() for i in range(3)]
    runner = host_runner(llm)
    plain = engine(runner, tmp_path / "a", prefix_caching=False)
    want = [plain.generate([p], GREEDY)[0][0].token_ids for p in asks]
    plain.close()
    eng = engine(runner, tmp_path / "b")
    m = full_manager(eng)
    got, used = [], []
    for p in asks:
        rid = eng.add(p, GREEDY)
        while eng.has_work():
            eng.step()
            used.append(m.pools["device"].num_used)
        got.append(eng.finished.pop(rid).token_ids)
    assert got == want
    doc_blocks = 128 // 32
    assert eng.metrics().prefix_hits == 2
    assert eng.metrics().prefix_saved_tokens >= 2 * (doc_blocks - 1) * 32
    # each request alone holds at most its own blocks: the document's are never copied
    most = max(-(-(len(p) + GREEDY.max_new_tokens) // 32) for p in asks)
    assert max(used) <= most
    keys = chain_keys(asks[0], 32)
    cached = [m.pools["device"].lookup(k) for k in keys[:doc_blocks]]
    assert None not in cached and len(set(cached)) == doc_blocks
    assert eng.kv_blocks_used() == 0
    eng.close()


def test_concurrent_shared_document_stored_once(coded, tmp_path):
    """Three requests on one document running together: the document's blocks are held once
    (used blocks stay under one copy of the document plus each request's own tail)."""
    _, llm = coded
    g = torch.Generator().manual_seed(9)
    doc = torch.randint(0, 256, (160,), generator=g).tolist()
    asks = [doc + torch.randint(0, 256, (7 + 3 * i,), generator=g).tolist() for i in range(3)]
    runner = host_runner(llm)
    eng = engine(runner, tmp_path / "kv")
    first = eng.add(asks[0], GREEDY)
    eng.step()  # the document's blocks are computed and keyed once
    for _ in range(4):
        eng.step()
    rest = [eng.add(p, GREEDY) for p in asks[1:]]
    m = full_manager(eng)
    peak = 0
    while eng.has_work():
        eng.step()
        peak = max(peak, m.pools["device"].num_used)
    own = sum(-(-(len(p) + 12) // 32) - 160 // 32 + 1 for p in asks)
    assert peak <= 160 // 32 + own
    plain = engine(runner, tmp_path / "p", prefix_caching=False)
    want = [plain.generate([p], GREEDY)[0][0].token_ids for p in asks]
    plain.close()
    assert [eng.finished[r].token_ids for r in [first, *rest]] == want
    eng.close()


def test_manager_trim_fork_free_across_encoded_blocks():
    """Exact slots follow the recent window: blocks that left every window give their slot up
    (to later allocations); trim within the held window works, past it is refused; a fork
    shares; freeing both returns every block and slot."""
    m = CodecBlockManager(4, {"device": 16}, recent_blocks=1, exact_slots=5)
    t = m.new_table()
    m.append(t, 10)  # blocks 0..2, all exact while written
    assert all(m.exact_of[r.block] >= 0 for r in t.blocks)
    m.sweep([t])  # window of the next query at 10: blocks 1 (recent) and 2 (being filled)
    f = m.fork(t)
    m.append(t, 6)  # to 16: blocks 3 new; block 0's slot may be reused
    m.sweep([t, f])
    m.append(f, 1)  # copy-on-write of the shared partial block 2
    assert f.blocks[2] != t.blocks[2] and m.exact_of[f.blocks[2].block] >= 0
    m.sweep([t, f])
    u = m.new_table()
    m.append(u, 8)  # needs slots: only blocks outside every window give theirs up
    assert m.exact_of[t.blocks[0].block] < 0  # the oldest copy went first
    needed = {r.block for x in (t, f) for r in x.blocks[m.window_first(x.length) :]}
    assert all(m.exact_of[b] >= 0 for b in needed)
    m.trim(t, 3)  # back to 13: its window (blocks 2, 3) is still exact
    with pytest.raises(ValueError, match="exact"):
        m.trim(t, 12)  # to 1: block 0 has only codes left
    for x in (t, f, u):
        m.free(x)
    m.sweep([])
    assert m.num_free() == 16 and m.pools["device"].num_used == 0


def test_refusals(coded, tmp_path):
    """Blocks of partial codec groups, swap tiers and temporal schedules are refused in one
    line; ``auto`` keeps device pools exact (encoded RAM/disk pools only)."""
    _, llm = coded
    runner = host_runner(llm)
    with pytest.raises(ValueError, match="whole codec groups"):
        engine(runner, tmp_path / "a", block_tokens=16)
    with pytest.raises(ValueError, match="swap"):
        engine(runner, tmp_path / "b", swap_tokens=64)
    temporal = host_runner(llm, "4k:bf16,32k:int8,rest:int4")
    assert "temporal" in batch_unsupported(temporal)
    auto = host_runner(llm, "auto")
    first = next(i for i, layer in enumerate(llm.spec.layers) if layer.window is None)
    layers = list(auto.plan.layers)
    layers[first] = replace(layers[first], kv_tier="device")
    auto.plan = replace(auto.plan, layers=tuple(layers))
    eng = engine(auto, tmp_path / "c")
    homes = eng.pools.stores["full"]
    assert not isinstance(homes["device"], CodecPagedStore)
    assert len(homes) > 1
    assert all(isinstance(s, CodecPagedStore) for h, s in homes.items() if h != "device")
    eng.close()


def test_llm_generate_list_runs_encoded_pools(coded):
    """``LLM.generate`` with a list and ``kv_codec`` runs the batch engine over encoded pools
    (blocks of whole codec groups): each prompt's tokens as alone."""
    _, llm = coded
    ps = prompts(3, seed=5)
    want = [llm.generate(p, GREEDY).token_ids for p in ps]
    made = []
    real = BatchEngine.for_plan

    def spy(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BatchEngine, "for_plan", spy)
        outs = llm.generate(ps, [GREEDY] * len(ps))
    assert [o.token_ids for o in outs] == want
    assert made and made[0].pools.encoded
    assert made[0].scheduler.block_tokens % 32 == 0


def test_few_exact_slots_reuse_and_prefix_hits_stay_exact(coded, tmp_path):
    """With exact slots for one sequence only, blocks that left the window give theirs up while
    a prompt is prefilled. A document asked about again right away is adopted whole (its last
    block is still exact); after an unrelated request took every exact slot, only codes are
    left and the request recomputes instead. Tokens equal the unshared run's throughout."""
    _, llm = coded
    g = torch.Generator().manual_seed(11)
    doc = torch.randint(0, 256, (192,), generator=g).tolist()
    other = torch.randint(0, 256, (200,), generator=g).tolist()
    asks = [doc + torch.randint(0, 256, (5 + 9 * i,), generator=g).tolist() for i in range(3)]
    order = [asks[0], asks[1], other, asks[2]]
    runner = host_runner(llm)
    plain = engine(runner, tmp_path / "a", prefix_caching=False)
    want = [plain.generate([p], GREEDY)[0][0].token_ids for p in order]
    plain.close()
    eng = engine(runner, tmp_path / "b", max_running=1)
    m = full_manager(eng)
    assert m.exact_slots == 1 * (1 + 3) + 64 // 32 < -(-len(asks[0]) // 32)  # < one request
    hits = []
    for p, w in zip(order, want, strict=True):
        assert eng.generate([p], GREEDY)[0][0].token_ids == w
        hits.append(eng.metrics().prefix_hits)
        assert m.exact_used() <= m.exact_slots
    assert hits == [0, 1, 1, 1]  # asks[1] adopts the document; asks[2] after `other` cannot
    assert eng.kv_blocks_used() == 0
    eng.close()


def test_drafts_are_off_over_encoded_pools(coded, tmp_path, caplog):
    """A drafter given to an engine over encoded pools is dropped with one warning line (no
    drafts yet: a tree's compaction writes pool rows by block id); tokens are the plain run's."""
    _, llm = coded
    ps = prompts(2, seed=13)
    runner = host_runner(llm)
    plain = engine(runner, tmp_path / "a")
    want = [o.token_ids for o in plain.generate(ps, GREEDY)[0]]
    plain.close()
    eng = engine(runner, tmp_path / "b", drafter=lambda toks: list(toks[-3:]))
    with caplog.at_level("WARNING"):
        got = [o.token_ids for o in eng.generate(ps, GREEDY)[0]]
    assert got == want
    assert eng.speculator is None and eng.drafted == 0
    assert any("encoded KV pools" in r.getMessage() for r in caplog.records)
    eng.close()
