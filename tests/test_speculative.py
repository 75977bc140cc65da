"""Speculative decoding (issue 15): greedy output equals plain decoding for every family and
drafter; sampled output follows the target's distribution (chi-square, seeded); the adaptive
draft length; ``speculate`` routed through the config, ``LLM`` and the CLI."""

from __future__ import annotations

import math
import time

import pytest
import torch

from conftest import FAMILIES, make_hf_model
from ollm import LLM, SamplingParams
from ollm.engine.batch import BatchEngine
from ollm.engine.drafting import (
    CallableDrafter,
    Draft,
    DraftRequest,
    LookupDrafter,
    ModelDrafter,
    self_draft_runner,
)
from ollm.engine.sampling import Sampler, probabilities
from ollm.engine.speculative import (
    MAX_CHAIN,
    MAX_DRAFT,
    AdaptiveK,
    Speculator,
    build_speculator,
    expected_tokens,
    verify,
)
from ollm.errors import OllmError

GREEDY = SamplingParams(temperature=0, max_new_tokens=12)
ALPHA = 1e-3  # chi-square p-value threshold, fixed before looking at any result


def open_llm(path, cache, **kw) -> LLM:
    return LLM(path, device="cpu", max_context=128, prefill_chunk=32, cache_dir=cache,
               progress=False, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def draft_llm(tmp_path_factory):
    """A second tiny random model (Llama, other seed) with the same 256-token vocabulary."""
    d = tmp_path_factory.mktemp("draft")
    make_hf_model("llama", d / "hf", seed=7)
    llm = open_llm(d / "hf", d / "cache")
    yield llm
    llm.close()


def prompts() -> list[list[int]]:
    """A repetitive prompt (lookup finds n-grams), a random one and a short one."""
    g = torch.Generator().manual_seed(5)
    rep = torch.randint(0, 256, (9,), generator=g).tolist()
    return [rep * 4, torch.randint(0, 256, (30,), generator=g).tolist(), [3, 1, 4]]


def engine(llm: LLM, drafter=None) -> BatchEngine:
    return BatchEngine(llm.runner, None, (), block_tokens=8, max_batch=4, max_context=128,
                       max_step_tokens=64, drafter=drafter)  # fmt: skip


def run(llm: LLM, drafter, ps, params=GREEDY):
    eng = engine(llm, drafter)
    outs, _ = eng.generate(ps, params)
    assert eng.kv_blocks_used() == 0  # rejected drafts trimmed, everything freed
    return [o.token_ids for o in outs], eng.metrics()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_identical_every_drafter(family, hf_models, draft_llm, tmp_path):
    """Greedy tokens with each drafter (lookup, self-speculation over 2 layers, a draft model,
    the target itself as its own draft) equal plain decoding's; the self-copy accepts every
    draft, so it makes more than one token per target pass."""
    _, path = hf_models(family)
    with open_llm(path, tmp_path) as llm:
        ps = prompts()
        plain, _ = run(llm, None, ps)
        assert plain == [llm.generate(p, GREEDY).token_ids for p in ps]
        ctx = (4, 128)
        spec = {
            "lookup": build_speculator("lookup", llm.runner, *ctx),
            "self:2": build_speculator("self:2", llm.runner, *ctx),
            "draft": build_speculator("draft:tiny", llm.runner, *ctx, draft_llm.runner),
            "copy": build_speculator("draft:copy", llm.runner, *ctx, llm.runner),
        }
        # The copy drafts as slowly as the target verifies: its adaptive length depends on the
        # machine's load (a busy CPU timed it down to a few drafts). Fixed, it must accept all.
        spec["copy"].k = 4
        for name, s in spec.items():
            toks, m = run(llm, s, ps)
            s.close()
            assert toks == plain, name
            assert m.drafter == s.stats.drafter and m.drafted > 0, name
        assert spec["copy"].stats.acceptance_rate == 1.0
        assert spec["copy"].stats.tokens_per_pass > 1.5


def exact_law(llm: LLM, prompt: list[int], params: SamplingParams) -> dict[tuple, float]:
    """P(t1, t2, t3) of the target with ``params``, from teacher-forced log-probabilities."""

    def rows(ids: list[int]) -> torch.Tensor:  # filtered distributions after each position
        lp = torch.cat(list(llm.logprob_chunks(ids)))
        return probabilities(params, lp)  # log-softmax differs from logits by a constant

    law = {}
    p1 = rows(prompt + [0])[-1]
    for t1 in torch.nonzero(p1).flatten().tolist():
        p2 = rows(prompt + [t1, 0])[-1]
        for t2 in torch.nonzero(p2).flatten().tolist():
            p3 = rows(prompt + [t1, t2, 0])[-1]
            for t3 in torch.nonzero(p3).flatten().tolist():
                law[(t1, t2, t3)] = float(p1[t1] * p2[t2] * p3[t3])
    return law


def chi_square_p(counts: dict[tuple, int], law: dict[tuple, float], n: int) -> float:
    """Pearson's test of ``counts`` against ``law``: cells expecting < 5 pooled into one;
    p-value = Q(df / 2, X^2 / 2), the chi-square survival function; 0 when a sequence the
    law cannot produce was seen."""
    if not set(counts) <= set(law):
        return 0.0
    stat, pool_o, pool_e, cells = 0.0, 0, 0.0, 0
    for cell, p in law.items():
        e, o = n * p, counts.get(cell, 0)
        if e < 5:
            pool_o, pool_e = pool_o + o, pool_e + e
            continue
        stat += (o - e) ** 2 / e
        cells += 1
    if pool_e > 0:
        stat += (pool_o - pool_e) ** 2 / pool_e
        cells += 1
    df = torch.tensor((cells - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, torch.tensor(stat / 2, dtype=torch.float64)))


def test_sampling_distribution_chi_square(hf_models, tmp_path):
    """2000 seeded samples of the first three tokens (temperature, top-k and top-p all on)
    drafted 2 at a time by a draft model (the target's first 3 of 4 layers and its head: its
    own q, close enough to p that drafts are accepted and rejected) and by a fixed
    deterministic drafter (one-hot q) follow the target's exact law; the draft's own law is
    rejected by the same test (it has power)."""
    _, path = hf_models("llama")
    n, prompt = 2000, [11, 22, 33, 44, 55, 66, 77, 88, 99]
    params = [
        SamplingParams(temperature=1.3, top_k=4, top_p=0.95, seed=i, max_new_tokens=4)
        for i in range(n)
    ]
    pools = dict(block_tokens=8, max_batch=64, max_context=32, max_step_tokens=1024)
    with LLM(path, device="cpu", max_context=32, cache_dir=tmp_path, progress=False) as llm:
        law = exact_law(llm, prompt, params[0])
        guess = max(law, key=law.get)  # the target's likeliest (t1, t2, t3)
        sub = self_draft_runner(llm.runner, 3)
        drafters = {
            "draft model": ModelDrafter(BatchEngine(sub, None, (), **pools)),
            "fixed": CallableDrafter(lambda toks: list(guess[len(toks) - len(prompt) :])),
        }
        for name, d in drafters.items():
            eng = BatchEngine(llm.runner, None, (), **pools, drafter=Speculator(d, k=2))
            outs, _ = eng.generate([prompt] * n, params)
            counts: dict[tuple, int] = {}
            for o in outs:
                cell = tuple(o.token_ids[:3])
                counts[cell] = counts.get(cell, 0) + 1
            m = eng.metrics()
            assert 0 < m.accepted_drafts < m.drafted, name  # both branches taken
            assert set(counts) <= set(law), name  # nothing the target cannot produce
            assert chi_square_p(counts, law, n) > ALPHA, name
        q_law = exact_law(_Prefix(llm, sub), prompt, params[0])
        assert chi_square_p(counts, q_law, n) < ALPHA


class _Prefix:
    """``logprob_chunks`` of a runner (here the self-draft) for `exact_law`."""

    def __init__(self, llm: LLM, runner) -> None:
        self.llm, self.runner = llm, runner

    def logprob_chunks(self, ids: list[int]):
        kv = self.runner.new_kv(1, 64)
        x = torch.tensor([ids[:-1]])
        logits = self.runner.forward(x, torch.arange(x.shape[1])[None], kv, all_logits=True)
        yield torch.log_softmax(logits[0], dim=-1)


def test_verify_single_step_law():
    """One position, vocabulary 5: the token after verification is distributed as p whatever
    q is (rejection sampling), with a model draft and a deterministic one."""
    p_logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=1.0, seed=0)
    p = probabilities(params, p_logits[:1])[0]
    q = torch.tensor([0.1, 0.6, 0.1, 0.1, 0.1])
    sampler, gen = Sampler(params), torch.Generator().manual_seed(1)
    n = 4000
    for qx in (q, None):
        counts = torch.zeros(5)
        for _ in range(n):
            x = int(torch.multinomial(q, 1, generator=gen)) if qx is not None else 1
            toks = verify(sampler, p_logits, [x], None if qx is None else qx[None])
            counts[toks[0]] += 1
        stat = float(((counts - n * p) ** 2 / (n * p)).sum())
        assert float(torch.special.gammaincc(torch.tensor(2.0), torch.tensor(stat / 2))) > ALPHA


def test_verify_greedy():
    """Greedy: drafts kept while each equals the argmax, then the argmax (correction or bonus)."""
    logits = torch.full((3, 6), -5.0)
    logits[0, 2] = logits[1, 4] = logits[2, 1] = 5.0
    s = Sampler(SamplingParams(temperature=0))
    assert verify(s, logits, [2, 4], None) == [2, 4, 1]
    assert verify(s, logits, [2, 3], None) == [2, 4]
    assert verify(s, logits, [0, 4], None) == [2]


def test_adaptive_k():
    """k grows with the acceptance rate (a = 0.9: 32 with flat costs, where E(k) / cost(k + 1)
    peaks at k = 3 for cost(n) = 0.1 + 0.1 n), shrinks as extra query rows cost more, reaches 0
    (with a periodic probe of 1) when drafts are never accepted."""
    assert expected_tokens(0.0, 5) == 1.0
    assert math.isclose(expected_tokens(0.5, 2), 1.75)
    assert expected_tokens(1.0, 3) == 4.0
    flat, steep = AdaptiveK(), AdaptiveK()
    for n in (1, 2, 4, 8, 1, 3):
        flat.observe_pass(n, 1.0)  # streamed weights: a pass costs the same for any rows
        steep.observe_pass(n, 0.1 + 0.1 * n)  # compute bound: every row costs
    for pol in (flat, steep):
        for _ in range(20):
            pol.observe_accept("good", 10, 9)
            pol.observe_accept("bad", 4, 0)
    assert flat.choose("good") == flat.max_k == MAX_CHAIN  # 32: the fit says rows are free
    assert AdaptiveK().choose("new") == MAX_DRAFT  # 8 while no pass cost was measured
    assert steep.choose("good") == 3
    ks = [steep.choose("bad") for _ in range(2 * steep.probe)]
    assert ks.count(1) == 2 and set(ks) == {0, 1}
    assert steep.choose("good", batch=8) < steep.choose("good")  # c0 shared: rows cost more


def test_self_draft_runner_limits(hf_models, tmp_path):
    """A self-draft is the first N layers of the target with its head: refused for N out of
    range; its forward equals the target's own first layers (same weights, one pass)."""
    _, path = hf_models("qwen2")
    with open_llm(path, tmp_path) as llm:
        with pytest.raises(ValueError):
            self_draft_runner(llm.runner, 0)
        with pytest.raises(ValueError):
            self_draft_runner(llm.runner, llm.spec.num_layers)
        sub = self_draft_runner(llm.runner, 2)
        assert sub.spec.num_layers == 2 and sub.prefetcher is llm.runner.prefetcher


def test_lookup_drafter_and_metrics(hf_models, tmp_path):
    """Lookup proposes what followed the last n-gram; the engine reports acceptance, tokens per
    pass and the drafter's share of time."""
    d = LookupDrafter(ngram=2)
    got = d.propose({"a": DraftRequest([1, 2, 3, 1, 2], 2, GREEDY)})
    assert got == {"a": Draft([3, 1])}
    _, path = hf_models("llama")
    with open_llm(path, tmp_path) as llm:
        _, m = run(llm, LookupDrafter(), prompts()[:1])
        assert m.drafter == "lookup" and m.tokens_per_pass >= 1.0
        assert 0.0 <= m.acceptance_rate <= 1.0 and 0.0 <= m.drafter_share < 1.0


def test_llm_speculate_routes_single_prompt(hf_models, tmp_path):
    """``LLM(speculate=...)`` runs even one prompt through the batch engine with drafts; the
    greedy text is plain decoding's. Bad values are refused at construction."""
    _, path = hf_models("gemma3_text")
    p = prompts()[0]
    with open_llm(path, tmp_path) as plain:
        want = plain.generate(p, GREEDY).token_ids
    for kind in ("auto", "self:1"):
        with open_llm(path, tmp_path, speculate=kind) as llm:
            assert llm.generate(p, GREEDY).token_ids == want
            assert llm.last_speculation is not None and llm.last_speculation.verify_passes > 0
    for bad in ("on", "self:0", "draft:", "lookup:3"):
        with pytest.raises(OllmError):
            open_llm(path, tmp_path, speculate=bad)


def test_cli_speculate(hf_models, tmp_path, monkeypatch):
    """``ollm run --speculate lookup`` passes the setting to the engine and reports it."""
    from typer.testing import CliRunner

    from ollm.cli.common import app

    seen = {}
    real = LLM.__init__

    def spy(self, *a, **kw):
        seen.update(kw)
        real(self, *a, **kw)

    monkeypatch.setattr(LLM, "__init__", spy)
    import shutil

    from conftest import char_tokenizer

    _, shared = hf_models("llama")
    path = shutil.copytree(shared, tmp_path / "hf")  # the session's model dir stays as it is
    char_tokenizer().save_pretrained(path)
    args = ["run", "abcabcabc", "-m", str(path), "--device", "cpu", "--raw", "--json",
            "--temperature", "0", "--max-new-tokens", "6", "--speculate", "lookup",
            "--cache-dir", str(tmp_path)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert seen["speculate"] == "lookup"
    assert '"drafter": "lookup"' in res.output


def test_choice_prices_each_drafter(monkeypatch):
    """Under a choice each drafter's drafting time is its own: shown per drafter in the
    metrics (seconds, share of step time), and a request whose current drafter is nearly free
    gets longer drafts than one drafted by a costly model (whose pass per token is priced)."""
    from ollm.engine.drafter_choice import ChoiceDrafter

    now = [0.0]  # a clock only the drafters advance: the test does not depend on load
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    asked: dict[str, list[int]] = {"cheap": [], "slow": []}

    class Fake:
        def __init__(self, name: str, seconds: float, only: set[str] | None) -> None:
            self.name, self.seconds, self.only = name, seconds, only

        def propose(self, requests):
            now[0] += self.seconds
            out = {}
            for rid, r in requests.items():
                if self.only is None or rid in self.only:
                    asked[self.name].append(r.k)
                    out[rid] = Draft([7] * r.k)
            return out

    spec = Speculator(ChoiceDrafter([Fake("cheap", 1e-5, {"a"}), Fake("slow", 0.02, None)]))
    for _ in range(3):  # passes of 1 and 9 rows cost about 10 ms: drafting dominates the slow
        spec.passed(1, 0.010)
        spec.passed(9, 0.0102)
    asks = {rid: ([1, 2, 3], GREEDY, 8) for rid in ("a", "b")}
    for _ in range(3):  # acceptance stays at the prior (0.5) for both
        spec.propose(asks)
    # "a" (lookup-like, nearly free) keeps long drafts; "b" stops drafting after the first
    # (priced before anything was measured): a pass of the model per token is not worth it
    assert asked["cheap"] == [6, 6, 6] and asked["slow"] == [6]
    assert spec.policy.draft_cost("slow") > 100 * spec.policy.draft_cost("cheap")
    rows = spec.stats.summary()["by_drafter"]
    assert rows["slow"]["draft_seconds"] == pytest.approx(0.02)
    assert rows["cheap"]["draft_seconds"] == pytest.approx(3e-5)
    assert rows["slow"]["share"] > rows["cheap"]["share"] > 0


def test_run_table_shows_each_drafters_share_of_time():
    """`ollm run`'s metrics rows give each drafter its drafts, acceptance and share of time."""
    from ollm.cli.generate import spec_rows
    from ollm.engine.speculative import SpecStats

    stats = SpecStats(
        drafter="mix", drafted=10, accepted=6, verify_passes=4, tokens=10, draft_seconds=1.0,
        target_seconds=3.0, by_drafter={"lookup": [3, 8, 6], "draft": [1, 2, 0]},
        draft_seconds_by={"lookup": 0.2, "draft": 0.8},
    )  # fmt: skip
    rows = dict(spec_rows(stats))
    assert rows["  lookup"] == "3 drafts, 6 of 8 tokens accepted, 5.0% of time"
    assert rows["  draft"] == "1 drafts, 0 of 2 tokens accepted, 20.0% of time"
