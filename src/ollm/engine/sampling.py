"""Token selection: sampling parameters and a sampler over ``[B, V]`` logits."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ollm.errors import OllmError
from ollm.layers.segments import check_spans

__all__ = ["SamplingParams", "SamplingParamsError", "Sampler", "TokenLogprob", "token_logprobs"]


class SamplingParamsError(OllmError, ValueError):
    """A sampling parameter is out of range or of the wrong type."""


def _as_str_tuple(value: str | Iterable[str]) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    for s in items:
        if not isinstance(s, str) or not s:
            raise SamplingParamsError(f"stop strings must be non-empty str, got {s!r}")
    return items


def _as_int_tuple(value: int | Iterable[int]) -> tuple[int, ...]:
    items = (value,) if isinstance(value, int) else tuple(value)
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise SamplingParamsError(f"stop_token_ids must be ints >= 0, got {i!r}")
    return items


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; validated at construction.

    ``stop`` also accepts a list or a single ``str`` and ``stop_token_ids`` a list or a
    single ``int``; both are normalized to tuples.
    """

    max_new_tokens: int = 128
    """Most tokens to generate (>= 1)."""
    temperature: float = 1.0
    """Softmax temperature (>= 0); 0 means greedy argmax."""
    top_k: int = 0
    """Keep only the k most likely tokens (>= 0); 0 turns it off."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set with cumulative probability >= top_p (0 < p <= 1); 1 is off."""
    seed: int | None = None
    """Seed of the sampler's generator; None uses torch's global RNG."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; the output excludes the stop string."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (besides EOS)."""
    ignore_eos: bool = False
    """Keep generating past the EOS token (until max_new_tokens or a stop)."""
    speculate: str | None = None
    """Speculative decoding for this request: None follows the LLM's ``speculate``; "off"
    drafts nothing for it; any other ``EngineConfig.speculate`` value turns it on (lossless)."""
    full_attention: tuple[tuple[int, int | None], ...] = ()
    """Routing by segment: (start, end) token spans of the prompt (end exclusive; negative from
    the prompt's end, end None = the end, as slices) that every routed layer (``attention``)
    reads whole at every decode step, outside the top-k budget; no effect on full attention."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _as_str_tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", _as_int_tuple(self.stop_token_ids))
        try:
            object.__setattr__(self, "full_attention", check_spans(self.full_attention))
        except ValueError as exc:
            raise SamplingParamsError(str(exc)) from None
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise SamplingParamsError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise SamplingParamsError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise SamplingParamsError(f"temperature must be >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingParamsError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise SamplingParamsError(f"seed must be an int or None, got {self.seed!r}")
        if self.speculate is not None:
            from ollm.config import _check_speculate  # the LLM option's own rule

            try:
                _check_speculate(self.speculate)
            except OllmError as exc:
                raise SamplingParamsError(str(exc)) from None

    @property
    def greedy(self) -> bool:
        """True when decoding is a deterministic argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0 or self.top_k == 1


def filter_logits(params: SamplingParams, logits: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``[..., V]`` after temperature, top-k and top-p (in that order, as
    transformers' warpers); removed tokens are ``-inf``. Speculative decoding filters the
    target's and the draft's logits with this same function, so both sample the same way."""
    p = params
    x = logits.float()
    if p.temperature not in (0, 1.0):
        x = x / p.temperature
    vocab = x.shape[-1]
    if 0 < p.top_k < vocab:
        kth = torch.topk(x, p.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
        remove_sorted = before >= p.top_p
        remove_sorted[..., 0] = False  # always keep the most likely token
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        x = x.masked_fill(remove, float("-inf"))
    return x


def probabilities(params: SamplingParams, logits: torch.Tensor) -> torch.Tensor:
    """Float32 probabilities ``[..., V]`` a sampler with ``params`` draws from: softmax of the
    filtered logits, or one-hot on the argmax when decoding is greedy."""
    if params.greedy:
        top = torch.argmax(logits.float(), dim=-1, keepdim=True)
        return torch.zeros(logits.shape, device=logits.device).scatter_(-1, top, 1.0)
    return torch.softmax(filter_logits(params, logits), dim=-1)


class Sampler:
    """Picks one token per row of ``[B, V]`` logits according to ``SamplingParams``."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.device = torch.device(device)
        self._gen: torch.Generator | None = None
        if params.seed is not None and not params.greedy:
            self._gen = torch.Generator(device=self.device)
            self._gen.manual_seed(params.seed)

    def filtered_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Float32 logits after temperature, top-k and top-p; removed tokens are ``-inf``."""
        return filter_logits(self.params, logits)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution tokens are drawn from (see `probabilities`)."""
        return probabilities(self.params, logits)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token id per row of ``probs`` [B, V], from this sampler's random stream."""
        gen = self._gen
        if gen is not None and probs.device != gen.device:
            return torch.multinomial(probs.to(gen.device), 1, generator=gen).squeeze(-1)
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

    def uniform(self) -> float:
        """One draw of U[0, 1) from this sampler's random stream (speculative acceptance)."""
        gen = self._gen
        return float(torch.rand((), generator=gen, device=gen.device if gen else "cpu"))

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Token ids (``LongTensor [B]``) for logits ``[B, V]`` of any float dtype."""
        if logits.dim() != 2:
            raise OllmError(f"Sampler expects logits of shape [B, V], got {tuple(logits.shape)}")
        if self.params.greedy:
            return torch.argmax(logits.float(), dim=-1)
        return self.draw(torch.softmax(self.filtered_logits(logits), dim=-1)).to(logits.device)


def greedy_picks(logits: torch.Tensor, rows: Mapping[str, tuple[int, Sampler]]) -> dict[str, int]:
    """For each ``rows[key] = (row of logits [M, V], sampler)`` whose sampler is a plain greedy
    `Sampler`, its token: one argmax over those rows and one host read for all (the argmax of
    ``Sampler.sample``, row by row the same). Other keys are left out."""
    keys = [k for k, (_, s) in rows.items() if type(s) is Sampler and s.params.greedy]
    if not keys:
        return {}
    idx = [rows[k][0] for k in keys]
    if idx != list(range(logits.shape[0])):  # not every row in order: pick them
        logits = logits[torch.tensor(idx, device=logits.device)]
    return dict(zip(keys, argmax_rows(logits.float()).tolist(), strict=True))


# Columns of one tile of `argmax_rows` on the CPU (Llama 3's 128256 and Gemma's 262144 are
# multiples): its max is one vectorised reduction, argmax's own CPU kernel is ~9x slower.
ARGMAX_TILE = 256


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(x, dim=-1)`` of a 2-D tensor, the same indices (the first maximum, a NaN
    counting as the maximum). On the CPU, with the columns a multiple of `ARGMAX_TILE`, in two
    passes: each tile's max (`amax`), then the first tile holding the row's maximum (argmax of
    the tile maxima: its first maximum) and argmax inside it; elsewhere one argmax."""
    b, v = x.shape
    if x.device.type != "cpu" or v % ARGMAX_TILE or v < 16 * ARGMAX_TILE:
        return torch.argmax(x, dim=-1)
    tiles = x.reshape(b, v // ARGMAX_TILE, ARGMAX_TILE)
    j = tiles.amax(dim=-1).argmax(dim=-1)
    return j * ARGMAX_TILE + tiles[torch.arange(b), j].argmax(dim=-1)


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model's raw distribution (before
    temperature, top-k and top-p, as vLLM reports) and the ``top`` likeliest (token, log-prob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """Each row's chosen token's log-probability and the ``top`` likeliest tokens."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device).view(-1, 1))[:, 0].tolist()
    vals, ids = torch.topk(lp, top, dim=-1) if top else (lp[:, :0], lp[:, :0].long())
    return [
        TokenLogprob(t, c, list(zip(i, v, strict=True)))
        for t, c, i, v in zip(tokens, chosen, ids.tolist(), vals.tolist(), strict=True)
    ]
