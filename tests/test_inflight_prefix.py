"""In-step adoption (issue 13): requests admitted in the same step as the request that computes
their common prefix adopt its blocks (offered while the step is planned, `engine/step_builder.py`)
instead of waiting a step for them to be keyed.

Against the scheduler's fake runner (`test_scheduler`: a wrong or unwritten slot changes the
tokens or fails a read): tokens equal each request alone, one step fewer than prefilling the
first request alone, a writer cancelled while its step runs, an aborted step, a writer
preempted before anyone adopted from it (its offer withdrawn) and one that may no longer be
preempted once adopted from; random workloads with same-step arrivals. Through the real runner
(tiny random-weight models): every family, KV in device / RAM / disk tiers, a writer whose
prompt spans several steps, failure, cancellation and preemption; pool counters back to zero.
"""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
import torch

from conftest import FAMILIES
from ollm.engine.scheduler import Request, SeqStatus, StepPlan
from ollm.engine.step_builder import StepBuilder
from test_batch_codec import coded  # noqa: F401 - a fixture
from test_batch_engine import GREEDY, alone, engine, llms  # noqa: F401 - llms is a fixture
from test_batch_tiers import engine as tier_engine
from test_batch_tiers import spread
from test_scheduler import (
    VOCAB,
    B,
    FakeRunner,
    assert_no_leaks,
    check_run,
    drive,
    make_scheduler,
    oracle_drafter,
    reference,
)
from test_shared_prefill import group_sizes
from test_shared_prefix import after_first

# -- the scheduler against the fake runner ---------------------------------------------------


def shared_requests(n: int, head: int, seed: int = 0, max_new: int = 5) -> list[Request]:
    """``n`` requests whose first ``head`` tokens are the same, 1 + i tokens of their own."""
    rng = random.Random(seed)
    stem = [rng.randrange(VOCAB) for _ in range(head)]
    return [
        Request(f"r{i}", tuple(stem + [rng.randrange(VOCAB) for _ in range(1 + i)]), max_new)
        for i in range(n)
    ]


def check(reqs, outs) -> None:
    for r in reqs:
        assert outs[r.id] == reference(r.prompt, r.max_new_tokens, r.eos_token_ids), r.id


def test_same_step_admissions_adopt_blocks_computed_in_that_step():
    reqs = shared_requests(4, 17)  # 4 full blocks of B = 4 shared
    sched = make_scheduler(budget=64)
    outs, _, plans = drive(sched, {0: reqs})
    check(reqs, outs)
    first = {s.seq_id: s for s in plans[0].seqs}
    assert set(first) == {r.id for r in reqs}  # one step admits them all
    assert first["r0"].start == 0 and all(first[f"r{i}"].start == 16 for i in (1, 2, 3))
    assert (sched.prefix_hits, sched.inflight_hits, sched.prefix_saved_tokens) == (3, 3, 48)
    assert_no_leaks(sched)
    # Today's flow (the first request one step ahead) takes one step more.
    before = make_scheduler(budget=64)
    outs2, _, plans2 = drive(before, {0: reqs[:1], 1: reqs[1:]})
    check(reqs, outs2)
    assert before.inflight_hits == 0 and len(plans2) == len(plans) + 1


def test_a_writer_spanning_steps_offers_the_blocks_of_its_last_chunk():
    reqs = shared_requests(3, 28)  # 7 blocks shared; the first prompt is 29 tokens
    sched = make_scheduler(budget=12)
    outs, _, plans = drive(sched, {0: reqs})
    check(reqs, outs)
    # Steps 0 and 1 carry 12 of r0's tokens each; step 2 its last 5 and r1's tail over 6
    # blocks keyed after steps 0-1 and block 6, which r0 fills in step 2.
    assert [len(s.token_ids) for s in plans[0].seqs] == [12]
    got = {s.seq_id: (s.start, len(s.token_ids)) for s in plans[2].seqs}
    assert got["r0"] == (24, 5) and got["r1"] == (28, 2)
    assert sched.inflight_hits >= 1
    assert_no_leaks(sched)


def test_a_writer_cancelled_while_its_step_runs():
    """Its adopters keep the blocks (the step still computes them) and key them afterwards:
    a later request with the prefix finds them cached."""
    reqs = shared_requests(3, 17)
    late = shared_requests(4, 17)[3]
    sched = make_scheduler(budget=64)
    outs, reasons, plans = drive(sched, {0: reqs, 3: [late]}, cancels={0: ["r0"]})
    assert "r0" not in reasons
    check([*reqs[1:], late], outs)
    late_first = next(s for p in plans for s in p.seqs if s.seq_id == late.id)
    assert late_first.start == 16 and sched.inflight_hits == 2
    assert_no_leaks(sched)


def test_an_aborted_step_leaves_no_adopted_block_behind():
    reqs = shared_requests(4, 17)
    sched = make_scheduler(budget=64)
    for r in reqs:
        sched.add(r)
    runner = FakeRunner(sched)
    plan = sched.schedule()
    assert sched.inflight_hits == 3
    runner.forward(StepPlan(plan.seqs[:1], plan.moves, plan.preempted))  # fails after r0
    assert set(sched.abort_step()) == {r.id for r in reqs}
    assert_no_leaks(sched)
    keys = sched.seqs["r0"].keys
    for m in sched.kv.values():  # nothing was keyed: the offers were never registered
        assert all(p.lookup(k) is None for p in m.pools.values() for k in keys)
        assert not m._inflight
    outs = defaultdict(list)
    while sched.has_work():
        plan = sched.schedule()
        greedy = runner.forward(plan)
        for u in sched.update({s.seq_id: greedy[s.seq_id] for s in plan.seqs if s.needs_logits}):
            outs[u.seq_id] += u.new_tokens
    check(reqs, outs)
    assert_no_leaks(sched)


def _builder_after_first_chunk(budget: int = 8):
    """A scheduler whose ``w`` (priority 5) computed its first ``budget`` tokens of 20, and a
    fresh step builder for the next step with ``w`` scheduled (it fills blocks 2 and 3)."""
    sched = make_scheduler(gpu=8, budget=budget)
    w = shared_requests(1, 19, seed=1)[0]
    sched.add(Request("w", w.prompt, 4, priority=5))
    runner = FakeRunner(sched)
    plan = sched.schedule()
    runner.forward(plan)
    sched.update({})
    assert plan.seqs[0].num_logits == 0
    a = Request("a", w.prompt[:16] + (1, 2), 4, priority=1)
    sched.add(a)
    step = StepBuilder(sched, {}, {})
    step.run(sched.seqs["w"])
    assert len(sched.kv["full"]._inflight) == 2 and step.offered["w"]
    return sched, step, runner


def finish(sched, step, runner) -> dict:
    """Plan ``step`` (as ``schedule()`` ends), run it and every later step: tokens per id."""
    for m in sched.kv.values():
        m.clear_inflight()
    sched._inflight = step.plan()
    outs = defaultdict(list)
    while True:
        greedy = runner.forward(sched._inflight)
        for u in sched.update(
            {s.seq_id: greedy[s.seq_id] for s in sched._inflight.seqs if s.needs_logits}
        ):
            outs[u.seq_id] += u.new_tokens
        if not sched.has_work():
            return outs
        sched.schedule()


def test_a_writer_preempted_before_adoption_withdraws_its_offer():
    sched, step, runner = _builder_after_first_chunk()
    step._preempt(sched.seqs["w"])
    assert not step.offered and all(not m._inflight for m in sched.kv.values())
    assert step.admit(sched.seqs["a"])
    assert sched.seqs["a"].num_computed == 8  # the 2 blocks keyed last step, not the offered
    assert sched.inflight_hits == 0
    reqs = [s.request for s in sched.seqs.values()]
    check(reqs, finish(sched, step, runner))
    assert_no_leaks(sched)


def test_an_adopted_writer_is_not_preempted_in_that_step():
    sched, step, runner = _builder_after_first_chunk()
    assert step.admit(sched.seqs["a"])
    assert sched.seqs["a"].num_computed == 16 and step.pinned == {"w"}
    # x: after a (admissions go in order), better than w, and short of blocks
    sched.add(Request("x", (7,) * 6, 2, priority=3))
    assert not step._preempt_below(sched.seqs["x"])  # w is the only worse one: kept
    assert sched.seqs["w"].status is SeqStatus.RUNNING
    reqs = [s.request for s in sched.seqs.values()]
    check(reqs, finish(sched, step, runner))  # w's rows first: a's adopted blocks written
    assert_no_leaks(sched)


def random_case(seed: int) -> int:
    """A random workload, most requests over one stem, most arriving in the first step (tight
    pools, cancels in flight, drafts on odd seeds): checked against the reference; returns the
    scheduler's in-step adoptions."""
    rng = random.Random(100 + seed)
    stem = [rng.randrange(VOCAB) for _ in range(rng.randint(4, 30))]
    reqs, arrivals, cancels = [], defaultdict(list), defaultdict(list)
    for i in range(rng.randint(3, 10)):
        body = stem[: rng.randint(len(stem) // 2, len(stem))] if rng.random() < 0.8 else []
        prompt = tuple(body + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))])
        r = Request(f"s{i}", prompt, rng.randint(1, 8), rng.randint(-1, 1), frozenset({3}))
        reqs.append(r)
        arrivals[rng.choice([0, 0, 0, 1, 2])].append(r)
        if rng.random() < 0.15:
            cancels[rng.randint(0, 4)].append(r.id)
    alone_blocks = max(-(-(len(r.prompt) + r.max_new_tokens) // B) for r in reqs)
    sched = make_scheduler(
        gpu=alone_blocks + rng.randint(0, 12),
        cpu=rng.choice([0, 16, 64]),
        budget=rng.randint(4, 48),
        max_running=rng.randint(1, 8),
        preemption=rng.choice([lambda i: "swap", lambda i: "recompute"]),
    )
    check_run(sched, reqs, arrivals, oracle_drafter(rng) if seed % 2 else None, cancels)
    return sched.inflight_hits


@pytest.mark.parametrize("seed", range(40))
def test_random_same_step_arrivals_match_the_reference(seed):
    random_case(seed)


def test_random_workloads_do_adopt_in_step():
    assert sum(random_case(seed) > 0 for seed in range(40)) >= 15  # 21 of the 40


# -- through the real runner -----------------------------------------------------------------


def head_prompts(n: int = 5, seed: int = 11, head: int = 40) -> list[list[int]]:
    """``n`` prompts over one ``head``-token prefix (5 blocks of 8), 2 + i tokens of their own."""
    g = torch.Generator().manual_seed(seed)
    stem = torch.randint(0, 256, (head,), generator=g).tolist()
    return [stem + torch.randint(0, 256, (2 + i,), generator=g).tolist() for i in range(n)]


def run_at_once(eng, prompts):
    ids = [eng.add(p, GREEDY) for p in prompts]
    eng.run()
    return [eng.finished[r].token_ids for r in ids]


def blocks_cached(eng) -> int:
    return sum(p.num_cached for m in eng.scheduler.kv.values() for p in m.pools.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_same_step_prefix_matches_alone(family, llms):  # noqa: F811
    llm = llms(family)
    prompts = head_prompts()
    want = alone(llm, prompts)
    eng = engine(llm)
    assert run_at_once(eng, prompts) == want
    m = eng.metrics()
    assert eng.scheduler.inflight_hits == 4 and m.prefix_hits == 4
    assert m.prefix_saved_tokens == 4 * 40
    assert eng.kv_blocks_used() == 0
    old, ids = after_first(llm, prompts)  # the first prompt a step ahead: one step more
    assert [old.finished[r].token_ids for r in ids] == want
    assert old.scheduler.inflight_hits == 0 and old.steps == eng.steps + 1
    eng.close()
    old.close()


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt_oss"])
def test_engine_same_step_prefix_in_ram_and_disk(family, llms, tmp_path):  # noqa: F811
    """Layer i's KV in the device / RAM / disk tier (``i % 3``), as test_batch_tiers."""
    llm = llms(family)
    prompts = head_prompts(seed=12)
    want = alone(llm, prompts)
    eng = tier_engine(spread(llm), tmp_path / "kv")
    assert {h for s in eng.pools.stores.values() for h in s} == {"device", "ram", "disk"}
    assert run_at_once(eng, prompts) == want
    assert eng.scheduler.inflight_hits == 4 and eng.kv_blocks_used() == 0
    eng.close()


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_engine_writer_prompt_over_several_steps(family, llms):  # noqa: F811
    """16 query tokens a step: the first prompt (42 tokens) takes three steps; the others adopt
    its cached blocks and the one it fills in its last step."""
    llm = llms(family)
    prompts = head_prompts(seed=13)
    want = alone(llm, prompts)
    eng = engine(llm, max_step_tokens=16)
    assert run_at_once(eng, prompts) == want
    assert eng.scheduler.inflight_hits >= 1 and eng.kv_blocks_used() == 0
    eng.close()


def test_engine_failed_and_cancelled_in_step_adoption(llms, monkeypatch):  # noqa: F811
    """The forward of the adopting step fails: writer and adopters recompute, nothing stays
    referenced or keyed; then the writer is cancelled after the step its prefix was adopted in:
    the adopters keep their tokens; every block comes back."""
    llm = llms("qwen2")
    prompts = head_prompts(seed=14)
    want = alone(llm, prompts)
    forward, calls = llm.runner.forward, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("weight read failed")
        return forward(*a, **k)

    monkeypatch.setattr(llm.runner, "forward", flaky)
    eng = engine(llm)
    ids = [eng.add(p, GREEDY) for p in prompts]
    with pytest.raises(OSError):
        eng.step()
    assert eng.scheduler.inflight_hits == 4
    assert eng.kv_blocks_used() == 0 and blocks_cached(eng) == 0
    eng.step()  # again, now through
    assert eng.scheduler.inflight_hits == 8
    assert eng.cancel(ids[0]) and eng.cancel(ids[3])
    eng.run()
    for i in (1, 2, 4):
        assert eng.finished[ids[i]].token_ids == want[i]
    assert eng.kv_blocks_used() == 0
    eng.close()


@pytest.mark.parametrize("swap", [0, 96])
def test_engine_preemption_with_in_step_adoption(swap, llms):  # noqa: F811
    """Pools too small for every request at once (swap, or recompute when there is no swap):
    preempted sequences, writers and adopters alike, still give their tokens alone."""
    llm = llms("llama")
    prompts = head_prompts(8, seed=15, head=48)
    want = alone(llm, prompts)
    eng = engine(llm, max_batch=2, max_context=80, swap_tokens=swap)
    assert run_at_once(eng, prompts) == want
    assert eng.metrics().preemptions > 0 and eng.scheduler.inflight_hits > 0
    assert eng.kv_blocks_used() == 0
    eng.close()


def test_engine_groups_the_tails_beside_their_writer(llms, monkeypatch):  # noqa: F811
    """The step computing the prefix attends the four adopters' tails as one prefill group
    over it (`kv/shared_prefill.py`; the writer, whose queries start at 0, is not a member)."""
    llm = llms("llama")
    prompts = head_prompts(seed=16)
    want = alone(llm, prompts)
    calls = group_sizes(monkeypatch)
    eng = engine(llm)
    ids = [eng.add(p, GREEDY) for p in prompts]
    eng.step()
    assert calls and set(calls) == {4}  # every layer: one group of the four tails
    eng.run()
    assert [eng.finished[r].token_ids for r in ids] == want
    eng.close()


@pytest.mark.parametrize("step_tokens", [256, 64])
def test_encoded_pools_adopt_in_step(step_tokens, coded, tmp_path):  # noqa: F811
    """Encoded RAM and disk pools (`kv/codec_paged.py`: a block is encoded in the call whose
    rows fill it): four requests over a 96-token document, submitted at once, give the tokens
    of the run without prefix sharing, in one step (256 query tokens) or with the writer's
    prompt over two (64)."""
    from test_batch_codec import engine as codec_engine
    from test_batch_codec import host_runner

    _, llm = coded
    g = torch.Generator().manual_seed(21)
    doc = torch.randint(0, 256, (96,), generator=g).tolist()
    asks = [doc + torch.randint(0, 256, (5 + i,), generator=g).tolist() for i in range(4)]
    runner = host_runner(llm)
    plain = codec_engine(runner, tmp_path / "a", prefix_caching=False)
    want = [plain.generate([p], GREEDY)[0][0].token_ids for p in asks]
    plain.close()
    eng = codec_engine(runner, tmp_path / "b", max_step_tokens=step_tokens)
    assert run_at_once(eng, asks) == want
    assert eng.scheduler.inflight_hits >= 1 and eng.kv_blocks_used() == 0
    eng.close()
