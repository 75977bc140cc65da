"""Continuous batching through the real runner (engine v2, issue 13): every family's requests,
packed into shared steps over paged KV, give the tokens each gives alone through LLM.generate."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import FAMILIES
from ollm import LLM, SamplingParams
from ollm.engine.batch import BatchEngine, batch_supported
from ollm.errors import RequestError

GREEDY = SamplingParams(temperature=0, max_new_tokens=10)
PREFIX = 40  # tokens shared by three prompts
SHARED = (1, 4, 6)  # prompts that start with the shared prefix
LATE = 2  # the last prompts arrive after a few steps


def make_prompts(n: int = 8, seed: int = 1) -> list[list[int]]:
    """``n`` prompts of different lengths (3 to 52 tokens of their own); three share a prefix."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 256, (PREFIX,), generator=g).tolist()
    out = []
    for i in range(n):
        tail = torch.randint(0, 256, (3 + 7 * i,), generator=g).tolist()
        out.append(prefix + tail if i in SHARED else tail)
    return out


@pytest.fixture(scope="module")
def llms(hf_models, tmp_path_factory):
    """family -> LLM on the CPU, prefill chunked at 32 rows (so steps of more rows are split)."""
    cache = tmp_path_factory.mktemp("batch-cache")
    made: dict[str, LLM] = {}

    def get(family: str) -> LLM:
        if family not in made:
            _, path = hf_models(family)
            made[family] = LLM(
                path,
                device="cpu",
                max_batch=1,
                max_context=256,
                prefill_chunk=32,
                cache_dir=cache,
                progress=False,
            )
        return made[family]

    yield get
    for llm in made.values():
        llm.close()


def alone(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    """Each prompt's tokens from its own single-request run."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    return [llm.generate(p, sp).token_ids for p, sp in zip(prompts, plist, strict=True)]


def engine(llm: LLM, **kw) -> BatchEngine:
    """A batch engine over ``llm``'s runner with small blocks (so a 40-token prefix fills some)."""
    args = dict(block_tokens=8, max_batch=8, max_context=256, max_step_tokens=64)
    return BatchEngine(llm.runner, None, (), **{**args, **kw})


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_matches_alone(family, llms):
    """8 prompts, 3 sharing a 40-token prefix, 2 submitted while the others decode."""
    llm = llms(family)
    assert batch_supported(llm.runner)
    prompts = make_prompts()
    want = alone(llm, prompts)
    eng = engine(llm)
    ids = [eng.add(p, GREEDY) for p in prompts[:-LATE]]
    for _ in range(3):
        eng.step()
    assert eng.metrics().running > 0
    ids += [eng.add(p, GREEDY) for p in prompts[-LATE:]]
    eng.run()
    got = [eng.finished[r].token_ids for r in ids]
    assert got == want
    m = eng.metrics()
    assert m.prefix_hits > 0 and m.prefix_saved_tokens >= 8
    # Shared prompts prefilled only their tails: fewer query tokens than prompts + outputs.
    assert m.step_tokens < sum(len(p) for p in prompts) + sum(len(t) for t in want)
    assert eng.kv_blocks_used() == 0 and m.running == m.waiting == 0


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_preemption_swap_and_recompute(family, llms):
    """A pool too small for every request at once: sequences are preempted (swapped to RAM, or
    recomputed when the swap tier is full) and still give their tokens alone."""
    llm = llms(family)
    prompts = make_prompts()
    want = alone(llm, prompts)
    for swap in (0, 96):
        eng = engine(llm, max_batch=2, max_context=96, swap_tokens=swap)
        ids = [eng.add(p, GREEDY) for p in prompts]
        swapped = 0
        while eng.has_work():
            eng.step()
            swapped = max(swapped, eng.metrics().swapped)
        assert [eng.finished[r].token_ids for r in ids] == want
        assert eng.metrics().preemptions > 0
        assert (swapped > 0) == (swap > 0)
        assert eng.kv_blocks_used() == 0


def test_cancel_frees_blocks(llms):
    """Cancelled requests (running or waiting) free their blocks; the others are unaffected."""
    llm = llms("llama")
    prompts = make_prompts()
    want = alone(llm, prompts)
    eng = engine(llm, max_step_tokens=32)
    ids = [eng.add(p, GREEDY) for p in prompts]
    for _ in range(4):
        eng.step()
    assert eng.kv_blocks_used() > 0
    gone = {ids[0], ids[7]}  # one decoding, one not yet admitted
    assert all(eng.cancel(r) for r in gone)
    assert not eng.cancel(ids[0])
    eng.run()
    for r, w in zip(ids, want, strict=True):
        out = eng.finished[r]
        if r in gone:
            assert out.finish_reason == "cancelled"
        else:
            assert out.token_ids == w
    assert eng.kv_blocks_used() == 0
    # Cancelling everything mid-run also returns every block.
    eng2 = engine(llm)
    for p in prompts:
        eng2.add(p, GREEDY)
    eng2.step()
    eng2.close()
    assert eng2.kv_blocks_used() == 0


def test_sampling_per_request(llms):
    """Different params per request (seeded sampling, lengths, stop ids) match each alone."""
    llm = llms("qwen3")
    prompts = make_prompts(4)
    params = [
        SamplingParams(temperature=0.8, top_k=20, seed=5, max_new_tokens=7),
        GREEDY,
        SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_new_tokens=12),
        SamplingParams(temperature=0, max_new_tokens=6),
    ]
    want = alone(llm, prompts, params)
    # A stop id inside a greedy output ends that request early, as it does alone.
    params[1] = SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[want[1][3]])
    want[1] = alone(llm, [prompts[1]], [params[1]])[0]
    outs, metrics = engine(llm).generate(prompts, params)
    assert [o.token_ids for o in outs] == want
    assert outs[1].finish_reason == "stop" and len(want[1]) < 10
    assert metrics.generated_tokens == sum(len(w) for w in want)


def test_server_streams(llms):
    """Requests submitted to a BatchServer at different times stream their tokens (equal to
    each alone); a cancelled one ends early; an idle server holds no engine (no KV pools)."""
    from ollm.engine.serving import BatchServer

    llm = llms("mistral")
    prompts = make_prompts(5)
    want = alone(llm, prompts)
    server = BatchServer(lambda: engine(llm, max_step_tokens=32), llm._lock, text=False)
    try:
        streams = [server.submit(p, GREEDY) for p in prompts[:3]]
        first = next(iter(streams[0]))  # the batch is running: submit more while it decodes
        streams += [server.submit(p, GREEDY) for p in prompts[3:]]
        doomed = server.submit(prompts[0], SamplingParams(temperature=0, max_new_tokens=200))
        next(iter(doomed))
        doomed.cancel()
        got = [[first, *streams[0]]] + [list(s) for s in streams[1:]]
        assert got == want
        assert [s.result.token_ids for s in streams] == want
        for s in streams:
            assert 0 < s.time_to_first_output <= s.finished_at - s.submitted_at
        out = doomed.wait(30)
        assert out.finish_reason == "cancelled" and 1 <= len(out.token_ids) < 200
        for _ in range(100):
            if server.idle:
                break
            threading.Event().wait(0.05)
        assert server.idle
    finally:
        server.close()


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])
def test_llm_generate_list_uses_batch_engine(family, tmp_path, monkeypatch):
    """LLM.generate with several text prompts (stop strings, per-prompt params) runs through the
    batch engine and gives each prompt's single-request text, tokens and finish reason."""
    from conftest import char_tokenizer, make_hf_model
    from ollm.engine import batch

    make_hf_model(family, tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    texts = ["The cat sat on", "A long shared beginning of a story: once upon", "xyz"]
    texts.append(texts[1] + " a time there")
    with LLM(tmp_path / "m", device="cpu", cache_dir=tmp_path / "c", progress=False) as llm:
        single = [llm.generate(t, GREEDY) for t in texts]
        stop = single[0].text[2:4]  # a stop string inside the first output
        params = [SamplingParams(temperature=0, max_new_tokens=10, stop=[stop]), GREEDY]
        params += [SamplingParams(temperature=0, max_new_tokens=4), GREEDY]
        want = [llm.generate(t, p) for t, p in zip(texts, params, strict=True)]
        made = []
        run = batch.BatchEngine.generate

        def recorded(self, *a, **k):
            made.append(self)
            return run(self, *a, **k)

        monkeypatch.setattr(batch.BatchEngine, "generate", recorded)
        pieces: dict[int, str] = {}
        got = llm.generate(
            texts, params, _on_text=lambda r, s: pieces.__setitem__(r, pieces.get(r, "") + s)
        )
    assert len(made) == 1 and made[0].steps > 0  # one engine ran the whole request
    assert made[0].kv_blocks_used() == 0
    for g, w in zip(got, want, strict=True):
        assert (g.text, g.token_ids, g.finish_reason) == (w.text, w.token_ids, w.finish_reason)
    assert want[0].finish_reason == "stop" and len(want[0].token_ids) < 10
    assert [pieces.get(i, "") for i in range(4)] == [w.text for w in want]


def test_llm_submit_streams_text(tmp_path):
    """LLM.submit from several threads: each stream's text pieces join to its single-request
    text; a later, longer request re-plans once the server is idle."""
    from conftest import char_tokenizer, make_hf_model

    make_hf_model("llama", tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    texts = ["Hello there", "Once upon a time", "abc", "The quick brown fox jumps"]
    kw = dict(device="cpu", max_context=64, cache_dir=tmp_path / "c", progress=False)
    with LLM(tmp_path / "m", **kw) as llm:
        want = [llm.generate(t, GREEDY).text for t in texts]
        streams: list = [None] * len(texts)

        def go(i: int) -> None:
            streams[i] = llm.submit(texts[i], GREEDY)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert ["".join(s) for s in streams] == want
        assert [s.wait(30).text for s in streams] == want
        long = SamplingParams(temperature=0, max_new_tokens=80)  # beyond max_context=64
        for _ in range(100):  # the server frees its engine once idle
            if llm._server.idle:
                break
            threading.Event().wait(0.05)
        got = "".join(llm.submit(texts[0], long))
        assert llm.workload.context >= len(texts[0]) + 80
        assert got == llm.generate(texts[0], long).text
        # While submitted requests run, nothing re-plans under them (their engine holds the
        # runner and pools): a request needing more context is refused.
        server, llm._server = llm._server, type("Busy", (), {"idle": False})()
        try:
            with pytest.raises(RequestError, match="submitted requests are running"):
                llm.generate(texts[0], SamplingParams(max_new_tokens=200))
        finally:
            llm._server = server


def test_decode_batches_cut_by_gather_bytes(llms, monkeypatch):
    """One-token sequences are attended in batches whose gathered K/V stays under the cap (a
    single sequence may exceed it): with a small cap, several batches per step, same tokens
    (strided views of the pools off: they need no gather, so no cut)."""
    from ollm.kv import decode_batch, packed

    llm = llms("gemma3_text")
    prompts = make_prompts()
    want = alone(llm, prompts)
    cap = 64 * 2 * llm.spec.num_kv_heads * llm.spec.head_dim * 4  # 64 float32 K/V slots
    cut = decode_batch._decode_groups
    per_step = []

    def recorded(infos, store, shared=0):  # infos: (row0, rows, start, key0, ids, tree) each
        out = cut(infos, store, shared)
        for group in out:  # the blocks after a shared prefix are gathered (kv/shared_prefix.py)
            gathered = len(group) * (max(need for _, need in group) - shared) * store.block_tokens
            assert len(group) == 1 or gathered * 2 * store.kv_heads * store.head_dim * 4 <= cap
            assert [i[0] for i, _ in group] == sorted(i[0] for i, _ in group)  # row order
        if len(infos) > 1:  # every one-token sequence lands in exactly one batch
            assert sorted(i[0] for g in out for i, _ in g) == sorted(i[0] for i in infos)
        per_step.append(len(out))
        return out

    monkeypatch.setattr(decode_batch, "_decode_groups", recorded)
    monkeypatch.setattr(packed, "host_blocks", lambda *a: None)
    monkeypatch.setattr(decode_batch, "GATHER_BYTES", cap)
    outs, _ = engine(llm).generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == want
    assert max(per_step) > 1


def test_decodes_attend_strided_views_of_slab_pools(llms, monkeypatch):
    """Prompts with no shared prefix start on slabs of the pools and grow in runs, so their
    decode batches are attended over views of the pool (no gather), and a prompt prefilled over
    several steps reads its earlier keys as a view of its run; the tokens are each prompt's
    alone."""
    from ollm.kv import packed

    llm = llms("llama")
    prompts = [p[-(5 + 9 * i) :] for i, p in enumerate(make_prompts(6, seed=3))]
    want = alone(llm, prompts)
    views, gathers, runs = [], [], []
    view, gather, run = (
        packed.run_view,
        packed.PackedLayerKV._gather_rows,
        packed.PackedLayerKV._run_kv,
    )
    monkeypatch.setattr(packed, "run_view", lambda *a: views.append(1) or view(*a))
    monkeypatch.setattr(
        packed.PackedLayerKV, "_gather_rows", lambda s, *a: gathers.append(1) or gather(s, *a)
    )
    monkeypatch.setattr(packed.PackedLayerKV, "_run_kv", lambda s, *a: runs.append(1) or run(s, *a))
    outs, _ = engine(llm).generate(prompts, GREEDY)  # 64-token steps: later prompts span steps
    assert [o.token_ids for o in outs] == want
    assert views and runs and not gathers


def test_failed_step_recomputes(llms, monkeypatch):
    """A forward that fails mid-run aborts its step (the touched sequences recompute, cached
    prefix blocks stay valid): running on gives every prompt its tokens alone; a BatchServer
    ends every stream of a failed step with the error."""
    from ollm.engine.serving import BatchServer

    llm = llms("qwen2")
    prompts = make_prompts()
    want = alone(llm, prompts)
    eng = engine(llm)
    ids = [eng.add(p, GREEDY) for p in prompts]
    forward = llm.runner.forward
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] in (3, 7):
            raise OSError("weight read failed")
        return forward(*a, **k)

    monkeypatch.setattr(llm.runner, "forward", flaky)
    failures = 0
    while eng.has_work():
        try:
            eng.step()
        except OSError:
            failures += 1
    assert failures == 2
    assert [eng.finished[r].token_ids for r in ids] == want
    assert eng.kv_blocks_used() == 0

    def no_pools():
        raise MemoryError("no room for the KV pools")

    server = BatchServer(no_pools, llm._lock, text=False)
    try:  # an engine that cannot be made fails its requests instead of hanging them
        with pytest.raises(MemoryError):
            server.submit(prompts[0], GREEDY).wait(30)
    finally:
        server.close()
    calls["n"] = 0
    server = BatchServer(lambda: engine(llm), llm._lock, text=False)
    try:
        streams = [server.submit(p, GREEDY) for p in prompts[:3]]
        for s in streams:
            with pytest.raises(OSError, match="weight read failed"):
                s.wait(30)
    finally:
        server.close()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_pools_match_kv_reservation(family, hf_models, tmp_path):
    """The pools LLM.generate makes hold the planned max_batch x max_context tokens, each
    sequence rounded up to whole blocks: the planner's KV reservation (planned for the batch
    engine, planning/batch_step.py), byte for byte."""
    from ollm.engine.batch import BLOCK_TOKENS, BatchEngine

    _, path = hf_models(family)
    kw = dict(device="cpu", max_batch=3, max_context=200, cache_dir=tmp_path, progress=False)
    with LLM(path, **kw) as llm:
        w = llm.workload
        eng = BatchEngine.for_plan(llm.runner, None, (), w.batch, w.context)
        pools = sum(s.nbytes for s in eng.stores.values())
        s = llm.spec
        per_token = 2 * s.num_layers * s.num_kv_heads * s.head_dim * 4  # float32 K and V
        reserved = llm.plan.reserved["kv cache"]
        assert reserved == pools
        assert w.batch * w.context * per_token <= pools
        assert pools < w.batch * (w.context + BLOCK_TOKENS) * per_token
        # Sequences at once: the logits rows the plan names; a step: its planned tokens.
        assert eng.scheduler.max_running == llm.plan.logit_rows == w.batch
        assert eng.scheduler.max_step_tokens == llm.plan.step_tokens == w.batch * w.context
        eng.close()


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_speculative_drafts_verified(family, llms):
    """Draft tokens ride in the same pass as each decode (multi-token steps over paged KV);
    greedy verification keeps exactly each prompt's tokens alone, rejected drafts' KV is
    trimmed, and good drafts cut the number of steps. A sampled request is verified by rejection
    sampling (same distribution, other draws: tests/test_speculative.py checks the law)."""
    from ollm.engine.drafting import prompt_lookup

    llm = llms(family)
    prompts = make_prompts(6)
    params = [GREEDY] * 5 + [SamplingParams(temperature=0.9, seed=3, max_new_tokens=10)]
    want = alone(llm, prompts, params)
    by_prompt = {tuple(p): w for p, w in zip(prompts, want, strict=True)}

    def oracle(tokens):  # the true continuation, its second token wrong every other step
        for p, w in by_prompt.items():
            if tuple(tokens[: len(p)]) == p and len(tokens) - len(p) <= len(w):
                done = len(tokens) - len(p)
                d = list(w[done : done + 3])
                if done % 2 == 0 and len(d) > 1:
                    d[1] = (d[1] + 1) % 256
                return d
        return []

    eng = engine(llm, drafter=oracle)
    outs, _ = eng.generate(prompts, params)
    assert [o.token_ids for o in outs[:5]] == want[:5]
    assert len(outs[5].token_ids) == 10
    m = eng.metrics()
    assert 0 < m.accepted_drafts < m.drafted
    assert eng.kv_blocks_used() == 0
    # Greedy requests alone, room for every draft: about two tokens per pass instead of one.
    steps = []
    for drafter in (None, oracle):
        e = engine(llm, drafter=drafter, max_step_tokens=256)
        outs, _ = e.generate(prompts[:5], GREEDY)
        assert [o.token_ids for o in outs] == want[:5]
        steps.append(e.metrics().steps)
    assert steps[1] < 0.7 * steps[0]
    lookup = engine(llm, drafter=prompt_lookup(ngram=2, k=3))
    outs, _ = lookup.generate(prompts, params)
    assert [o.token_ids for o in outs[:5]] == want[:5]
    assert lookup.metrics().drafted > 0


def test_prompt_lookup():
    """The latest earlier occurrence of the longest matching tail n-gram gives the draft."""
    from ollm.engine.drafting import prompt_lookup

    draft = prompt_lookup(ngram=2, k=3)
    assert draft([1, 2, 3, 4, 9, 1, 2, 3, 7, 2, 3]) == [7, 2, 3]  # "2 3" last seen before 7
    assert draft([5, 6, 7, 8, 6]) == [7, 8, 6]  # no "8 6" earlier: falls back to "6"
    assert draft([1, 2, 3]) == []
    assert draft([4]) == []
