"""The RAM side of a CPU plan holds: a CPU prefill is chunked even without a budget, and the
anonymous RSS a fresh process gains while loading a model and running a long prompt stays
within the plan's reserved total (measured by scripts/ram_check.py, as for the real model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ollm.models.registry import STORE_FAMILIES
from ollm.planning.host_memory import CPU_CHUNK_BYTES, chunk_activation_bytes, cpu_prefill_chunk
from ollm.planning.placement import Workload, plan_placement

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
PROMPT = 4096


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """(spec, store) of a small random Gemma 3 with sliding-window layers: the kind of model
    whose whole-prompt attention masks grow with the square of the prompt."""
    from conftest import make_hf_model
    from ollm.models.registry import build_spec
    from ollm.storage.convert import convert
    from ollm.storage.store import LayerStore

    d = tmp_path_factory.mktemp("ram-budget")
    make_hf_model(
        "gemma3_text",
        d / "hf",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=512,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=32,
        max_position_embeddings=4 * PROMPT,
    )
    s = LayerStore(convert(d / "hf", d / "store", progress=False, families=STORE_FAMILIES))
    return build_spec(s.hf_config()), s


def test_cpu_prefill_is_chunked_without_a_budget(windowed):
    """A long prompt on the CPU runs in chunks whose activations fit CPU_CHUNK_BYTES, so the
    plan's activations grow with the prompt (stream, rope tables), not with its square."""
    spec, s = windowed
    t = 64 * 1024
    plan = plan_placement(spec, s, "cpu", None, None, work=Workload(1, t, t), dtype_bytes=4)
    chunk = plan.prefill_chunk_tokens
    assert 0 < chunk < t
    cost = chunk_activation_bytes(spec, Workload(1, t, t), 4, plan.mlp_chunk_tokens, chunk)
    assert cost <= CPU_CHUNK_BYTES
    # Stream and rope tables of the whole prompt, logits, slack: what no chunk size changes.
    linear = t * 4 * (spec.hidden_size + 2 * 2 * spec.head_dim) + 3 * 4 * spec.vocab_size
    assert plan.reserved["activations"] <= CPU_CHUNK_BYTES + linear + 64 * MIB
    # The same prompt forced whole: its [t, t + window] masks alone are gigabytes.
    whole = plan_placement(
        spec, s, "cpu", None, None, work=Workload(1, t, t), dtype_bytes=4, chunk_tokens=t
    )
    assert whole.reserved["activations"] > 8 * plan.reserved["activations"]


def test_cpu_chunk_follows_the_budget(windowed):
    """With ``cpu_memory`` the chunk's activations take at most 1/8 of it (down to the smallest
    chunk); a short prompt that fits runs whole."""
    spec, _ = windowed
    work = Workload(1, 32 * 1024, 32 * 1024)
    for budget in (256 * MIB, 1 << 30):
        rows = cpu_prefill_chunk(spec, work, 4, 1 << 20, budget)
        assert rows >= 256
        assert rows == 256 or chunk_activation_bytes(spec, work, 4, 1 << 20, rows) <= budget // 8
        assert chunk_activation_bytes(spec, work, 4, 1 << 20, 2 * rows) > budget // 8
    assert cpu_prefill_chunk(spec, Workload(1, 512, 512), 4, 1 << 20, None) == 0


def _measure(store: Path, cpu_memory: str | None = None) -> dict:
    """scripts/ram_check.py in a fresh process: baseline, load, one PROMPT-token request."""
    cmd = [sys.executable, str(ROOT / "scripts/ram_check.py"), "--one", str(PROMPT)]
    cmd += ["--new", "2", "--model", str(store)]
    if cpu_memory:
        cmd += ["--cpu-memory", cpu_memory]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def whole(windowed) -> dict:
    """The PROMPT-token request run as one forward (it fits CPU_CHUNK_BYTES), measured."""
    return _measure(windowed[1].path)


def test_measured_rss_within_plan_whole_prompt(whole):
    """Run whole, the prompt's masks are planned: the anonymous RSS gained from before the
    model loads to the end of the request is at most the planned total."""
    assert whole["prefill_chunk_tokens"] == 0 and whole["new_tokens"] == 2
    grown = whole["peak_anon"] - whole["baseline_anon"]
    assert grown <= whole["planned"], (grown / MIB, whole["planned"] / MIB)


def test_measured_rss_within_plan_chunked(windowed, whole):
    """Chunked under a budget: within the (smaller) plan, and less than the whole prompt took."""
    chunked = _measure(windowed[1].path, cpu_memory="256MiB")
    assert 0 < chunked["prefill_chunk_tokens"] < PROMPT
    grown = chunked["peak_anon"] - chunked["baseline_anon"]
    assert grown <= chunked["planned"], (grown / MIB, chunked["planned"] / MIB)
    assert grown < whole["peak_anon"] - whole["baseline_anon"]
