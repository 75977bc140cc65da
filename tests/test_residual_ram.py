"""The prompt's residual stream in pinned RAM during prefill (``planning/residual.py``,
``Runner._host_residual_block``): only where the hidden states wait between layers changes, so
tokens and logits are those of the default; the planner picks it only when the GPU plan is
refused, and then counts the device's chunk buffers instead of the whole stream."""

from __future__ import annotations

import pytest
import torch

from conftest import load_script
from ollm import LLM, SamplingParams
from ollm.engine.runner import Runner
from ollm.errors import BudgetError, OllmError
from ollm.planning.accounting import activation_bytes, activation_parts
from ollm.planning.placement import Workload, plan_placement

GiB = 1 << 30


def _llama8b():
    return load_script("plan_report.py").llama8b()


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_ram_residual_gives_the_same_tokens_and_logits(family, hf_models, tmp_path, monkeypatch):
    """Forced to RAM on the CPU device (the chunk buffer then sits in RAM too): the chunked
    host path runs for the prompt, and greedy tokens and every position's logits are equal to
    the default plan's, bit for bit."""
    _, path = hf_models(family)
    prompt = [(7 * i + 3) % 256 for i in range(150)]
    ids = torch.tensor([prompt])
    pos = torch.arange(len(prompt))[None]
    params = SamplingParams(max_new_tokens=10, temperature=0)
    calls = []
    real = Runner._host_residual_block

    def spy(self, *args):
        calls.append(args[0].shape)
        return real(self, *args)

    monkeypatch.setattr(Runner, "_host_residual_block", spy)
    out = {}
    for mode in ("auto", "ram"):
        kw = dict(device="cpu", prefill_chunk=32, cache_dir=tmp_path, progress=False)
        with LLM(path, prefill_residual=mode, **kw) as llm:
            assert llm.plan.residual_ram == (mode == "ram")
            tokens = llm.generate(prompt, params).token_ids
            kv = llm.runner.new_kv(1, len(prompt) + 4)
            try:
                logits = llm.runner.forward(ids, pos, kv, all_logits=True)
            finally:
                for c in kv:
                    c.close()
            out[mode] = tokens, logits
            if mode == "auto":
                assert not calls  # the default never takes the host path
    n_layers = len(llm.spec.layers)
    assert len(calls) == 2 * n_layers  # the generate's prompt and the forward, every layer
    assert out["ram"][0] == out["auto"][0]
    assert torch.equal(out["ram"][1], out["auto"][1])


def test_planner_moves_the_residual_to_ram_only_when_refused():
    """Llama-3.1-8B shapes, 8 GiB: at 100k the default plan fits and "auto" is that plan; at
    600k (bf16 KV) the residual stream alone is 4.6 GiB and the GPU plan is refused, while the
    RAM-residual plan fits with its two chunk buffers counted in its activations."""
    spec, store = _llama8b()
    budget = 8 * GiB

    def plan(ctx: int, mode: str):
        work = Workload(1, ctx, ctx)
        return plan_placement(spec, store, "cuda:0", budget, None, "auto", work, 2,
                              prefill_residual=mode)  # fmt: skip

    assert plan(100_000, "auto") == plan(100_000, "gpu")
    assert not plan(100_000, "auto").residual_ram
    with pytest.raises(BudgetError, match="at least"):
        plan(600_000, "gpu")
    ram = plan(600_000, "auto")
    assert ram.residual_ram and ram == plan(600_000, "ram")
    assert ram.peak_device_bytes <= budget
    assert any(k == "prefill residual stream" for k, _ in ram.describe())
    work, chunk = Workload(1, 600_000, 600_000), ram.prefill_chunk_tokens
    assert 0 < chunk < work.prefill_tokens
    parts = activation_parts(spec, work, 2, ram.mlp_chunk_tokens, chunk, True, True)
    assert "residual stream" not in parts
    assert parts["residual chunk buffers"] == 2 * chunk * spec.hidden_size * 2
    assert ram.reserved["activations"] == sum(parts.values())
    full = activation_parts(spec, work, 2, ram.mlp_chunk_tokens, chunk, True, False)
    assert full["residual stream"] == 600_000 * spec.hidden_size * 2
    assert sum(full.values()) - sum(parts.values()) == (
        full["residual stream"] - parts["residual chunk buffers"]
    )
    assert activation_bytes(spec, work, 2, ram.mlp_chunk_tokens, chunk, True, True) == sum(
        parts.values()
    )


def test_ram_residual_cost_and_cpu_accounting():
    """With measured rates the plan predicts the copies' prefill time (the stream in and out
    once per layer over the host->GPU rate); on the CPU device the stream is counted besides
    the buffers (it is all RAM); an unknown mode is refused in one line."""
    report = load_script("plan_report.py")
    spec, store = report.llama8b()
    work = Workload(1, 600_000, 600_000)
    rates = report.h200_rates()
    p = plan_placement(spec, store, "cuda:0", 8 * GiB, None, "auto", work, 2, rates, "off")
    assert p.residual_ram
    expect = 2 * 600_000 * spec.hidden_size * 2 * spec.num_layers / rates.pcie
    assert p.predicted["prefill residual copies s"] == pytest.approx(expect)
    cpu = activation_parts(spec, work, 2, 256, 1024, False, True)
    assert cpu["residual stream"] == 600_000 * spec.hidden_size * 2
    assert cpu["residual chunk buffers"] == 2 * 1024 * spec.hidden_size * 2
    from ollm.config import EngineConfig

    with pytest.raises(OllmError, match="prefill_residual"):
        EngineConfig(prefill_residual="disk")
    with pytest.raises(OllmError, match="prefill_residual"):
        plan_placement(spec, store, "cuda:0", 8 * GiB, None, "auto", work, 2,
                       prefill_residual="disk")  # fmt: skip
