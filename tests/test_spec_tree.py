"""Speculative trees (issue 15): the tree attention mask against per-path attention, tree logits
against teacher-forced paths, greedy tokens equal plain decoding for every family (KV moved into
place after acceptance, also with KV over device / RAM / disk), the recursive rejection scheme
reproduces the target's law (chi-square on a tiny vocabulary), lookup tries, tree shapes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import FAMILIES
from ollm import LLM, SamplingParams
from ollm.engine.batch import BatchEngine
from ollm.engine.drafting import Draft, DraftRequest, LookupDrafter
from ollm.engine.runner import Runner
from ollm.engine.sampling import Sampler
from ollm.engine.speculative import Speculator, build_speculator
from ollm.engine.tree import TreePolicy, alternatives, lookup_tree, verify_tree
from ollm.layers.attention import AttentionMask, attend, blocked_attention
from ollm.layers.tree_mask import TreeMask

GREEDY = SamplingParams(temperature=0, max_new_tokens=10)
ALPHA = 1e-3  # chi-square p-value threshold, fixed before looking at any result
PARENTS = [-1, 0, 0, 1, -1, 4, 3, 2]  # 8 nodes: depths 0 1 1 2 0 1 3 2


def path_of(parents: list[int], i: int) -> list[int]:
    out = []
    while i >= 0:
        out.append(i)
        i = parents[i]
    return out[::-1]


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("prefix", [20, 70])
def test_tree_mask_equals_per_path_attention(window, prefix):
    """Each tree node's attention output equals causal attention over the prefix and its own
    path (keys laid out as a plain sequence), on the CPU paths `attend` takes (grouped for
    >= 64 keys, SDPA below) and the blocked kernel the GPU uses."""
    g = torch.Generator().manual_seed(0)
    n, d = len(PARENTS), 16
    q = torch.randn(1, 4, n, d, generator=g)
    k = torch.randn(1, 2, prefix + n, d, generator=g)
    v = torch.randn(1, 2, prefix + n, d, generator=g)
    tree = TreeMask.from_parents(prefix, PARENTS)
    mask = AttentionMask(prefix, n, prefix + n, None, window, None, tree)
    outs = [attend(q, k, v, mask, 0.25), blocked_attention(q, k, v, mask, 0.25)]
    for i in range(n):
        path = path_of(PARENTS, i)
        idx = list(range(prefix)) + [prefix + j for j in path]
        ki, vi = k[:, :, idx], v[:, :, idx]
        m = AttentionMask(len(idx) - 1, 1, len(idx), None, window)
        want = attend(q[:, :, i : i + 1], ki, vi, m, 0.25)
        for got in outs:
            torch.testing.assert_close(got[:, :, i : i + 1], want, rtol=1e-5, atol=1e-5)


def open_llm(path, cache, **kw) -> LLM:
    return LLM(path, device="cpu", max_context=128, prefill_chunk=32, cache_dir=cache,
               progress=False, **kw)  # fmt: skip


def engine(runner, drafter=None, **kw) -> BatchEngine:
    args = dict(block_tokens=8, max_batch=4, max_context=128, max_step_tokens=64)
    return BatchEngine(runner, None, (), drafter=drafter, **{**args, **kw})


class OracleTree:
    """Proposes trees that hold the known greedy continuation at a random rank among random
    distractors (so accepted paths are rarely the tree's first nodes and their KV must move)."""

    name = "oracle"

    def __init__(self, answers: dict[tuple[int, ...], list[int]], seed: int = 0) -> None:
        self.answers, self.g = answers, torch.Generator().manual_seed(seed)

    def _continuation(self, tokens) -> list[int]:
        for prompt, out in self.answers.items():
            if tuple(tokens[: len(prompt)]) == prompt:
                return out[len(tokens) :]
        return []

    def propose(self, requests):
        out = {}
        for rid, r in requests.items():
            want = self._continuation(r.tokens)[:4]
            toks, parents, prev = [], [], -1
            for t in want:
                rank = int(torch.randint(0, 3, (), generator=self.g))
                here = -1
                for j in range(3):  # siblings: the answer at ``rank``, others random
                    tok = t if j == rank else (t + 1 + j + rank) % 256
                    if j == rank:
                        here = len(toks)
                    toks.append(tok)
                    parents.append(prev)
                    if j != rank:  # a distractor's own child, never accepted
                        toks.append((tok * 7) % 256)
                        parents.append(len(toks) - 2)
                prev = here
            out[rid] = Draft(toks, None, parents) if toks else Draft([])
        return out


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    rep = torch.randint(0, 256, (9,), generator=g).tolist()
    return [rep * 4, torch.randint(0, 256, (30,), generator=g).tolist(), [3, 1, 4]]


def run(runner, drafter, ps, **kw):
    eng = engine(runner, drafter, **kw)
    outs, _ = eng.generate(ps, GREEDY)
    assert eng.kv_blocks_used() == 0
    m = eng.metrics()
    eng.close()
    return [o.token_ids for o in outs], m


@pytest.mark.parametrize("family", FAMILIES)
def test_tree_greedy_identical(family, hf_models, tmp_path):
    """Greedy tokens with trees (an oracle tree whose accepted paths need their KV moved, with
    KV in one pool and spread over device / RAM / disk; lookup tries; a self-draft chain with
    siblings) equal plain decoding's."""
    _, path = hf_models(family)
    with open_llm(path, tmp_path) as llm:
        ps = prompts()
        plain = [llm.generate(p, GREEDY).token_ids for p in ps]
        answers = {tuple(p): list(p) + o for p, o in zip(ps, plain, strict=True)}
        plan = llm.plan
        tiers = ("device", "cpu", "disk")
        layers = tuple(replace(p, kv_tier=tiers[i % 3]) for i, p in enumerate(plan.layers))
        spread = Runner(llm.spec, replace(plan, layers=layers), llm.prefetcher, llm.dtype)
        runs = [(llm.runner, {})]
        if family in ("llama", "gemma3_text"):  # tiers and self-drafts: two families suffice
            runs.append((spread, {"kv_dir": str(tmp_path)}))
        for runner, kw in runs:
            oracle = Speculator(OracleTree(answers), k=8)
            toks, m = run(runner, oracle, ps, **kw)
            assert toks == plain
            assert m.tokens_per_pass > 2.0  # paths of several nodes were accepted
        kinds = ["tree:lookup"] + (["tree:self:2"] if len(runs) > 1 else [])
        for kind in kinds:
            spec = build_speculator(kind, llm.runner, 4, 128)
            toks, m = run(llm.runner, spec, ps)
            spec.close()
            assert toks == plain, kind
            assert m.drafted > 0 or kind == "tree:lookup", kind  # random text may never recur


def test_tree_logits_equal_teacher_forced_paths(hf_models, tmp_path):
    """Every row of a tree step's logits equals the teacher-forced logits after that node's
    path (gemma3: sliding windows of 10 keys, shorter than the prompt)."""
    _, path = hf_models("gemma3_text")
    prompt = list(range(40, 64))
    toks = [5, 9, 17, 5, 200, 3, 77, 8]
    seen = {}
    with open_llm(path, tmp_path) as llm:

        class Fixed:
            name = "fixed"

            def propose(self, requests):
                return {rid: Draft(toks, None, PARENTS) for rid in requests}

        eng = engine(llm.runner, Speculator(Fixed(), k=8))
        real = eng._verify

        def spy(st, logits):
            if st.draft_parents is not None and "rows" not in seen:
                seen["rows"] = logits.clone()
                seen["start"] = st.start
            return real(st, logits)

        eng._verify = spy
        first = eng.generate([prompt], replace(GREEDY, max_new_tokens=3))[0][0].token_ids[0]
        base = prompt + [first]
        rows = torch.log_softmax(seen["rows"], -1)
        for i in range(-1, len(toks)):
            ids = base + [toks[j] for j in path_of(PARENTS, i)] if i >= 0 else base
            want = torch.cat(list(llm.logprob_chunks(ids + [0])))[-1]
            torch.testing.assert_close(rows[i + 1], want, rtol=1e-4, atol=1e-4)


def test_tree_sampling_law():
    """Two tokens through a tree over a vocabulary of 5 (root children drawn without
    replacement from a draft q, deterministic grandchildren) follow the target's law
    p(t1) p(t2 | t1) (2000 seeded runs, chi-square); the draft's own law is rejected."""
    v, n = 5, 2000
    g = torch.Generator().manual_seed(3)
    p0 = torch.softmax(torch.randn(v, generator=g) * 1.5, -1)
    p1 = torch.softmax(torch.randn(v, v, generator=g) * 1.5, -1)  # p(t2 | t1)
    q0 = torch.softmax(torch.randn(v, generator=g), -1)
    sampler = Sampler(SamplingParams(temperature=1.0, seed=1))
    counts = torch.zeros(v, v)
    for _ in range(n):
        first = int(torch.multinomial(q0, 1, generator=g))
        root = [first] + alternatives(q0, first, 2, False, g)  # 3 children, no replacement
        toks, parents = list(root), [-1] * 3
        toks += [2, 4]  # the first child's children, deterministic (one-hot proposals)
        parents += [0, 0]
        rows = [p0] + [p1[t] for t in root] + [p1[0], p1[0]]  # depth-2 rows unused here
        verdict = verify_tree(sampler, torch.stack(rows).log(), toks, parents, {-1: q0})
        out = verdict.tokens
        if len(out) == 1:  # the next step's token, from the target after t1
            out.append(int(sampler.draw(p1[out[0]][None])[0]))
        counts[out[0], out[1]] += 1
    law = p0[:, None] * p1
    stat = float(((counts - n * law) ** 2 / (n * law)).sum())
    df = torch.tensor((v * v - 1) / 2, dtype=torch.float64)
    pval = float(torch.special.gammaincc(df, torch.tensor(stat / 2, dtype=torch.float64)))
    assert pval > ALPHA
    wrong = q0[:, None] * p1
    stat_q = float(((counts - n * wrong) ** 2 / (n * wrong)).sum())
    assert float(torch.special.gammaincc(df, torch.tensor(stat_q / 2))) < ALPHA


def test_tree_verify_greedy_and_compaction_order():
    """Greedy: the path follows the target's argmax through any rank of siblings."""
    logits = torch.full((1 + len(PARENTS), 300), -5.0)
    toks = [5, 9, 17, 5, 200, 3, 77, 8]
    # root -> 200 (node 4, second root child) -> 3 (node 5) -> then 42, not in the tree
    logits[0, 200] = logits[5, 3] = logits[6, 42] = 5.0
    v = verify_tree(Sampler(SamplingParams(temperature=0)), logits, toks, PARENTS)
    assert v.tokens == [200, 3, 42] and v.path == [4, 5]
    assert (0, 0, False) in v.trials and (0, 1, True) in v.trials


def test_lookup_tree_and_drafter():
    """Lookup tries merge earlier matches' continuations; the drafter returns them as a tree."""
    toks = [1, 2, 3, 1, 2, 4, 1, 2, 3, 9, 1, 2]
    tokens, parents = lookup_tree(toks, nodes=8, depth=3, ngram=2)
    # matches of (1, 2) continue 3 1 2 / 4 1 2 / 3 9 1: trie with 3 first (two matches)
    assert tokens[0] == 3 and parents[0] == -1
    assert {(t, p) for t, p in zip(tokens, parents, strict=True) if p == -1} == {(3, -1), (4, -1)}
    assert all(p < i for i, p in enumerate(parents))
    d = LookupDrafter(ngram=2).propose({"a": DraftRequest(toks, 3, GREEDY, (2, 2, 1))})["a"]
    assert d.parents is not None and len(d.tokens) <= 5


def test_tree_policy_shapes():
    """Flat pass costs (streamed weights) grow large trees with siblings; costly rows or poor
    acceptance shrink them; a useless drafter gets none."""
    pol = TreePolicy()
    for _ in range(30):
        pol.observe([(d, 0, True) for d in range(6)] + [(0, 1, True)])
    big = pol.shape((1.0, 0.001), 0.0)
    assert sum(big) > 16 and len(big) >= 6 and max(big) > 1
    small = pol.shape((0.01, 0.01), 0.0)
    assert 0 < sum(small) < sum(big)
    bad = TreePolicy()
    for _ in range(60):
        bad.observe([(0, 0, False), (0, 1, False), (0, 2, False)])
    assert bad.shape((0.01, 0.01), 0.0) == []
    # A drafter right all along 16 deep (a quote) is tried deeper when rows cost nothing (the
    # cost model bounds the depth, not a cap); the depths it reaches are then measured
    deep = TreePolicy()
    for _ in range(30):
        deep.observe([(d, 0, True) for d in range(16)])
    assert len(deep.shape((1.0, 0.0), 0.0)) > 32
    assert len(deep.shape((0.01, 0.01), 0.0)) < 16
    deep.observe([(d, 0, d < 20) for d in range(24)])
    assert deep.seen[23] and deep.depth_rate[23] < deep.depth_rate[19] < deep.depth_rate[0]


def test_draft_model_shares_budget(hf_models, tmp_path):
    """A draft model loads first, resident, and its device bytes leave the target's budget;
    when both cannot fit, the refusal names the draft's share and the minimum."""
    from conftest import make_hf_model
    from ollm.errors import BudgetError

    _, path = hf_models("llama")
    make_hf_model("llama", tmp_path / "draft", seed=7)
    mib = 1 << 20
    kw = dict(device="cpu", max_context=128, cache_dir=tmp_path / "c", progress=False,
              speculate=f"draft:{tmp_path / 'draft'}")  # fmt: skip
    with pytest.raises(BudgetError, match="draft model.*must be at least the minimum above plus"):
        LLM(path, cpu_memory=150 * mib, **kw)
    with LLM(path, cpu_memory=400 * mib, **kw) as llm:
        draft = llm._draft.plan.peak_device_bytes
        assert llm.config.cpu_memory == 400 * mib - draft and not llm._draft.plan.streamed
        out = llm.generate([1, 2, 3, 1, 2, 3], GREEDY)
        assert llm.last_speculation is not None and llm.last_speculation.drafted > 0
    with LLM(path, device="cpu", max_context=128, cache_dir=tmp_path / "c", progress=False) as ref:
        assert ref.generate([1, 2, 3, 1, 2, 3], GREEDY).token_ids == out.token_ids


def test_request_speculate(hf_models, tmp_path):
    """``SamplingParams.speculate`` turns drafting on or off per request (LLM.generate, submit,
    the server's ``"ollm": {"speculate": ...}``); greedy tokens never change."""
    from ollm.serve import protocol as P
    from ollm.serve.completions import sampling_params

    _, path = hf_models("qwen2")
    p = prompts()[0]
    with open_llm(path, tmp_path) as llm:  # the LLM does not speculate
        want = llm.generate(p, GREEDY).token_ids
        assert llm.last_speculation is None
        got = llm.generate(p, replace(GREEDY, speculate="tree:lookup"))
        assert got.token_ids == want and llm.last_speculation.drafter == "lookup tree"
        spec = got.metrics.speculation  # every result carries the numbers, and its table a row
        assert spec["drafter"] == "lookup tree" and spec["tokens_per_pass"] >= 1.0
        assert "speculation" in dict(got.metrics.rows())
        stream = llm.submit(p, replace(GREEDY, speculate="lookup"))
        assert stream.wait().token_ids == want
    with open_llm(path, tmp_path, speculate="lookup") as llm:
        assert llm.generate(p, replace(GREEDY, speculate="off")).token_ids == want
        assert llm.last_speculation is None
    req = P.CompletionRequest(model="m", prompt="x", ollm=P.OllmOptions(speculate="off"))
    assert sampling_params(req, 4)[0].speculate == "off"


def test_single_request_tree_over_ram_and_disk(hf_models, tmp_path, monkeypatch):
    """One prompt through ``LLM.generate`` with ``speculate="tree:lookup"`` runs trees on the
    batch engine (not `Generator`'s chain-less path) with the plan's KV in RAM and on disk, and
    with every layer's KV on disk (``_kv_dir``): greedy tokens equal plain decoding's."""
    from conftest import disk_kv_budget
    from ollm.engine import batch, tree

    _, path = hf_models("gemma3_text")  # its greedy output repeats the prompt: lookup drafts
    common = dict(max_context=128, prefill_chunk=32, cache_dir=tmp_path / "c", progress=False)
    budget = disk_kv_budget(path, 1.6, **common)
    homes, verified = [], []
    run_engine, verify = batch.BatchEngine.generate, tree.verify_tree

    def recorded(self, *a, **k):
        homes.append({h for s in self.pools.stores.values() for h in s})
        return run_engine(self, *a, **k)

    def counted(*a, **k):
        verified.append(len(a[2]))  # the tree's node count
        return verify(*a, **k)

    monkeypatch.setattr(batch.BatchEngine, "generate", recorded)
    monkeypatch.setattr("ollm.engine.speculative.verify_tree", counted)
    p = prompts()[0]
    with LLM(path, device="cpu", kv_cache="disk", cpu_memory=budget, kv_dir=tmp_path / "kv",
             **common) as llm:  # fmt: skip
        assert {q.kv_tier for q in llm.plan.layers} == {"device", "disk"}  # RAM is the CPU's
        want = llm.generate(p, GREEDY).token_ids
        for kv_dir, where in ((None, {"device", "disk"}), (str(tmp_path / "all"), {"disk"})):
            verified.clear()
            got = llm.generate(p, replace(GREEDY, speculate="tree:lookup"), _kv_dir=kv_dir)
            assert got.token_ids == want and homes[-1] == where
            assert llm.last_speculation.drafter == "lookup tree"
            assert verified and llm.last_speculation.drafted == sum(verified) > 0


@pytest.mark.parametrize("family", ["gemma3_text"])  # sliding windows and global layers
def test_mix_and_cascade_greedy_identical(family, hf_models, tmp_path):
    """Content-aware choice (lookup or the self-draft per span), a cascade (lookup drafts for
    the self-draft) and both as trees keep plain greedy tokens; the choice shows per drafter."""
    _, path = hf_models(family)
    with open_llm(path, tmp_path) as llm:
        ps = prompts()
        plain = [llm.generate(p, GREEDY).token_ids for p in ps]
        for kind in ("mix:self:2", "cascade:self:2", "tree:mix:cascade:self:2"):
            spec = build_speculator(kind, llm.runner, 4, 128)
            toks, m = run(llm.runner, spec, ps)
            spec.close()
            assert toks == plain, kind
            by = spec.stats.by_drafter
            assert m.drafted == sum(c[1] for c in by.values()) > 0, kind
            if "mix" in kind:
                assert set(by) <= {"lookup", "lookup>self:2", "self:2"} and "self:2" in "".join(by)
            if kind.startswith("cascade"):
                assert spec.drafter.engine.speculator.stats.verify_passes > 0  # lookup drafted


def test_choice_follows_acceptance():
    """The cheap drafter is taken while it is right at least as often as the costly one; when
    it keeps failing the costly one takes over (and the cheap one is probed now and then)."""
    from ollm.engine.drafter_choice import ChoiceDrafter

    class Fixed:
        def __init__(self, name: str) -> None:
            self.name = name

        def propose(self, requests):
            return {rid: Draft([1, 2]) for rid in requests}

    choice = ChoiceDrafter([Fixed("cheap"), Fixed("model")], probe=4)
    ask = {"a": DraftRequest([0], 2, GREEDY)}
    assert choice.propose(ask) and choice.chosen["a"] == "cheap"
    for _ in range(6):
        choice.feedback("a", 2, 0)
    picks = []
    for _ in range(8):
        choice.propose(ask)
        picks.append(choice.chosen["a"])
        choice.feedback("a", 2, 2 if picks[-1] == "model" else 0)
    assert picks.count("model") >= 6 and "cheap" in picks  # probed, still wrong


def test_bench_cli_speculate(monkeypatch):
    """``ollm bench --speculate`` reaches the benchmarked LLM (its cases then carry
    ``speculation``: drafter, acceptance, tokens per target pass)."""
    from typer.testing import CliRunner

    import ollm.bench.run as bench_run
    from ollm.cli.common import app

    seen = {}

    def fake(**kw):
        seen.update(kw["llm_kwargs"])
        return {"cases": []}

    monkeypatch.setattr(bench_run, "run_bench", fake)
    monkeypatch.setattr("ollm.cli.bench._emit", lambda *a, **k: None)
    res = CliRunner().invoke(app, ["bench", "--device", "cpu", "--speculate", "tree:lookup"])
    assert res.exit_code == 0, res.output
    assert seen["speculate"] == "tree:lookup"


def test_engine_tree_sampling_law(hf_models, tmp_path):
    """Sampled requests through the engine with draft-model trees (siblings drawn without
    replacement, distributions carried to verification): 400 seeded runs of three tokens
    follow the target's exact law (chi-square, sparse cells pooled)."""
    from ollm.engine.drafting import ModelDrafter, self_draft_runner
    from test_speculative import chi_square_p, exact_law

    _, path = hf_models("llama")
    n, prompt = 400, [11, 22, 33, 44, 55, 66, 77, 88, 99]
    params = [
        SamplingParams(temperature=1.3, top_k=4, top_p=0.95, seed=i, max_new_tokens=3)
        for i in range(n)
    ]
    pools = dict(block_tokens=8, max_batch=64, max_context=32, max_step_tokens=2048)
    with LLM(path, device="cpu", max_context=32, cache_dir=tmp_path, progress=False) as llm:
        law = exact_law(llm, prompt, params[0])
        draft = ModelDrafter(BatchEngine(self_draft_runner(llm.runner, 3), None, (), **pools))
        spec = Speculator(draft, tree=True)
        eng = BatchEngine(llm.runner, None, (), **pools, drafter=spec)
        widths = []
        propose = draft.propose

        def spy(requests):  # the trees' widest node: siblings were drawn
            widths.extend(max(r.widths) for r in requests.values())
            return propose(requests)

        draft.propose = spy
        outs, _ = eng.generate([prompt] * n, params)
        assert max(widths) > 1
        counts: dict[tuple, int] = {}
        for o in outs:
            counts[tuple(o.token_ids[:3])] = counts.get(tuple(o.token_ids[:3]), 0) + 1
        m = eng.metrics()
        assert 0 < m.accepted_drafts < m.drafted and spec.stats.drafter == "draft tree"
        assert chi_square_p(counts, law, n) > ALPHA


def test_tree_speculator_learns_pass_cost():
    """Tree sizes vary until the pass-cost fit has seen several sizes (the slope is unknown from
    one), then follow it: compute-bound passes (every row costs) get small trees, passes that
    cost the same for any rows (streamed weights) large ones."""
    for slope, small in ((0.01, True), (0.0, False)):
        spec = Speculator(LookupDrafter(), tree=True)
        sizes = []
        for _ in range(10):
            ask = spec._ask("a", [1, 2, 3] * 10, GREEDY, 50, 1)
            sizes.append(sum(ask.widths))
            spec.passed(sizes[-1] + 1, 0.01 + slope * (sizes[-1] + 1))
        assert sizes[:2] == [16, 64]  # exploring
        assert (max(sizes[3:]) <= 8) if small else (min(sizes[3:]) >= 32), sizes
