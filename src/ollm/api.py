"""Public API: ``LLM``, ``SamplingParams``, ``GenerationResult``."""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ollm.api_support import TextStream, _expandable_segments
from ollm.config import EngineConfig, choose_dtype, source_dtype_name
from ollm.engine import replan
from ollm.engine.generate import Generator
from ollm.engine.sampling import SamplingParams
from ollm.errors import BudgetError, ContextLengthError, RequestError
from ollm.sizes import format_size
from ollm.telemetry.metrics import GenerationMetrics
from ollm.telemetry.stats import IOStats

log = logging.getLogger(__name__)
Prompt = str | Sequence[int]
# Special tokens that end a turn in common chat formats; stop on them when the vocabulary has them.
_END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")

__all__ = ["LLM", "SamplingParams", "GenerationResult"]


@dataclass
class GenerationResult:
    """One sequence's output with the request's metrics."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    metrics: GenerationMetrics


class LLM:
    """A model ready to generate under memory budgets.

    >>> llm = LLM()                          # default model (Gemma 3 270M), CPU or first GPU
    >>> llm = LLM("./Llama-3.2-3B", device="cuda:0", gpu_memory="4GiB")
    """

    def __init__(self, model: str | Path | None = None, **kwargs: object) -> None:
        self.config = EngineConfig(model=None if model is None else str(model), **kwargs)  # type: ignore[arg-type]
        from ollm.models.registry import STORE_FAMILIES, build_spec
        from ollm.planning.placement import Workload
        from ollm.storage.convert import resolve_store
        from ollm.storage.store import LayerStore

        cfg = self.config
        self.device = cfg.resolve_device()
        self._dtype_reason = "the store's"  # unless a conversion chooses one
        dtype = self._conversion_dtype()
        self.store_path = resolve_store(
            cfg.model, cfg.cache_dir, dtype, cfg.progress, families=STORE_FAMILIES
        )
        self.store = LayerStore(self.store_path)
        self.hf_config = self.store.hf_config()
        self.spec = build_spec(self.hf_config)
        self.dtype = self.store.dtype
        self._gpu_memory = cfg.gpu_memory
        if self.device.startswith("cuda"):
            _expandable_segments()
        if self.device.startswith("cuda") and self._gpu_memory is None:
            free, _ = torch.cuda.mem_get_info(torch.device(self.device))
            self._gpu_memory = int(free * 0.9)
        self.stats = IOStats()
        self._hybrid_demoted = False  # set when hybrid decode measured slower than streaming
        # One request at a time: a request's check (which may re-plan, replacing the prefetcher
        # and runner) and its run must not interleave with another thread's. Re-entrant because
        # a locked request calls the public ensure_context.
        self._lock = threading.RLock()
        self._server = None  # the BatchServer behind submit(), made by the first call
        self._draft: LLM | None = None  # the draft model of speculate="draft:PATH", once loaded
        self.last_speculation = None  # SpecStats of the last speculative generate()
        from ollm.engine.routing_calibration import plan_routing

        # Attention routing per layer (--attention; None = full): a property of the KV objects.
        self._routing = plan_routing(
            cfg.attention, self.spec, self.store_path, cfg.attention_page_tokens,
            cfg.attention_prefill, cfg.model,
        )  # fmt: skip
        from ollm.draft_model import budget_error, reserve_draft

        # speculate=draft:PATH: the draft model loads first, resident; its bytes leave the budget.
        draft_bytes = reserve_draft(self)
        try:
            self._load(Workload(cfg.max_batch, cfg.max_context, cfg.max_context))
        except BudgetError as exc:
            if self._draft is not None:
                self._draft.close()
            if draft_bytes:
                raise budget_error(self, exc, draft_bytes) from None
            raise
        rss = _rss()
        self.tokenizer = self._load_tokenizer()
        # Host RAM the tokenizer took (Gemma 3's 262k vocabulary: ~420 MiB). It is not part of
        # the plan (cpu_memory budgets weights and KV); measured so info() and reports show it.
        self.tokenizer_ram = max(0, _rss() - rss)
        from ollm.storage.convert import default_cache_dir as _cache_root

        kv_root = cfg.kv_dir or str(Path(cfg.cache_dir or _cache_root()) / "kv")
        self._engine = Generator(self.runner, self.stats, self.tokenizer, self._eos_ids(), kv_root)

    # -- set-up helpers -----------------------------------------------------------------------
    def _conversion_dtype(self) -> torch.dtype | None:
        """The dtype to convert to (None: the source's, or a layer store used as it is); records
        why in ``_dtype_reason`` for ``info()``."""
        name = source_dtype_name(self.config.model)
        if name is None:
            return None
        bf16_ok = self.device.startswith("cuda") and torch.cuda.is_bf16_supported()
        chosen, self._dtype_reason = choose_dtype(self.config.dtype, name, self.device, bf16_ok)
        # The source's own dtype is passed as None: the store cache key stays what it was.
        return None if chosen == name and self.config.dtype is None else getattr(torch, chosen)

    def _plan(self, workload):
        """(plan, measured rates or None) for ``workload``; loads nothing, changes nothing."""
        return replan.plan_for(self, workload)

    def _load(self, workload, planned=None) -> None:
        """Load the resident weights of ``planned`` (plan, rates; planned now when None) and make
        it the current placement; the attributes change only once loading succeeded."""
        replan.load(self, workload, planned)

    def ensure_context(self, tokens: int, batch: int = 1) -> None:
        """Re-plan (reloading resident weights) if a request needs more KV than planned for."""
        from ollm.planning.placement import Workload

        with self._lock:
            w = self.workload
            if tokens <= w.context and batch <= w.batch:
                return
            if self._server is not None and not self._server.idle:
                # Its engine runs on the current runner and pools: they must not be replaced.
                raise RequestError(
                    f"this request needs {batch} x {tokens} tokens of KV, more than the plan's "
                    f"{w.batch} x {w.context}, and submitted requests are running; retry when "
                    "they finish, or plan for it up front (max_context, max_batch)"
                )
            context = max(tokens, w.context)
            self._replan(Workload(max(batch, w.batch), context, context))

    def _replan(self, workload) -> None:
        """Switch to a placement for ``workload``. Planning comes first and changes nothing (a
        BudgetError leaves the current placement in use). The old buffers are released before
        the new ones load, since both may not fit the GPU budget; if loading fails, the old
        plan is loaded again and the error re-raised."""
        replan.replan(self, workload)

    def _load_tokenizer(self):
        names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
        if not any((self.store_path / n).exists() for n in names):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.store_path))

    def _eos_ids(self) -> set[int]:
        ids = set(self.spec.eos_token_ids)
        gen = self.store_path / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids |= {eos} if isinstance(eos, int) else set(eos or [])
        tok = self.tokenizer
        if tok is not None:
            if tok.eos_token_id is not None:
                ids.add(int(tok.eos_token_id))
            vocab = tok.get_vocab()
            ids |= {vocab[t] for t in _END_OF_TURN if t in vocab}
        return ids

    def _encode(self, prompt: Prompt, special: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: pass token ids instead of text")
            return list(self.tokenizer(prompt, add_special_tokens=special)["input_ids"])
        return [int(t) for t in prompt]

    def _check_request(self, prompts: list[list[int]], new_tokens: int) -> None:
        """Validate a request and grow the plan when it needs more KV or activations than
        reserved (for the real length, even beyond the model's trained context). Call with
        the lock held: a re-plan replaces the prefetcher a running request uses."""
        if not prompts:
            raise RequestError("a request needs at least one prompt")
        if any(len(p) == 0 for p in prompts):
            raise RequestError(
                "every prompt needs at least one token: the prompt is empty "
                "(and the tokenizer adds no BOS token)"
            )
        longest = max(len(p) for p in prompts)
        trained = getattr(self.hf_config, "max_position_embeddings", None)
        if trained and longest > trained:
            msg = (
                f"the prompt has {longest} tokens, more than the model's "
                f"max_position_embeddings ({trained}); output quality past it is not assured"
            )
            if self.config.strict_context:
                raise ContextLengthError(msg + " (strict_context=True)")
            log.warning("%s", msg)
        context, batch = longest + new_tokens, len(prompts)
        w = self.workload
        if context > w.context or batch > w.batch:
            if self.plan.budget is not None:
                log.info(
                    "re-planning for %d x %d tokens (was %d x %d)",
                    batch,
                    context,
                    w.batch,
                    w.context,
                )
            self.ensure_context(context, batch)

    # -- generation ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
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
        """
        params = SamplingParams() if params is None else params
        plist = None if isinstance(params, SamplingParams) else list(params)
        single = isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and len(prompts) > 0 and isinstance(prompts[0], int)
        )
        batch = [prompts] if single else list(prompts)  # type: ignore[list-item]
        # Encode, check (maybe re-plan) and run as one: a fast tokenizer shared between threads
        # can fail with "Already borrowed", and a re-plan replaces what a running request uses.
        with self._lock:
            ids = [self._encode(p, _special) for p in batch]
            if plist is not None and len(plist) != len(ids):
                raise RequestError(f"{len(ids)} prompts but {len(plist)} sampling params")
            each = plist if plist is not None else [params]
            self._check_request(ids, max(p.max_new_tokens for p in each))  # type: ignore[union-attr]
            spec = self._speculator(_request_speculate(each))  # on the batch engine
            if len(ids) > 1 or plist is not None or spec is not None:
                from ollm.engine.batch_generate import generate_many

                w = self.workload  # covers every prompt after the check
                outs, mets = generate_many(
                    self._engine, ids, params, w.batch, w.context, _on_text, _on_token, _kv_dir,
                    spec,
                )  # fmt: skip
                self.last_speculation = None if spec is None else spec.stats
            else:
                outs, metrics = self._engine.generate(ids, params, _on_text, _on_token, _kv_dir)  # type: ignore[arg-type]
                mets = [metrics]
                self.last_speculation = None
            self._review_hybrid(mets[0], len(ids))
        results = [
            GenerationResult(o.text, o.token_ids, o.prompt_ids, o.finish_reason or "length", m)
            for o, m in zip(outs, mets, strict=True)
        ]
        return results[0] if single else results

    def _speculator(self, kind: str | None = None):
        """A fresh `Speculator` for one request per ``kind`` (default ``config.speculate``; None
        when off); a draft model (``draft:PATH``) is loaded once, on this device, planned for
        this workload (at construction, inside the budget, when the config names it)."""
        from ollm.draft_model import draft_path, open_draft
        from ollm.engine.speculative import build_speculator

        kind, w, draft = kind or self.config.speculate, self.workload, None
        if kind == "off":
            return None
        path = draft_path(kind)
        if path is not None:
            if self._draft is None:  # asked by a request: no share of the budget was set aside
                self._draft = open_draft(self, path, None)
            self._draft.ensure_context(w.context, w.batch)
            draft = self._draft.runner
        return build_speculator(kind, self.runner, w.batch, w.context, draft)

    def _review_hybrid(self, metrics: GenerationMetrics, batch: int) -> None:
        """Hybrid decode is chosen on a prediction; keep it only while measurement agrees. When a
        request of at least 8 decode steps runs below 90% of the rate predicted for streaming
        alone (a simple, well-predicted path), later requests stream every RAM layer instead
        (one re-plan). A forced ``cpu_layers`` is left alone."""
        if not self.plan.cpu_layers or self.config.cpu_layers is not None or batch != 1:
            return
        stream = float(self.plan.predicted.get("stream-only tok/s", 0.0))
        measured = metrics.decode_tokens_per_second
        if metrics.generated_tokens - 1 < 8 or not stream or measured >= 0.9 * stream:
            return
        log.warning(
            "hybrid decode measured %.2f tok/s, below the %.2f tok/s predicted for streaming "
            "alone: later requests stream every RAM layer (hybrid='off' skips this trial)",
            measured,
            stream,
        )
        self._hybrid_demoted = True
        self._replan(self.workload)

    def chat(
        self, messages: list[dict[str, str]], params: SamplingParams | None = None
    ) -> GenerationResult:
        """Apply the model's chat template to ``messages`` and generate the assistant's reply."""
        return self.generate(self.render_chat(messages), params, _special=False)  # type: ignore[return-value]

    def render_chat(self, messages: list[dict[str, str]]) -> str:
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
        ids = [int(t) for t in token_ids]
        if len(ids) < 2:
            raise RequestError("score needs at least two tokens")
        with self._lock:
            self._check_request([ids], 0)  # plans for the text's length like any request
            return self._engine.score(ids)

    def logprob_chunks(
        self, token_ids: Sequence[int], rows: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Log-softmax over the vocabulary (float32 [rows, vocab], CPU) at each position of
        ``token_ids`` but the last (position t predicts token t + 1), a few positions at a time:
        one forward pass, then the head chunk by chunk, so no [tokens, vocab] tensor exists at
        once (used by ``ollm.eval`` to compare whole distributions of two settings)."""
        from ollm.engine.generate import SCORE_LOGITS_BYTES

        ids = [int(t) for t in token_ids]
        if len(ids) < 2:
            raise RequestError("logprob_chunks needs at least two tokens")
        with self._lock:
            self._check_request([ids], 0)
            h = self._engine.final_hidden(ids)[:, :-1]
        step = rows or max(1, SCORE_LOGITS_BYTES // (4 * self.spec.vocab_size))
        for c0 in range(0, h.shape[1], step):
            with self._lock:  # the head's weights belong to the current placement
                logits = self.runner.logits(h[:, c0 : c0 + step])[0]
            yield torch.log_softmax(logits, dim=-1).cpu()

    def info(self) -> dict[str, object]:
        """Architecture, sizes and the placement plan."""
        s = self.spec
        return {
            "store": str(self.store_path),
            "model_type": s.family,
            "layers": s.num_layers,
            "hidden_size": s.hidden_size,
            "heads / kv heads": f"{s.num_heads} / {s.num_kv_heads}",
            "vocab": s.vocab_size,
            "dtype": f"{str(self.dtype).removeprefix('torch.')} ({self._dtype_reason})",
            "weights": format_size(self.store.total_nbytes),
            "plan": dict(self.plan.describe()),
            "tokenizer RAM": format_size(self.tokenizer_ram),
        }

    def encode(self, prompt: Prompt, special: bool = True) -> list[int]:
        """Token ids of ``prompt`` (text gets the tokenizer's special tokens when ``special``),
        under the request lock: a fast tokenizer must not encode while another thread uses it."""
        with self._lock:
            return self._encode(prompt, special)

    def batch_stats(self) -> dict[str, int]:
        """State of the submitted requests' batch (`BatchServer.stats`; zeros before any)."""
        server = self._server
        if server is None:
            keys = ("running", "waiting", "kv_used", "kv_blocks", "prefix_hits")
            return dict.fromkeys((*keys, "prefix_saved_tokens", "preemptions"), 0)
        return server.stats()

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
        from ollm.engine.batch import BatchEngine, batch_supported
        from ollm.engine.serving import BatchServer

        params = params or SamplingParams()
        with self._lock:
            ids = self._encode(prompt)
            if self._server is None or self._server.idle:
                self._check_request([ids], params.max_new_tokens)  # no engine: a re-plan is safe
            elif len(ids) + params.max_new_tokens > self.workload.context:
                raise RequestError(
                    f"{len(ids)} prompt + {params.max_new_tokens} new tokens exceed the running "
                    f"batch's context of {self.workload.context} (max_context)"
                )
            if not batch_supported(self.runner):
                raise RequestError(
                    "submit() needs the device-resident KV of this plan on one device "
                    "(use generate() or stream())"
                )
            if self._server is None:

                def make() -> BatchEngine:  # called by the server under self._lock
                    w = self.workload
                    eos = self._eos_ids()
                    # Disk-tier pools go under the LLM's KV directory, as generate()'s do.
                    eng = BatchEngine.for_plan(
                        self.runner, self.tokenizer, eos, w.batch, w.context, self._engine.kv_dir
                    )
                    # Drafts for requests that ask (SamplingParams.speculate), or all when the
                    # LLM speculates; lookup costs nothing when the LLM does not.
                    kind = self.config.speculate
                    eng.speculator = self._speculator("auto" if kind == "off" else kind)
                    eng.speculate_default = kind != "off"
                    return eng

                self._server = BatchServer(make, self._lock, text=self.tokenizer is not None)
            return self._server.submit(ids, params, priority=priority, logprobs=logprobs, sink=sink)

    def close(self) -> None:
        """Stop the loader thread and free pinned and device buffers (after a running request)."""
        if self._server is not None:  # before the lock: its thread takes the lock to step
            self._server.close()
            self._server = None
        with self._lock:
            self.prefetcher.close()
            if self._draft is not None:
                self._draft.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _request_speculate(params: Sequence[SamplingParams]) -> str | None:
    """The drafter the requests ask for (`SamplingParams.speculate`): the first one set other
    than "off" (the engine has one drafter; "off" requests skip it), "off" when all say so,
    None (the LLM's setting) when none does."""
    asked = [p.speculate for p in params if p.speculate is not None]
    on = [k for k in asked if k != "off"]
    return on[0] if on else ("off" if asked and len(asked) == len(params) else None)


def _rss() -> int:
    """Resident bytes of this process."""
    import psutil

    return psutil.Process().memory_info().rss
