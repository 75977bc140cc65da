"""Public API: ``LLM``, ``SamplingParams``, ``GenerationResult``.

``LLM`` is a facade over one `ollm.engine.core.Engine`, which owns the store, the plan, the
runtime, the runner, the schedulers and the re-plan: ``LLM`` turns keyword arguments into an
``EngineConfig``, text into token ids (under the engine's lock, with the request run) and
outputs into ``GenerationResult``s; its attributes (``plan``, ``runner``, ``workload``, ...) are
the engine's.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ollm.api_support import Parts, TextStream, encode_prompts
from ollm.config import EngineConfig
from ollm.engine.core import Engine
from ollm.engine.sampling import SamplingParams
from ollm.layers.segments import is_parts
from ollm.telemetry.metrics import GenerationMetrics

Prompt = str | Sequence[int]

__all__ = ["LLM", "SamplingParams", "GenerationResult"]


@dataclass
class GenerationResult:
    """One sequence's output with the request's metrics."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    metrics: GenerationMetrics


def _engine_attr(name: str, doc: str) -> property:
    """A property of ``LLM`` that reads and sets the engine's attribute ``name``."""

    def get(self: LLM) -> object:
        return getattr(self.engine, name)

    def set_(self: LLM, value: object) -> None:
        setattr(self.engine, name, value)

    return property(get, set_, doc=doc)


class LLM:
    """A model ready to generate under memory budgets.

    >>> llm = LLM()                          # default model (Gemma 3 270M), CPU or first GPU
    >>> llm = LLM("./Llama-3.2-3B", device="cuda:0", gpu_memory="4GiB")
    """

    config = _engine_attr("config", "The EngineConfig (less a draft model's share of cpu_memory)")
    device = _engine_attr("device", "The execution device, resolved (e.g. 'cuda:0', 'cpu')")
    store_path = _engine_attr("store_path", "The layer store's directory")
    store = _engine_attr("store", "The open LayerStore")
    hf_config = _engine_attr("hf_config", "The model's transformers config")
    spec = _engine_attr("spec", "The ModelSpec: the architecture as data")
    dtype = _engine_attr("dtype", "The weights' torch dtype")
    stats = _engine_attr("stats", "I/O counters (IOStats) of every request")
    tokenizer = _engine_attr("tokenizer", "The tokenizer (None: token ids only)")
    tokenizer_ram = _engine_attr("tokenizer_ram", "Host bytes the tokenizer took")
    workload = _engine_attr("workload", "The Workload (batch x context) the plan is for")
    plan = _engine_attr("plan", "The current PlacementPlan")
    rates = _engine_attr("rates", "The cost model's measured MachineRates (None: not needed)")
    prefetcher = _engine_attr("prefetcher", "The Prefetcher streaming the plan's layers")
    runner = _engine_attr("runner", "The Runner of the current plan")
    last_speculation = _engine_attr("last_speculation", "SpecStats of the last generate()")
    _lock = _engine_attr("lock", "The engine's re-entrant request lock")
    _engine = _engine_attr("generator", "The one-request Generator")
    _server = _engine_attr("server", "The BatchServer behind submit() (None before)")
    _draft = _engine_attr("draft", "The draft model's Engine (speculate='draft:PATH')")
    _hybrid_demoted = _engine_attr("hybrid_demoted", "Hybrid decode measured too slow")

    def __init__(self, model: str | Path | None = None, **kwargs: object) -> None:
        config = EngineConfig(model=None if model is None else str(model), **kwargs)  # type: ignore[arg-type]
        self.engine = Engine(config)

    # -- plan ---------------------------------------------------------------------------------
    def _load(self, workload, planned=None) -> None:
        """Load ``planned`` (plan, rates) as the current placement (`Engine.load`)."""
        self.engine.load(workload, planned)

    def _replan(self, workload) -> None:
        """Switch to a placement for ``workload`` atomically (`Engine.replan`)."""
        self.engine.replan(workload)

    def ensure_context(self, tokens: int, batch: int = 1) -> None:
        """Re-plan (reloading resident weights) if a request needs more KV than planned for."""
        self.engine.ensure_context(tokens, batch)

    def _review_hybrid(self, metrics: GenerationMetrics, batch: int) -> None:
        self.engine.review_hybrid(metrics, batch)

    def _eos_ids(self) -> set[int]:
        return set(self.engine.eos_ids)

    def _encode(self, prompt: Prompt, special: bool = True) -> list[int]:
        return self.engine.encode(prompt, special)

    # -- generation ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Parts | Sequence[Prompt | Parts],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        _on_text=None,
        _on_token=None,
        _special: bool = True,
        _kv_dir: str | None = None,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (text or token ids) or a list; returns one result or a list.

        Text gets only the tokenizer's special tokens (e.g. BOS); use ``chat`` for templates.
        ``params`` may be a list, one per prompt. Several prompts (or a list of params) run by
        continuous batching on paged KV when the plan keeps all KV on the device (no padding,
        each prompt at its own length, shared prefixes computed once), else as a padded batch.

        Routing by segment (with ``attention`` other than full): a prompt may be given as parts,
        ``[(instructions, "full"), (document, "routed"), (question, "full")]``: the texts are
        joined and encoded once, and every routed layer reads the ``full`` parts' tokens whole
        at every decode step, outside the top-k budget; token spans of the prompt may be given
        instead as ``SamplingParams(full_attention=[(0, 120), (-40, None)])``.
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            params = list(params)
        single = (
            isinstance(prompts, str)
            or is_parts(prompts)
            or (isinstance(prompts, Sequence) and len(prompts) > 0 and isinstance(prompts[0], int))
        )
        batch = [prompts] if single else list(prompts)  # type: ignore[list-item]
        # Encode, check (maybe re-plan) and run as one: a fast tokenizer shared between threads
        # can fail with "Already borrowed", and a re-plan replaces what a running request uses.
        with self._lock:
            ids, params = encode_prompts(self.engine, batch, params, _special)
            outs, mets = self.engine.generate(ids, params, _on_text, _on_token, _kv_dir)
        results = [
            GenerationResult(o.text, o.token_ids, o.prompt_ids, o.finish_reason or "length", m)
            for o, m in zip(outs, mets, strict=True)
        ]
        return results[0] if single else results

    def chat(
        self, messages: list[dict[str, str]], params: SamplingParams | None = None
    ) -> GenerationResult:
        """Apply the model's chat template to ``messages`` and generate the assistant's reply."""
        return self.generate(self.render_chat(messages), params, _special=False)  # type: ignore[return-value]

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """``messages`` in the model's chat template, ready for the assistant's turn."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use generate() with raw text")
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, *, chat: bool = False
    ) -> TextStream:
        """Iterate over text pieces as they are generated; ``.result`` holds the final result."""
        if chat:
            prompt = self.render_chat(prompt)  # type: ignore[arg-type]
        return TextStream(self, prompt, params or SamplingParams(), special=not chat)

    def score(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Teacher-forced log-probabilities of ``token_ids[1:]`` given their prefixes (float32)."""
        return self.engine.score(token_ids)

    def logprob_chunks(
        self, token_ids: Sequence[int], rows: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Log-softmax over the vocabulary (float32 [rows, vocab], CPU) at each position of
        ``token_ids`` but the last (position t predicts token t + 1), a few positions at a time:
        one forward pass, then the head chunk by chunk, so no [tokens, vocab] tensor exists at
        once (used by ``ollm.eval`` to compare whole distributions of two settings)."""
        return self.engine.logprob_chunks(token_ids, rows)

    def info(self) -> dict[str, object]:
        """Architecture, sizes and the placement plan."""
        return self.engine.info()

    def encode(self, prompt: Prompt, special: bool = True) -> list[int]:
        """Token ids of ``prompt`` (text gets the tokenizer's special tokens when ``special``),
        under the request lock: a fast tokenizer must not encode while another thread uses it."""
        return self.engine.encode(prompt, special)

    def batch_stats(self) -> dict[str, int]:
        """State of the submitted requests' batch (`BatchServer.stats`; zeros before any)."""
        return self.engine.batch_stats()

    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        logprobs: int | None = None,
        sink: queue.Queue | None = None,
    ):
        """Queue one request on a shared continuous batch and return its stream at once: iterate
        it for text pieces (token ids without a tokenizer), ``wait()`` for the output,
        ``cancel()`` to stop it. Lower ``priority`` runs first; ``logprobs`` (top-N) fills the
        stream's ``.logprobs``; ``sink`` replaces its queue of pieces (`RequestStream`).
        Requests from any thread join the running batch at its next step
        (``ollm.engine.serving``); a server sits on this. Needs a plan with every layer's
        KV on the device. The plan grows for a longer request only while no submitted request
        runs; until then a request longer than the planned context is refused."""
        params = params or SamplingParams()
        with self._lock:
            ids = self.engine.encode(prompt)
            return self.engine.submit(ids, params, priority=priority, logprobs=logprobs, sink=sink)

    def close(self) -> None:
        """Stop the loader thread and free pinned and device buffers (after a running request)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
