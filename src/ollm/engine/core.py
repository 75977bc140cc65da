"""``Engine``: one model ready to run requests under memory budgets, and everything it owns.

It owns the layer store (``store``, ``spec``, ``dtype``), the placement (``workload``, ``plan``,
``rates``), the runtime that follows the plan (``prefetcher``: pinned pools, the ring, the disk
reader, an expert cache), the ``runner``, the one-request ``generator``, the continuous batch
behind ``submit`` (``server``: a `BatchServer` over a `BatchEngine`), the draft model of
``speculate="draft:PATH"`` (another ``Engine``) and the tokenizer. A request that needs more than
was planned re-plans atomically (``engine/replan.py``): the new plan is made completely first (a
``BudgetError`` leaves the old in use), and a load that fails puts the old one back.

Requests are token ids here; ``ollm.api.LLM`` is the facade that takes text and keyword arguments
and wraps results. Every public method takes ``lock`` (re-entrant) around its check and its run,
so threads sharing an engine run one request at a time; the batch server's thread takes it for
each step, so a re-plan never replaces what a step uses.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from ollm.config import EngineConfig, choose_dtype, source_dtype_name
from ollm.engine import replan
from ollm.engine.generate import Generator, SequenceOutput
from ollm.engine.sampling import SamplingParams
from ollm.errors import BudgetError, ContextLengthError, RequestError
from ollm.sizes import format_size
from ollm.telemetry.metrics import GenerationMetrics
from ollm.telemetry.stats import IOStats

log = logging.getLogger(__name__)
# Special tokens that end a turn in common chat formats; stop on them when the vocabulary has them.
_END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")
Outputs = tuple[list[SequenceOutput], list[GenerationMetrics]]

__all__ = ["Engine"]


class Engine:
    """A model's store, plan, runtime, runner and schedulers (see the module docstring).

    >>> eng = Engine(EngineConfig(model="./store", device="cpu"))
    >>> outs, metrics = eng.generate([[1, 2, 3]], SamplingParams(max_new_tokens=8))
    """

    def __init__(self, config: EngineConfig) -> None:
        from ollm.engine.draft import budget_error, reserve_draft
        from ollm.engine.routing_calibration import plan_routing
        from ollm.planning.placement import Workload

        self.config = cfg = config
        self.device = cfg.resolve_device()
        # One request at a time: a request's check (which may re-plan, replacing the prefetcher
        # and runner) and its run must not interleave with another thread's. Re-entrant because
        # a locked request calls the public ensure_context.
        self.lock = threading.RLock()
        self._open_store()
        self.stats = IOStats()
        self.hybrid_demoted = False  # set when hybrid decode measured slower than streaming
        self.server = None  # the BatchServer behind submit(), made by the first call
        self.draft: Engine | None = None  # the draft model of speculate="draft:PATH", once loaded
        self.last_speculation = None  # SpecStats of the last speculative generate()
        # Attention routing per layer (--attention; None = full): a property of the KV objects.
        # auto keeps each calibrated top-k share of the pages at the planned context.
        self.routing = plan_routing(
            cfg.attention, self.spec, self.store_path, cfg.attention_page_tokens,
            cfg.attention_prefill, cfg.model, cfg.max_context,
        )  # fmt: skip
        # speculate=draft:PATH: the draft model loads first, resident; its bytes leave the budget.
        draft_bytes = reserve_draft(self)
        try:
            self.load(Workload(cfg.max_batch, cfg.max_context, cfg.max_context, cfg.shared_prefix))
        except BudgetError as exc:
            if self.draft is not None:
                self.draft.close()
            if draft_bytes:
                raise budget_error(self, exc, draft_bytes) from None
            raise
        rss = _rss()
        self.tokenizer = self._load_tokenizer()
        # Host RAM the tokenizer took (Gemma 3's 262k vocabulary: ~420 MiB). It is not part of
        # the plan (cpu_memory budgets weights and KV); measured so info() and reports show it.
        self.tokenizer_ram = max(0, _rss() - rss)
        self.eos_ids = self._eos_ids()
        from ollm.storage.convert import default_cache_dir

        kv_root = cfg.kv_dir or str(Path(cfg.cache_dir or default_cache_dir()) / "kv")
        self.generator = Generator(self.runner, self.stats, self.tokenizer, self.eos_ids, kv_root)

    # -- set-up -------------------------------------------------------------------------------
    def _open_store(self) -> None:
        """Convert the model if needed (into the cache) and open its layer store; the device
        budget (90% of the free GPU memory when ``gpu_memory`` is None on CUDA)."""
        from ollm.models.registry import STORE_FAMILIES, build_spec
        from ollm.storage.convert import resolve_store
        from ollm.storage.store import LayerStore

        cfg = self.config
        self.dtype_reason = "the store's"  # unless a conversion chooses one
        dtype = self._conversion_dtype()
        self.store_path = resolve_store(
            cfg.model, cfg.cache_dir, dtype, cfg.progress, families=STORE_FAMILIES
        )
        self.store = LayerStore(self.store_path)
        self.hf_config = self.store.hf_config()
        self.spec = build_spec(self.hf_config)
        self.dtype = self.store.dtype
        self.gpu_memory = cfg.gpu_memory  # the device budget the planner gets
        if self.device.startswith("cuda"):
            _expandable_segments()
            if self.gpu_memory is None:
                free, _ = torch.cuda.mem_get_info(torch.device(self.device))
                self.gpu_memory = int(free * 0.9)

    def _conversion_dtype(self) -> torch.dtype | None:
        """The dtype to convert to (None: the source's, or a layer store used as it is); records
        why in ``dtype_reason`` for ``info()``."""
        name = source_dtype_name(self.config.model)
        if name is None:
            return None
        bf16_ok = self.device.startswith("cuda") and torch.cuda.is_bf16_supported()
        chosen, self.dtype_reason = choose_dtype(self.config.dtype, name, self.device, bf16_ok)
        # The source's own dtype is passed as None: the store cache key stays what it was.
        return None if chosen == name and self.config.dtype is None else getattr(torch, chosen)

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

    # -- the plan -----------------------------------------------------------------------------
    def load(self, workload, planned=None) -> None:
        """Load the resident weights of ``planned`` (plan, rates; planned now when None) and make
        it the current placement; the attributes change only once loading succeeded."""
        replan.load(self, workload, planned)

    def replan(self, workload) -> None:
        """Switch to a placement for ``workload`` atomically (``replan.replan``)."""
        replan.replan(self, workload)

    def ensure_context(self, tokens: int, batch: int = 1) -> None:
        """Re-plan (reloading resident weights) if a request needs more KV than planned for."""
        from ollm.planning.placement import Workload

        with self.lock:
            w = self.workload
            if tokens <= w.context and batch <= w.batch:
                return
            if self.server is not None and not self.server.idle:
                # Its engine runs on the current runner and pools: they must not be replaced.
                raise RequestError(
                    f"this request needs {batch} x {tokens} tokens of KV, more than the plan's "
                    f"{w.batch} x {w.context}, and submitted requests are running; retry when "
                    "they finish, or plan for it up front (max_context, max_batch)"
                )
            context = max(tokens, w.context)
            self.replan(Workload(max(batch, w.batch), context, context, w.shared))

    def check_request(self, prompts: list[list[int]], new_tokens: int) -> None:
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
                log.info("re-planning for %d x %d tokens (was %d x %d)",
                         batch, context, w.batch, w.context)  # fmt: skip
            self.ensure_context(context, batch)

    def review_hybrid(self, metrics: GenerationMetrics, batch: int) -> None:
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
        self.hybrid_demoted = True
        self.replan(self.workload)

    # -- requests -----------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int], special: bool = True) -> list[int]:
        """Token ids of ``prompt`` (text gets the tokenizer's special tokens when ``special``),
        under the lock: a fast tokenizer must not encode while another thread uses it."""
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer: pass token ids instead of text")
        with self.lock:
            return list(self.tokenizer(prompt, add_special_tokens=special)["input_ids"])

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | Sequence[SamplingParams],
        on_text: Callable[[int, str], None] | None = None,
        on_token: Callable[[int, int], None] | None = None,
        kv_dir: str | None = None,
    ) -> Outputs:
        """Run one request: (outputs, metrics), one of each per prompt. One prompt with one
        ``SamplingParams`` runs alone; several prompts, a list of params (one per prompt) or
        speculation run by continuous batching on paged KV where the plan allows it
        (``batch_generate.generate_many``). ``kv_dir`` puts every layer's KV on disk there."""
        plist = None if isinstance(params, SamplingParams) else list(params)
        with self.lock:
            if plist is not None and len(plist) != len(prompts):
                raise RequestError(f"{len(prompts)} prompts but {len(plist)} sampling params")
            each = plist if plist is not None else [params]
            self.check_request(prompts, max(p.max_new_tokens for p in each))  # type: ignore[union-attr]
            spec = self.speculator(_request_speculate(each))  # type: ignore[arg-type]
            if len(prompts) > 1 or plist is not None or spec is not None:
                from ollm.engine.batch_generate import generate_many

                w = self.workload  # covers every prompt after the check
                outs, mets = generate_many(
                    self.generator, prompts, params, w.batch, w.context, on_text, on_token,
                    kv_dir, spec, self.rates,
                )  # fmt: skip
                self.last_speculation = None if spec is None else spec.stats
            else:
                outs, metrics = self.generator.generate(
                    prompts,
                    params,
                    on_text,
                    on_token,
                    kv_dir,  # type: ignore[arg-type]
                )
                mets = [metrics]
                self.last_speculation = None
            self.review_hybrid(mets[0], len(prompts))
        return outs, mets

    def speculator(self, kind: str | None = None):
        """A fresh `Speculator` for one request per ``kind`` (default ``config.speculate``; None
        when off); a draft model (``draft:PATH``) is loaded once, on this device, planned for
        this workload (at construction, inside the budget, when the config names it)."""
        from ollm.engine.draft import draft_path, open_draft
        from ollm.engine.speculative import build_speculator

        kind, w, draft = kind or self.config.speculate, self.workload, None
        if kind == "off":
            return None
        path = draft_path(kind)
        if path is not None:
            if self.draft is None:  # asked by a request: no share of the budget was set aside
                self.draft = open_draft(self, path, None)
            self.draft.ensure_context(w.context, w.batch)
            draft = self.draft.runner
        return build_speculator(kind, self.runner, w.batch, w.context, draft)

    def score(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Teacher-forced log-probabilities of ``token_ids[1:]`` given their prefixes (float32)."""
        ids = [int(t) for t in token_ids]
        if len(ids) < 2:
            raise RequestError("score needs at least two tokens")
        with self.lock:
            self.check_request([ids], 0)  # plans for the text's length like any request
            return self.generator.score(ids)

    def logprob_chunks(
        self, token_ids: Sequence[int], rows: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Log-softmax over the vocabulary (float32 [rows, vocab], CPU) at each position of
        ``token_ids`` but the last, ``rows`` positions at a time (``LLM.logprob_chunks``)."""
        from ollm.engine.generate import SCORE_LOGITS_BYTES

        ids = [int(t) for t in token_ids]
        if len(ids) < 2:
            raise RequestError("logprob_chunks needs at least two tokens")
        with self.lock:
            self.check_request([ids], 0)
            h = self.generator.final_hidden(ids)[:, :-1]
        step = rows or max(1, SCORE_LOGITS_BYTES // (4 * self.spec.vocab_size))
        for c0 in range(0, h.shape[1], step):
            with self.lock:  # the head's weights belong to the current placement
                logits = self.runner.logits(h[:, c0 : c0 + step])[0]
            yield torch.log_softmax(logits, dim=-1).cpu()

    # -- the shared continuous batch ----------------------------------------------------------
    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        logprobs: int | None = None,
        sink: queue.Queue | None = None,
    ):
        """Queue one request (token ids) on the shared continuous batch and return its
        `RequestStream` at once (``LLM.submit`` says more). The plan grows for it only while
        no submitted request runs; until then a request beyond the planned context is refused."""
        from ollm.engine.batch import batch_supported
        from ollm.engine.kvpools import batch_unsupported
        from ollm.engine.serving import BatchServer

        with self.lock:
            if self.server is None or self.server.idle:
                self.check_request([prompt], params.max_new_tokens)  # no engine: re-plan is safe
            elif len(prompt) + params.max_new_tokens > self.workload.context:
                raise RequestError(
                    f"{len(prompt)} prompt + {params.max_new_tokens} new tokens exceed the "
                    f"running batch's context of {self.workload.context} (max_context)"
                )
            if not batch_supported(self.runner):
                why = batch_unsupported(self.runner) or (
                    "it needs the device-resident KV of this plan on one device"
                )
                raise RequestError(f"submit() cannot run this model: {why} (use generate())")
            if self.server is None:
                text = self.tokenizer is not None
                self.server = BatchServer(self._batch_engine, self.lock, text=text)
            return self.server.submit(
                prompt, params, priority=priority, logprobs=logprobs, sink=sink
            )

    def _batch_engine(self):
        """The `BatchEngine` of the shared batch, on the current plan (the server calls this
        under the lock when a request arrives with none running)."""
        from ollm.engine.batch import BatchEngine

        w = self.workload
        # Disk-tier pools go under the engine's KV directory, as generate()'s do.
        eng = BatchEngine.for_plan(
            self.runner, self.tokenizer, self.eos_ids, w.batch, w.context, self.generator.kv_dir,
            rates=self.rates,
        )  # fmt: skip
        # Drafts for requests that ask (SamplingParams.speculate), or all when the engine
        # speculates; lookup costs nothing when it does not.
        kind = self.config.speculate
        eng.speculator = self.speculator("auto" if kind == "off" else kind)
        eng.speculate_default = kind != "off"
        return eng

    def batch_stats(self) -> dict[str, int]:
        """State of the submitted requests' batch (`BatchServer.stats`; zeros before any)."""
        server = self.server
        if server is None:
            keys = ("running", "waiting", "kv_used", "kv_blocks", "prefix_hits")
            return dict.fromkeys((*keys, "prefix_saved_tokens", "preemptions"), 0)
        return server.stats()

    # -- reports and clean-up -----------------------------------------------------------------
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
            "dtype": f"{str(self.dtype).removeprefix('torch.')} ({self.dtype_reason})",
            "weights": format_size(self.store.total_nbytes),
            "plan": dict(self.plan.describe()),
            "tokenizer RAM": format_size(self.tokenizer_ram),
        }

    def close(self) -> None:
        """Stop the loader thread and free pinned and device buffers (after a running request)."""
        if self.server is not None:  # before the lock: its thread takes the lock to step
            self.server.close()
            self.server = None
        with self.lock:
            self.prefetcher.close()
            if self.draft is not None:
                self.draft.close()
        if self.device.startswith("cuda"):
            # The dropped buffers go back to the device, not to this process's allocator cache:
            # an LLM made next in the process (a re-plan, a bench's next case) then gets fresh
            # segments sized for its own plan instead of splitting this one's, which on an H200
            # left its peak reserved 0.1-0.16 GiB above its plan (docs/benchmarks.md, 2026-12-02
            # eleventh session). What a live request still holds is freed with it.
            torch.cuda.empty_cache()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _request_speculate(params: Sequence[SamplingParams]) -> str | None:
    """The drafter the requests ask for (`SamplingParams.speculate`): the first one set other
    than "off" (the engine has one drafter; "off" requests skip it), "off" when all say so,
    None (the engine's setting) when none does."""
    asked = [p.speculate for p in params if p.speculate is not None]
    on = [k for k in asked if k != "off"]
    return on[0] if on else ("off" if asked and len(asked) == len(params) else None)


def _rss() -> int:
    """Resident bytes of this process."""
    import psutil

    return psutil.Process().memory_info().rss


def _expandable_segments() -> None:
    """Let PyTorch's CUDA allocator grow segments in place instead of caching fixed blocks: the
    prefill's buffers change size from layer to layer and chunk to chunk, and with fixed blocks
    the reserved memory (what a GPU budget must hold) rose 1 GiB above the allocated peak at 32k.
    A setting the user made in PYTORCH_CUDA_ALLOC_CONF wins."""
    if "expandable_segments" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        return
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:
        setter = torch.cuda.memory._set_allocator_settings
    try:
        setter("expandable_segments:True")
    except RuntimeError as exc:  # a platform without it keeps the default allocator
        log.debug("expandable segments unavailable: %s", exc)
