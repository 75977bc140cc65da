"""API-level reliability (issue 11): failed re-plans, requests from several threads, bounded
scoring, honest clocks and I/O waits, empty and over-long prompts, the default dtype."""

from __future__ import annotations

import logging
import shutil
import threading
import time

import pytest
import torch

from conftest import char_tokenizer, make_hf_model
from ollm import LLM, SamplingParams
from ollm.config import choose_dtype, source_dtype_name
from ollm.errors import BudgetError, ContextLengthError, OllmError, RequestError

GREEDY = SamplingParams(temperature=0, max_new_tokens=6)
PROMPT = [5, 17, 99, 3, 42, 7, 250, 11, 64]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(HF model, directory) of a tiny Llama trained for 2048 positions, with a tokenizer that
    adds no BOS token."""
    d = tmp_path_factory.mktemp("reliability") / "llama"
    hf = make_hf_model("llama", d, max_position_embeddings=2048)
    char_tokenizer().save_pretrained(str(d))
    return hf, d


def make_llm(model, tmp_path, **kwargs) -> LLM:
    return LLM(model[1], device="cpu", cache_dir=tmp_path, progress=False, **kwargs)


# -- 1. a failed re-plan keeps the current placement -------------------------------------------


def test_failed_replan_keeps_the_llm_usable(model, tmp_path):
    with make_llm(model, tmp_path, max_context=16, cpu_memory="200MiB") as llm:
        before = llm.generate(PROMPT, GREEDY).token_ids
        huge = SamplingParams(temperature=0, max_new_tokens=10**7)
        with pytest.raises(BudgetError):
            llm.generate(PROMPT, huge)
        assert llm.workload.context == 16
        assert llm.generate(PROMPT, GREEDY).token_ids == before


def test_failed_load_restores_the_old_plan(model, tmp_path, monkeypatch):
    """Loading the new plan fails after the old buffers were released: the old plan is loaded
    again and the error re-raised."""
    import ollm.runtime.prefetch as prefetch

    with make_llm(model, tmp_path, max_context=16) as llm:
        before = llm.generate(PROMPT, GREEDY).token_ids
        real, calls = prefetch.Prefetcher, []

        def failing_first(*args, **kwargs):
            calls.append(args)
            if len(calls) == 1:
                raise OSError("simulated failure while loading the new placement")
            return real(*args, **kwargs)

        monkeypatch.setattr(prefetch, "Prefetcher", failing_first)
        with pytest.raises(OSError, match="simulated"):
            llm.generate(list(range(1, 40)), GREEDY)
        assert len(calls) == 2 and llm.workload.context == 16
        monkeypatch.setattr(prefetch, "Prefetcher", real)
        assert llm.generate(PROMPT, GREEDY).token_ids == before


# -- 2. requests from several threads ----------------------------------------------------------


def test_threads_share_one_llm_across_a_replan(model, tmp_path):
    """A short request and a long one that forces a re-plan, on two threads (plus a stream):
    each gets what it gets alone."""
    short = list(range(1, 21))
    long = [(7 * i) % 250 + 1 for i in range(1500)]
    params = SamplingParams(temperature=0, max_new_tokens=24)
    with make_llm(model, tmp_path, max_context=64) as ref:
        want_short = ref.generate(short, params).token_ids
        want_long = ref.generate(long, params).token_ids
        want_text = ref.generate("hello", params).text
    for attempt in range(2):
        with make_llm(model, tmp_path, max_context=64) as llm:
            got, errors = run_together(
                {
                    "short": lambda: llm.generate(short, params).token_ids,  # noqa: B023
                    "long": lambda: llm.generate(long, params).token_ids,  # noqa: B023
                    "stream": lambda: "".join(llm.stream("hello", params)),  # noqa: B023
                }
            )
            assert not errors, f"attempt {attempt}: {errors!r}"
            assert got == {"short": want_short, "long": want_long, "stream": want_text}
            assert llm.workload.context >= len(long) + 24


def run_together(jobs: dict) -> tuple[dict, list[BaseException]]:
    """Start every job on its own thread at once; (results by name, errors raised)."""
    got: dict[str, object] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def run(name, fn):
        try:
            start.wait()
            got[name] = fn()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return got, errors


# -- 3. score: planned, and never a [tokens, vocab] tensor -------------------------------------


def test_score_matches_transformers_in_bounded_chunks(model, tmp_path, monkeypatch):
    import ollm.engine.generate as generate

    hf, _ = model
    seq = [(11 * i) % 250 + 1 for i in range(40)]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([seq])).logits[0, :-1].float(), dim=-1)
    want = ref.gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
    rows = 3
    monkeypatch.setattr(generate, "SCORE_LOGITS_BYTES", rows * 4 * hf.config.vocab_size)
    from ollm.engine.runner import Runner

    shapes: list[tuple[int, ...]] = []
    real = Runner.logits

    def recording(self, h):
        out = real(self, h)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(Runner, "logits", recording)
    with make_llm(model, tmp_path, max_context=16) as llm:
        got = llm.score(seq)
        assert llm.workload.context >= len(seq)  # score went through planning
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert max(s[1] for s in shapes) <= rows
    assert sum(s[1] for s in shapes) == len(seq) - 1  # no logits for the position past the text


def test_score_needs_two_tokens(model, tmp_path):
    with make_llm(model, tmp_path) as llm, pytest.raises(RequestError, match="two tokens"):
        llm.score([5])


# -- 4. decode clock and I/O waits -------------------------------------------------------------


def test_decode_clock_excludes_teardown_and_waits_are_split(model, tmp_path, monkeypatch):
    from ollm.engine.generate import Generator

    real = Generator._release

    def slow_release(kv, disk):
        time.sleep(1.0)  # stands in for unpinning KV and deleting the disk KV directory
        real(kv, disk)

    monkeypatch.setattr(Generator, "_release", staticmethod(slow_release))
    with make_llm(model, tmp_path, offload="disk") as llm:
        m = llm.generate(PROMPT, GREEDY).metrics
    assert 0 < m.decode_seconds < 1.0
    assert m.io_stall_gpu_seconds == 0.0  # no CUDA stream on the CPU
    assert m.io_wait_host_seconds >= 0.0
    assert m.io_wait_seconds == m.io_wait_host_seconds + m.io_stall_gpu_seconds
    d = m.to_dict()
    assert {"io_wait_host_seconds", "io_stall_gpu_seconds", "io_wait_seconds"} <= set(d)
    assert d["io_wait_seconds"] == m.io_wait_seconds
    rows = dict(m.rows())
    assert rows["GPU stalled on weight copies"] == "0.000 s"
    assert rows["compute waited on disk reads"] == f"{m.io_wait_host_seconds:.3f} s"


# -- 5. empty prompt: a one-line error ---------------------------------------------------------


def test_empty_prompt_is_a_one_line_ollm_error(model, tmp_path):
    with make_llm(model, tmp_path) as llm:
        for bad in ("", [], [[5, 6], []]):
            with pytest.raises(OllmError, match="at least one") as err:
                llm.generate(bad, GREEDY)
            assert "\n" not in str(err.value)
        assert llm.generate(PROMPT, GREEDY).token_ids  # still usable


def test_cli_empty_prompt_exits_2_with_one_line(model, tmp_path):
    from typer.testing import CliRunner

    from ollm.cli import app

    args = ["run", "", "--model", str(model[1]), "--cache-dir", str(tmp_path), "--device", "cpu"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "at least one token" in lines[0], res.stderr


# -- 6. prompts beyond the model's trained context ---------------------------------------------


def test_prompt_beyond_max_position_warns_or_fails_when_strict(tmp_path, caplog):
    d = tmp_path / "short-model"
    make_hf_model("llama", d, max_position_embeddings=32)
    prompt = [(3 * i) % 250 + 1 for i in range(40)]
    with LLM(d, device="cpu", cache_dir=tmp_path, max_context=16, progress=False) as llm:
        with caplog.at_level(logging.WARNING, logger="ollm.api"):
            res = llm.generate(prompt, GREEDY)
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and "max_position_embeddings (32)" in warned[0]
        assert "\n" not in warned[0] and len(res.token_ids) == 6
        assert llm.workload.context >= len(prompt) + 6  # planned for the real length
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ollm.api"):
            llm.generate(prompt[:20], GREEDY)  # within the trained context: quiet
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    with LLM(d, device="cpu", cache_dir=tmp_path, strict_context=True, progress=False) as llm:
        with pytest.raises(ContextLengthError, match="40 tokens"):
            llm.generate(prompt, GREEDY)
        assert len(llm.generate(prompt[:20], GREEDY).token_ids) == 6


# -- 7. the default dtype ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "source", "device", "bf16", "want"),
    [
        (None, "float32", "cuda:0", True, ("bfloat16", "default for cuda; source float32")),
        (None, "float32", "cuda:1", False, ("float16", "default for cuda; source float32")),
        (None, "float32", "cpu", True, ("float32", "source's")),
        (None, "bfloat16", "cuda:0", True, ("bfloat16", "source's")),
        ("float32", "float32", "cuda:0", True, ("float32", "requested")),
        ("bfloat16", "float32", "cpu", False, ("bfloat16", "requested")),
    ],
)
def test_choose_dtype(requested, source, device, bf16, want):
    assert choose_dtype(requested, source, device, bf16) == want


def test_source_dtype_and_info(model, tmp_path):
    hf_dir = model[1]
    assert source_dtype_name(None) == "float32"  # the default model is a GGUF
    assert source_dtype_name(str(tmp_path / "x.gguf")) == "float32"
    assert source_dtype_name(str(hf_dir)) == "float32"
    half = tmp_path / "half"
    shutil.copytree(hf_dir, half)
    cfg = (half / "config.json").read_text()
    (half / "config.json").write_text(cfg.replace('"float32"', '"bfloat16"'))
    assert source_dtype_name(str(half)) == "bfloat16"
    with make_llm(model, tmp_path) as llm:
        assert llm.info()["dtype"] == "float32 (source's)"
        assert source_dtype_name(str(llm.store_path)) is None  # a store is used as it is
    with make_llm(model, tmp_path, dtype="bfloat16") as llm:
        assert llm.info()["dtype"] == "bfloat16 (requested)"
