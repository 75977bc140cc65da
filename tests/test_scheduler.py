"""Engine v2 scheduler against a fake runner.

The fake "model" computes, at each position, a full-attention KV value chained from the previous
position's KV (read back through the block table) and a sliding-window KV value from the window's
KV; the next token is a hash of both. So a wrong block table, a lost copy-on-write or swap, a
bad prefix hit or a KV slot that was never written changes the tokens (or fails a read), and
every request must produce exactly the tokens a plain list-based reference gives it alone.
"""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from ollm.engine.scheduler import (
    KVCapacityError,
    Request,
    Scheduler,
    SeqStatus,
    StepPlan,
    by_cost,
)
from ollm.errors import RequestError
from ollm.kv.blocks import BlockManager

B, W, VOCAB, MOD = 4, 6, 50, (1 << 61) - 1


def h(*xs: int) -> int:
    return hash(xs) & MOD  # tuples of ints hash deterministically


def full_kv(prev: int, tok: int) -> int:
    return h(1, prev, tok)


def win_kv(window: list[int], tok: int) -> int:
    return h(2, tok, sum(window) % MOD)


def next_token(fk: int, wk: int) -> int:
    return h(3, fk, wk) % VOCAB


def reference(prompt: tuple[int, ...], max_new: int, eos: frozenset[int]) -> list[int]:
    """The request run alone with plain lists of KV."""
    toks, fk, wk, out = list(prompt), [], [], []
    while True:
        for p in range(len(fk), len(toks)):
            fk.append(full_kv(fk[p - 1] if p else 0, toks[p]))
            wk.append(win_kv(wk[max(0, p - W + 1) : p], toks[p]))
        out.append(next_token(fk[-1], wk[-1]))
        toks.append(out[-1])
        if out[-1] in eos or len(out) == max_new:
            return out


class FakeRunner:
    """Executes a StepPlan over paged fake KV (one value per slot, per KV group)."""

    def __init__(self, sched: Scheduler) -> None:
        self.pools = {
            g: {t: [[None] * B for _ in range(p.num_blocks)] for t, p in m.pools.items()}
            for g, m in sched.kv.items()
        }

    def _slot(self, g: str, table, pos: int) -> tuple[list, int]:
        ref = table[pos // B]
        assert ref is not None, f"{g}: position {pos} is in a released block"
        return self.pools[g][ref.tier][ref.block], pos % B

    def read(self, g: str, table, pos: int) -> int:
        block, off = self._slot(g, table, pos)
        assert block[off] is not None, f"{g}: position {pos} was never written"
        return block[off]

    def write(self, g: str, table, pos: int, val: int) -> None:
        block, off = self._slot(g, table, pos)
        block[off] = val

    def forward(self, plan: StepPlan) -> dict[str, list[int]]:
        """Greedy token after each position whose logits the plan asks for."""
        for g, moves in plan.moves.items():
            for m in moves:
                self.pools[g][m.dst_tier][m.dst_block] = list(
                    self.pools[g][m.src_tier][m.src_block]
                )
        out = {}
        for st in plan.seqs:
            full, win = st.block_tables["full"], st.block_tables["sliding"]
            got = []
            for i, (tok, p) in enumerate(zip(st.token_ids, st.positions, strict=True)):
                fk = full_kv(self.read("full", full, p - 1) if p else 0, tok)
                wk = win_kv(
                    [self.read("sliding", win, j) for j in range(max(0, p - W + 1), p)], tok
                )
                self.write("full", full, p, fk)
                self.write("sliding", win, p, wk)
                if i >= len(st.token_ids) - st.num_logits:
                    got.append(next_token(fk, wk))
            out[st.seq_id] = got
        return out


def verify(greedy: list[int], drafts: tuple[int, ...]) -> list[int]:
    """Greedy speculative verification: accept drafts while they match, then one token."""
    accepted = []
    for i, g in enumerate(greedy):
        accepted.append(g)
        if i == len(drafts) or drafts[i] != g:
            return accepted
    return accepted


def make_scheduler(gpu: int = 64, cpu: int = 64, budget: int = 16, **kw) -> Scheduler:
    kv = {
        "full": BlockManager(B, {"gpu": gpu, "cpu": cpu}, ("gpu",), "cpu"),
        "sliding": BlockManager(B, {"gpu": gpu, "cpu": cpu}, ("gpu",), "cpu", window=W),
    }
    return Scheduler(kv, max_step_tokens=budget, **kw)


def oracle_drafter(rng: random.Random):
    """Proposes up to 3 drafts per decoding sequence, right for a random number of them."""

    def drafts(sched: Scheduler) -> dict[str, list[int]]:
        out = {}
        for sid, s in sched.seqs.items():
            if s.status is SeqStatus.RUNNING and len(s.tokens) - s.num_computed == 1:
                k, right = rng.randint(0, 3), rng.randint(0, 3)
                truth = reference(tuple(s.tokens), k, frozenset())[:k] if k else []
                out[sid] = [t if i < right else (t + 1) % VOCAB for i, t in enumerate(truth)]
        return out

    return drafts


def drive(sched, arrivals, drafter=None, cancels=None, max_steps=3000):
    """Run the loop; returns (tokens per request, finish reason per request, plans)."""
    runner, outs, reasons, plans, step = FakeRunner(sched), defaultdict(list), {}, [], 0
    cancels = cancels or {}
    while step <= max(arrivals, default=0) or sched.has_work():
        for r in arrivals.get(step, []):
            sched.add(r)
        proposed = drafter(sched) if drafter else {}
        plan = sched.schedule(proposed)
        for sid in cancels.get(step, []):  # while the step is in flight: its outputs are dropped
            sched.cancel(sid)
        assert plan.num_tokens <= sched.max_step_tokens
        assert len({s.seq_id for s in plan.seqs}) == len(plan.seqs)
        greedy = runner.forward(plan)
        accepted = {
            st.seq_id: verify(greedy[st.seq_id], st.token_ids[len(st.token_ids) - st.num_draft :])
            for st in plan.seqs
            if st.needs_logits
        }
        for u in sched.update(accepted):
            outs[u.seq_id] += u.new_tokens
            if u.finish_reason:
                reasons[u.seq_id] = u.finish_reason
        for s in sched.seqs.values():  # rejected drafts were trimmed: KV == computed tokens
            if s.status is SeqStatus.RUNNING:
                assert all(t.length == s.num_computed for t in s.tables.values())
        plans.append(plan)
        step += 1
        assert step < max_steps, "no progress"
    return outs, reasons, plans


def assert_no_leaks(sched: Scheduler) -> None:
    for group in sched.usage().values():
        for tier, (used, _) in group.items():
            assert used == 0, (tier, used)


def test_batch_matches_each_request_alone():
    rng = random.Random(0)
    shared = [rng.randrange(VOCAB) for _ in range(17)]
    prompts = [shared + [1, 2], [5, 6, 7], shared + [9] * 9, list(range(30)), shared, [3] * 11,
               [8, 1], shared + [4]]  # fmt: skip
    steps = [0, 0, 0, 2, 3, 5, 5, 9]
    reqs = [
        Request(f"r{i}", tuple(p), 5 + i, 0, frozenset({7}), ("greedy", f"r{i}"))
        for i, p in enumerate(prompts)
    ]
    arrivals = defaultdict(list)
    for r, s in zip(reqs, steps, strict=True):
        arrivals[s].append(r)
    sched = make_scheduler()
    outs, reasons, plans = drive(sched, arrivals, oracle_drafter(random.Random(1)))
    for r in reqs:
        assert outs[r.id] == reference(r.prompt, r.max_new_tokens, r.eos_token_ids), r.id
        assert reasons[r.id] == ("stop" if outs[r.id][-1] == 7 else "length")
    # Prefill chunks shared steps with decodes, and later prompts reused the shared prefix.
    assert any(
        any(len(s.token_ids) > 1 and not s.num_draft for s in p.seqs)
        and any(s.start >= len(prompts[int(s.seq_id[1:])]) for s in p.seqs)
        for p in plans
    )
    assert any(s.num_draft for p in plans for s in p.seqs)
    assert sched.prefix_hits >= 1
    assert all(s.sampling == ("greedy", s.seq_id) for p in plans for s in p.seqs)
    assert_no_leaks(sched)


def test_prefix_hit_prefills_only_the_tail():
    rng = random.Random(2)
    prompt = tuple(rng.randrange(VOCAB) for _ in range(19))
    sched = make_scheduler()
    a = Request("a", prompt, 30)
    b = Request("b", prompt[:17] + (11, 12, 13), 4)
    outs, _, plans = drive(sched, {0: [a], 6: [b]})  # a is still decoding when b arrives
    b_steps = [s for p in plans for s in p.seqs if s.seq_id == "b"]
    assert b_steps[0].start == 16  # 4 full blocks adopted
    assert sum(len(s.token_ids) for s in b_steps if s.start < len(b.prompt)) == len(b.prompt) - 16
    assert (sched.prefix_hits, sched.prefix_saved_tokens) == (1, 16)
    assert outs["b"] == reference(b.prompt, 4, frozenset())
    assert outs["a"] == reference(a.prompt, 30, frozenset())
    assert_no_leaks(sched)


@pytest.mark.parametrize("policy", ["swap", "recompute"])
def test_preemption_and_cancellation_leak_nothing(policy):
    rng = random.Random(3)
    sched = make_scheduler(gpu=14, cpu=40, budget=12, preemption=lambda info: policy)
    low = [
        Request(f"l{i}", tuple(rng.randrange(VOCAB) for _ in range(10 + i)), 12) for i in range(4)
    ]
    high = Request("high", tuple(rng.randrange(VOCAB) for _ in range(9)), 10, priority=-1)
    doomed = [Request("c-run", (1, 2, 3), 40), Request("c-wait", (4, 5), 40, priority=5)]
    arrivals = {0: low + doomed, 6: [high]}
    outs, reasons, plans = drive(sched, arrivals, cancels={4: ["c-run", "c-wait"]})
    assert sched.num_preemptions > 0
    for r in [*low, high]:
        assert outs[r.id] == reference(r.prompt, r.max_new_tokens, frozenset()), r.id
    assert "c-run" not in reasons and "c-wait" not in reasons
    swaps = sum(m.src_tier != m.dst_tier for p in plans for ms in p.moves.values() for m in ms)
    assert (swaps > 0) == (policy == "swap")
    # The high-priority request, once admitted, ran every step until it finished.
    ran = [any(s.seq_id == "high" for s in p.seqs) for p in plans]
    first, last = ran.index(True), len(ran) - 1 - ran[::-1].index(True)
    assert all(ran[first : last + 1])
    assert_no_leaks(sched)


def test_admission_errors_name_the_limit():
    sched = make_scheduler(gpu=10)
    with pytest.raises(KVCapacityError, match="at most 40 tokens"):
        sched.add(Request("big", tuple(range(30)), 20))
    sched.add(Request("ok", tuple(range(30)), 10))
    with pytest.raises(RequestError, match="already queued"):
        sched.add(Request("ok", (1,), 1))
    with pytest.raises(RequestError, match="empty prompt"):
        sched.add(Request("empty", (), 1))


def test_cost_policy_weighs_swap_against_recompute():
    from ollm.engine.scheduler import PreemptionInfo

    policy = by_cost(block_bytes=1 << 20, link_bytes_per_s=1e9, recompute_tokens_per_s=1e4)
    assert policy(PreemptionInfo("a", num_tokens=4096, num_blocks=16)) == "swap"
    assert policy(PreemptionInfo("a", num_tokens=16, num_blocks=1000)) == "recompute"


@pytest.mark.parametrize("seed", range(60))
def test_random_workloads_match_the_reference(seed):
    rng = random.Random(seed)
    stem = [rng.randrange(VOCAB) for _ in range(rng.randint(4, 24))]
    reqs, arrivals, cancels = [], defaultdict(list), defaultdict(list)
    for i in range(rng.randint(5, 12)):
        body = stem[: rng.randint(0, len(stem))] if rng.random() < 0.6 else []
        prompt = tuple(body + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))])
        r = Request(f"s{i}", prompt, rng.randint(1, 14), rng.randint(-1, 2), frozenset({3}))
        reqs.append(r)
        arrivals[rng.randint(0, 8)].append(r)
        if rng.random() < 0.2:
            cancels[rng.randint(0, 20)].append(r.id)
    alone = max(-(-(len(r.prompt) + r.max_new_tokens) // B) for r in reqs)
    sched = make_scheduler(
        gpu=alone + rng.randint(0, 6),  # tight: often room for one or two requests only
        cpu=rng.choice([0, 8, 64]),
        budget=rng.randint(1, 24),
        max_running=rng.randint(1, 8),
        preemption=rng.choice([lambda i: "swap", lambda i: "recompute"]),
    )
    check_run(sched, reqs, arrivals, oracle_drafter(rng) if seed % 2 else None, cancels)


def check_run(sched, reqs, arrivals, drafter, cancels) -> None:
    """Drive ``sched`` through ``arrivals`` (and ``cancels``): every request not cancelled
    gives the reference's tokens, and no block is left referenced."""
    outs, reasons, _ = drive(sched, arrivals, drafter, cancels)
    cancelled = {sid for ids in cancels.values() for sid in ids}
    for r in reqs:
        if r.id in reasons:
            assert outs[r.id] == reference(r.prompt, r.max_new_tokens, r.eos_token_ids), r.id
        else:
            assert r.id in cancelled, r.id
    assert_no_leaks(sched)


def test_swapped_sequences_sharing_blocks_do_not_block_a_better_one():
    """Two sequences sharing prefix blocks are both swapped out; the shared blocks stay on the
    device (neither owns them alone). A better request that needs the whole device must still
    make them give those blocks up, or it waits forever."""
    rng = random.Random(4)
    p = tuple(rng.randrange(VOCAB) for _ in range(9))
    a = Request("a", p, 20)
    b = Request("b", p[:8] + (1, 2, 3), 20)
    top = Request("top", tuple(rng.randrange(VOCAB) for _ in range(24)), 8, priority=-1)
    sched = make_scheduler(gpu=8, cpu=64, budget=16, preemption=lambda info: "swap")
    outs, _, plans = drive(sched, {0: [a], 1: [b], 3: [top]})
    assert sched.prefix_hits == 1 and sched.num_preemptions >= 2
    for r in (a, b, top):
        assert outs[r.id] == reference(r.prompt, r.max_new_tokens, frozenset()), r.id
    assert_no_leaks(sched)


def test_an_aborted_step_is_recomputed_without_leaks():
    rng = random.Random(5)
    reqs = [
        Request(f"x{i}", tuple(rng.randrange(VOCAB) for _ in range(6 + 5 * i)), 6) for i in range(3)
    ]
    sched = make_scheduler(gpu=12, budget=8)
    for r in reqs:
        sched.add(r)
    runner, outs = FakeRunner(sched), defaultdict(list)
    step = 0
    while sched.has_work():
        plan = sched.schedule()
        if step in (2, 5):  # the runner "fails" halfway: only some moves and writes happened
            runner.forward(StepPlan(plan.seqs[:1], plan.moves, plan.preempted))
            assert set(sched.abort_step()) >= {s.seq_id for s in plan.seqs}
        else:
            greedy = runner.forward(plan)
            for u in sched.update(
                {s.seq_id: greedy[s.seq_id] for s in plan.seqs if s.needs_logits}
            ):
                outs[u.seq_id] += u.new_tokens
        step += 1
        assert step < 500
    for r in reqs:
        assert outs[r.id] == reference(r.prompt, r.max_new_tokens, frozenset()), r.id
    assert_no_leaks(sched)
