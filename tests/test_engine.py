"""``Engine`` (engine/core.py) runs requests without the ``LLM`` facade: built from a config and
a layer store, it gives ``LLM``'s greedy tokens, scores and submitted streams, grows its plan for
a longer request, and is the object behind every ``LLM`` attribute."""

from __future__ import annotations

import pytest

from ollm import LLM, SamplingParams
from ollm.config import EngineConfig
from ollm.engine.core import Engine
from ollm.errors import BudgetError, RequestError

GREEDY = SamplingParams(temperature=0, max_new_tokens=8)
PROMPTS = [[1, 5, 9, 2, 7], [3, 3, 8], [11, 4, 6, 2, 9, 1, 5]]


@pytest.fixture(scope="module")
def kw(store, tmp_path_factory):
    """Settings of a small CPU engine over the session's tiny Llama store."""
    _, s = store
    cache = tmp_path_factory.mktemp("engine-cache")
    return dict(model=str(s.path), device="cpu", max_context=32, cache_dir=str(cache),
                progress=False)  # fmt: skip


def test_engine_alone_matches_llm(kw):
    """One prompt, a batch, a score and a submitted request on a bare Engine give what LLM does."""
    with LLM(**kw) as llm:  # type: ignore[arg-type]
        want = [llm.generate(p, GREEDY).token_ids for p in PROMPTS]
        want_score = llm.score(PROMPTS[2])
    with Engine(EngineConfig(**kw)) as eng:
        outs, mets = eng.generate([PROMPTS[0]], GREEDY)
        assert outs[0].token_ids == want[0] and len(want[0]) == GREEDY.max_new_tokens
        assert mets[0].generated_tokens == GREEDY.max_new_tokens
        outs, mets = eng.generate(PROMPTS, GREEDY)  # continuous batching, each at its length
        assert [o.token_ids for o in outs] == want and len(mets) == len(PROMPTS)
        assert eng.score(PROMPTS[2]).allclose(want_score)
        stream = eng.submit(PROMPTS[1], GREEDY)
        assert stream.wait(60).token_ids == want[1]
        assert eng.batch_stats()["running"] == 0
        assert eng.info()["layers"] == eng.spec.num_layers


def test_engine_checks_and_replans(kw):
    """A request longer than planned re-plans (a new plan, prefetcher and runner, the generator
    on the new runner); one that no budget holds leaves the old plan in use; an empty prompt
    and mismatched params are refused."""
    with Engine(EngineConfig(**kw, cpu_memory="200MiB")) as eng:
        before = eng.generate([PROMPTS[0]], GREEDY)[0][0].token_ids
        old = eng.plan, eng.prefetcher, eng.runner
        long = [(7 * i) % 50 + 1 for i in range(40)]  # 40 + 8 tokens > max_context=32
        eng.generate([long], GREEDY)
        assert eng.workload.context >= 48
        new = eng.plan, eng.prefetcher, eng.runner
        assert all(a is not b for a, b in zip(new, old, strict=True))
        assert eng.generator.runner is eng.runner and eng.runner.plan is eng.plan
        with pytest.raises(BudgetError):
            eng.generate([PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=10**9))
        assert eng.workload.context == 48  # the old plan (BudgetError came before loading)
        assert eng.generate([PROMPTS[0]], GREEDY)[0][0].token_ids == before
        with pytest.raises(RequestError, match="at least one token"):
            eng.generate([[]], GREEDY)
        with pytest.raises(RequestError, match="2 prompts but 1 sampling params"):
            eng.generate(PROMPTS[:2], [GREEDY])


def test_llm_attributes_are_the_engines(kw):
    """LLM holds no state of its own: its plan, runner, workload, lock, ... are the engine's,
    and setting one sets the engine's."""
    with LLM(**kw) as llm:  # type: ignore[arg-type]
        eng = llm.engine
        for name in ("config", "store", "spec", "plan", "runner", "prefetcher", "workload"):
            assert getattr(llm, name) is getattr(eng, name), name
        assert llm._lock is eng.lock and llm._engine is eng.generator
        plan = llm.plan
        llm.plan = None
        assert eng.plan is None
        llm.plan = plan
        assert llm.info() == eng.info()
