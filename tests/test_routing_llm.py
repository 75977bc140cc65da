"""Attention routing through the public API on a tiny Gemma 3 (sliding + global layers):
generate with ``attention=`` on device KV and on disk KV, calibration (deterministic, saved
atomically, used by ``auto``), and the CLI's one-line errors."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

from ollm import LLM, SamplingParams
from ollm.cli import app
from ollm.engine.routing_calibration import (
    calibrate,
    load_calibration,
    middle_pages,
    plan_routing,
    save_calibration,
)
from ollm.errors import OllmError

PROMPT = [(7 * i + 3) % 200 + 20 for i in range(150)]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def gemma(hf_models, tmp_path_factory):
    _, path = hf_models("gemma3_text")
    return path, tmp_path_factory.mktemp("routing-cache")


def _llm(gemma, **kw) -> LLM:
    path, cache = gemma
    return LLM(path, device="cpu", cache_dir=cache, progress=False, max_context=256, **kw)


def test_generate_routed_on_device_and_disk_kv(gemma):
    with _llm(gemma) as llm:
        full = llm.generate(PROMPT, GREEDY)
    assert full.metrics.kv_read_fraction is None
    with _llm(gemma, attention="topk:100,window:8,sinks:2", attention_page_tokens=4) as llm:
        every = llm.generate(PROMPT, GREEDY)
    assert every.token_ids == full.token_ids  # every page chosen: full attention
    assert every.metrics.kv_read_fraction == 1.0
    topk = {}
    for kv_cache in ("auto", "disk"):
        with _llm(gemma, attention="topk:3,window:8,sinks:2", attention_page_tokens=4,
                  kv_cache=kv_cache) as llm:  # fmt: skip
            topk[kv_cache] = llm.generate(PROMPT, GREEDY)
    assert topk["auto"].token_ids == topk["disk"].token_ids  # tiers read the same slots
    assert topk["auto"].metrics.kv_read_fraction < 0.3
    with _llm(gemma, attention="window:8,sinks:2", attention_page_tokens=4) as llm:
        window = llm.generate(PROMPT, GREEDY)
    assert window.metrics.kv_read_fraction < topk["auto"].metrics.kv_read_fraction


def test_calibration_is_deterministic_and_feeds_auto(gemma):
    with _llm(gemma, attention_page_tokens=4) as llm:
        with pytest.raises(OllmError, match="ollm calibrate"):
            _llm(gemma, attention="auto")
        ids = PROMPT[:96]
        a = calibrate(llm, tokens=96, window=8, sinks=2, ids=ids)
        b = calibrate(llm, tokens=96, window=8, sinks=2, ids=ids)
        assert a == b
        # measured from a later row: other deviations; from before sinks + window: the same
        late = calibrate(llm, tokens=96, window=8, sinks=2, ids=ids, first_row=64)
        early = calibrate(llm, tokens=96, window=8, sinks=2, ids=ids, first_row=4)
        assert "first_row" not in a and late["first_row"] == 64
        assert late["deviation"] != a["deviation"] and early["deviation"] == a["deviation"]
        assert a["version"] == 2 and a["middle_pages"] == middle_pages(96, 8, 2, 4)
        for row, share, dev in zip(a["choice"], a["share"], a["deviation"], strict=True):
            for h, (c, sh) in enumerate(zip(row or [], share or [], strict=True)):
                assert (sh is None) == (not c.startswith("topk:"))  # top-k: pages / middle
                if sh is not None:
                    assert (sh["pages"], sh["deviation"]) == (int(c[5:]), dev[c][h])
        assert [d is None for d in a["deviation"]] == [
            x.window is not None for x in llm.spec.layers
        ]
        path = save_calibration(llm.store_path, a)
        assert load_calibration(llm.store_path) == a
        assert not list(path.parent.glob(f".{path.name}.tmp-*"))
        # at twice the length each top-k budget keeps its share (never fewer pages)
        at = {c: plan_routing("auto", llm.spec, llm.store_path, 4, context=c) for c in (96, 192)}
        m96, m192 = a["middle_pages"], middle_pages(192, 8, 2, 4)
        topk = [(x, y) for x, y in zip(at[96], at[192], strict=True) if x and "topk" in x.heads]
        assert topk  # the tiny model's calibration routes some heads to top-k pages
        for r96, r192 in topk:
            assert r192.pages == max(r96.pages, -(-r96.pages * m192 // m96)) > r96.pages
    with _llm(gemma, attention="auto", attention_page_tokens=4) as llm:
        res = llm.generate(PROMPT, GREEDY)
        heads = [r.heads for r in llm.runner.routing if r is not None]
        # the engine scales auto's top-k shares to the context it plans for
        ctx = llm.config.max_context
        want = plan_routing("auto", llm.spec, llm.store_path, 4, context=ctx)
        assert [r and r.pages for r in llm.runner.routing] == [w and w.pages for w in want]
    assert heads == [tuple(x.split(":")[0] for x in c) for c in a["choice"] if c]
    assert len(res.token_ids) == 8
    path.unlink()


@pytest.mark.parametrize(
    "args",
    [
        ["run", "hi", "--attention", "topk"],
        ["run", "hi", "--attention", "lru:4"],
        ["eval", "--attention", "window:x"],
    ],
)
def test_cli_attention_errors_are_one_line(args):
    res = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--attention" in lines[0]


def test_device_script_runs_on_the_cpu(tmp_path):
    """scripts/gpu/routing.py's measurement on a tiny synthetic Llama with KV on disk (the
    offloaded path): full reads all KV, top-k at most 1/8, both decode."""
    import importlib.util
    from pathlib import Path

    from ollm.models.registry import STORE_FAMILIES
    from ollm.storage.synthetic import make_synthetic_store

    path = Path(__file__).parents[1] / "scripts" / "gpu" / "routing.py"
    spec = importlib.util.spec_from_file_location("gpu_routing", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    store = make_synthetic_store(
        "llama3-1b", tmp_path / "store", progress=False, families=STORE_FAMILIES,
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=256,
    )  # fmt: skip
    (row,) = mod.bench(
        store, contexts=(320,), new=4, page_tokens=8, sinks=4, window=16, device="cpu",
        kv_cache="disk", cache_dir=tmp_path / "c",
    )  # fmt: skip
    assert row["full"]["kv_read_fraction"] == 1.0
    assert row["topk"]["kv_read_fraction"] <= 1 / 8
    assert row["topk"]["kv_bytes_read_per_step"] <= row["full"]["kv_bytes_read_per_step"] / 8
    assert row["full"]["decode_tok_s"] > 0 and row["topk"]["decode_tok_s"] > 0


def test_planner_counts_the_key_summaries(gemma):
    """Routing keeps a min and a max key per page and KV head on the compute device for every
    full-attention layer: the plan reserves exactly that, and a budget is judged with it."""
    with _llm(gemma) as llm:
        assert "routing summaries" not in llm.plan.reserved
        base = llm.plan.peak_device_bytes
    with _llm(gemma, attention="topk:3,window:8,sinks:2", attention_page_tokens=4) as llm:
        spec, elem = llm.spec, llm.dtype.itemsize
        full_layers = sum(1 for layer in spec.layers if not layer.window)
        want = 2 * spec.num_kv_heads * (256 // 4) * spec.head_dim * elem * full_layers
        assert full_layers and llm.plan.reserved["routing summaries"] == want
        assert llm.plan.peak_device_bytes == base + want


def test_several_prompts_warn_that_lossy_kv_options_are_not_applied(gemma, caplog):
    """A request of several prompts runs on the paged batch engine, which keeps and attends
    every block exactly: routing and eviction are not applied there, one warning line each
    says so, and the tokens are the exact path's."""
    prompts = [PROMPT[:60], PROMPT[:90]]
    with _llm(gemma) as llm:
        exact = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    for kw, said in (
        (dict(attention="window:8,sinks:2", attention_page_tokens=4), "attention routing is not"),
        (dict(kv_evict="streaming", kv_keep="50%"), "KV eviction not applied"),
    ):
        caplog.clear()
        with _llm(gemma, **kw) as llm, caplog.at_level(logging.WARNING, logger="ollm"):
            outs = llm.generate(prompts, GREEDY)
        lines = [r.getMessage() for r in caplog.records if "applied" in r.getMessage()]
        assert len(lines) == 1 and lines[0].startswith(said), lines
        assert [o.token_ids for o in outs] == exact


def test_several_prompts_warn_that_spans_are_not_applied(gemma, caplog):
    """Spans marked full (routing by segment) on a request of several prompts: one line."""
    spans = SamplingParams(max_new_tokens=4, temperature=0, full_attention=[(0, 16)])
    with _llm(gemma) as llm, caplog.at_level(logging.WARNING, logger="ollm"):
        llm.generate([PROMPT[:60], PROMPT[:90]], spans)
    lines = [r.getMessage() for r in caplog.records if "applied" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("full-attention spans not applied"), lines
