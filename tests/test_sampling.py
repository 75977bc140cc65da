"""Tests for ollm.engine.sampling."""

from __future__ import annotations

import pytest
import torch

from ollm.engine.sampling import Sampler, SamplingParams, SamplingParamsError
from ollm.errors import OllmError


def _logits(batch: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_equals_argmax(dtype: torch.dtype) -> None:
    logits = _logits().to(dtype)
    params = SamplingParams(temperature=0.0)
    assert params.greedy
    out = Sampler(params).sample(logits)
    assert out.dtype == torch.long and out.shape == (4,)
    assert torch.equal(out, torch.argmax(logits.float(), dim=-1))


def test_seeded_reproducible() -> None:
    logits = _logits(batch=8, vocab=1000)
    params = SamplingParams(temperature=1.3, top_k=200, top_p=0.95, seed=1234)
    a, b = Sampler(params), Sampler(params)
    seq_a = [a.sample(logits) for _ in range(10)]
    seq_b = [b.sample(logits) for _ in range(10)]
    assert all(torch.equal(x, y) for x, y in zip(seq_a, seq_b, strict=True))
    other = Sampler(SamplingParams(temperature=1.3, top_k=200, top_p=0.95, seed=4321))
    seq_c = [other.sample(logits) for _ in range(10)]
    assert not all(torch.equal(x, y) for x, y in zip(seq_a, seq_c, strict=True))


def test_top_k_one_equals_greedy() -> None:
    logits = _logits(batch=16, vocab=300)
    want = torch.argmax(logits, dim=-1)
    params = SamplingParams(temperature=2.0, top_k=1, seed=0)
    assert params.greedy
    assert torch.equal(Sampler(params).sample(logits), want)
    # the top-k filter itself also leaves only the argmax
    filtered = Sampler(SamplingParams(top_k=1)).filtered_logits(logits)
    assert torch.equal(torch.isfinite(filtered).sum(-1), torch.ones(16, dtype=torch.long))


def test_top_p_tiny_equals_greedy() -> None:
    logits = _logits(batch=16, vocab=300)
    want = torch.argmax(logits, dim=-1)
    sampler = Sampler(SamplingParams(temperature=1.5, top_p=1e-6, seed=7))
    assert not sampler.params.greedy
    for _ in range(5):
        assert torch.equal(sampler.sample(logits), want)


def test_top_p_keeps_smallest_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(Sampler(SamplingParams(top_p=p)).filtered_logits(logits))  # noqa: E731
    assert kept(0.45).tolist() == [[True, False, False, False]]
    assert kept(0.51).tolist() == [[True, True, False, False]]
    assert kept(0.75).tolist() == [[True, True, False, False]]
    assert kept(0.9).tolist() == [[True, True, True, False]]
    assert kept(1.0).tolist() == [[True, True, True, True]]


def test_top_k_keeps_k() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    kept = torch.isfinite(Sampler(SamplingParams(top_k=3)).filtered_logits(logits))
    assert kept.tolist() == [[False, True, True, True, False]]


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_distribution_matches_softmax() -> None:
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, -0.5])
    n = 20000
    sampler = Sampler(SamplingParams(temperature=1.0, seed=42))
    draws = sampler.sample(logits.expand(n, -1).contiguous())
    counts = torch.bincount(draws, minlength=6).double()
    probs = torch.softmax(logits.double(), -1)
    # 5 degrees of freedom: P(chi2 > 25) ~ 1.4e-4
    assert _chi_square(counts, probs) < 25.0


def test_distribution_with_temperature_and_top_k() -> None:
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, -0.5])
    n = 20000
    sampler = Sampler(SamplingParams(temperature=0.7, top_k=4, seed=3))
    counts = torch.bincount(sampler.sample(logits.expand(n, -1).contiguous()), minlength=6)
    assert counts[2] == 0 and counts[5] == 0  # outside the top 4
    keep = torch.tensor([0, 1, 3, 4])
    probs = torch.softmax(logits[keep].double() / 0.7, -1)
    assert _chi_square(counts[keep].double(), probs) < 22.0  # 3 dof


def test_half_precision_logits_sample() -> None:
    logits = _logits().to(torch.bfloat16)
    out = Sampler(SamplingParams(seed=0)).sample(logits)
    assert out.dtype == torch.long and out.shape == (4,)


def test_stop_normalized() -> None:
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=[1, 106]).stop_token_ids == (1, 106)
    assert SamplingParams(stop_token_ids=5).stop_token_ids == (5,)
    p = SamplingParams()
    assert p.stop == () and not p.greedy and not p.ignore_eos
    with pytest.raises(AttributeError):
        p.temperature = 0.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": -3},
        {"max_new_tokens": 1.5},
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": 1.01},
        {"top_p": -0.5},
        {"seed": "x"},
        {"stop": [""]},
        {"stop": [3]},
        {"stop_token_ids": [-1]},
    ],
)
def test_validation_errors(kwargs: dict) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, OllmError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_bad_logits_shape() -> None:
    with pytest.raises(OllmError):
        Sampler(SamplingParams(seed=0)).sample(torch.zeros(10))
