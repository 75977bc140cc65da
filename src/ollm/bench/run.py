"""``ollm bench``: timed generation cases next to the floors of this machine.

One case = one ``LLM`` planned for ``context + new_tokens`` tokens, a warm-up generate at the full
prompt length with ``WARMUP_NEW_TOKENS`` new tokens (so kernel selection and first reads are not
timed; every peer gets the same warm-up), then the timed generate of ``new_tokens`` greedy tokens
(EOS ignored) on a random prompt. A case that fails with an ``OllmError`` (a budget too small for
the context, say), a CUDA out-of-memory error or any other exception (logged with its traceback)
is reported with its message instead of ending the run.
"""

from __future__ import annotations

import logging
import re
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ollm.errors import OllmError
from ollm.tiers import KvTier, Phase, Tier

log = logging.getLogger(__name__)

__all__ = ["parse_contexts", "context_label", "run_case", "run_bench", "resolve_model"]

# Every engine gets this warm-up (peer_worker.py keeps a copy; llama-bench's own is the full prompt
# and one token): one untimed generate at the full prompt length.
WARMUP_NEW_TOKENS = 2

_CONTEXT_RE = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)([kK]?)$")


def parse_contexts(text: str) -> list[int]:
    """``"8k,32k"`` -> ``[8192, 32768]``. ``k``/``K`` means 1024; a fraction is allowed when the
    result is a whole number of tokens (``"1.5k"`` -> 1536), otherwise it is an error."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        m = _CONTEXT_RE.match(part)
        if not m:
            raise OllmError(f"invalid context {part!r}: expected a token count like 8192 or 8k")
        value = float(m.group(1)) * (1024 if m.group(2) else 1)
        if value != int(value) or value < 1:
            raise OllmError(f"invalid context {part!r}: must be a positive whole number of tokens")
        if int(value) not in out:
            out.append(int(value))
    return out


def context_label(tokens: int) -> str:
    """8192 -> '8k', 1536 -> '1536'."""
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


class RssSampler:
    """Peak resident set size of this process, sampled every 20 ms on a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._loop, daemon=True, name="ollm-rss")

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def disk_bytes(path: str | Path) -> int:
    """Bytes a directory occupies on disk (allocated blocks)."""
    total = 0
    for f in Path(path).rglob("*"):
        if f.is_file() and not f.is_symlink():
            st = f.stat()
            total += getattr(st, "st_blocks", 0) * 512 or st.st_size
    return total


def resolve_model(
    model: str | None,
    synthetic: str | None,
    cache_dir: str | None,
    progress: bool,
    device: str | None = None,
    offload: str | None = None,
) -> tuple[Path, str]:
    """The layer store to benchmark and a display name: a synthetic preset's cached store (checked
    against the disk and RAM before it is written for ``device`` / ``offload``), or the store of
    ``model`` (converted into the cache if needed; None = the default model)."""
    if synthetic is not None:
        from ollm.bench.models import synthetic_store

        store = synthetic_store(synthetic, cache_dir, progress, device, offload)
        return store, f"synthetic {synthetic}"
    from ollm.models.registry import STORE_FAMILIES
    from ollm.storage.convert import resolve_store

    store = resolve_store(model, cache_dir, None, progress, families=STORE_FAMILIES)
    return store, model or "default model"


def _cleanup_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_case(
    llm_kwargs: dict[str, Any],
    context_tokens: int,
    new_tokens: int,
    *,
    model: str | Path | None = None,
    probes: dict[str, object] | None = None,
    plot: str | Path | None = None,
    seed: int = 0,
    plot_steps: int = 3,
) -> dict[str, object]:
    """Time one case; returns its figures, floors and measured/floor ratios (or its error)."""
    import torch

    from ollm.api import LLM
    from ollm.engine.sampling import SamplingParams

    case: dict[str, object] = {
        "context": context_tokens,
        "label": context_label(context_tokens),
        "new_tokens": new_tokens,
    }
    kwargs = {"verify_checksums": False, "progress": False, **llm_kwargs}
    kwargs["max_context"] = context_tokens + new_tokens + 8
    llm = None
    try:
        with RssSampler() as rss:
            t = time.perf_counter()
            llm = LLM(model, **kwargs)
            case["load_s"] = time.perf_counter() - t
            case["plan"] = _plan_summary(llm)
            g = torch.Generator().manual_seed(seed)
            prompt = torch.randint(0, llm.spec.vocab_size, (context_tokens,), generator=g).tolist()
            t = time.perf_counter()
            warmup = SamplingParams(
                max_new_tokens=WARMUP_NEW_TOKENS, temperature=0, ignore_eos=True
            )
            llm.generate(prompt, warmup)
            case["warmup_s"] = time.perf_counter() - t
            res, stamps, timeline = _timed_generate(llm, prompt, new_tokens, plot)
        m = res.metrics
        steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        case.update(_metrics(m, steps))
        case["ram_peak_bytes"] = rss.peak
        case["disk_bytes"] = disk_bytes(llm.store_path)
        if probes is not None:
            _add_floors(case, llm, probes, context_tokens, m.prefill_seconds)
        if timeline is not None:
            from ollm.bench.plot import plot_timeline

            spans = timeline.spans()
            case["plot"] = str(plot_timeline(spans, plot, steps=plot_steps, title=_title(case)))
        case["status"] = "ok"
    except OllmError as exc:
        case.update(status="error", error=" ".join(str(exc).split()))
    except torch.cuda.OutOfMemoryError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "CUDA out of memory"
        case.update(status="error", error=f"CUDA out of memory: {first}")
    except Exception as exc:  # a bug: keep the other cases, show the traceback on stderr
        log.exception("bench case %s failed", case["label"])
        case.update(status="error", error=f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    finally:
        if llm is not None:
            llm.close()
        del llm
        _cleanup_cuda()
    return case


def _timed_generate(llm, prompt: list[int], new_tokens: int, plot: str | Path | None):
    """The timed greedy run: (its result, the time each of the first row's tokens arrived,
    the per-layer timeline when ``plot`` asks for one, else None)."""
    from ollm.engine.sampling import SamplingParams

    timeline = None
    if plot is not None:
        from ollm.telemetry.timeline import Timeline

        timeline = Timeline(llm.device)
        llm.runner.timeline = llm.prefetcher.timeline = timeline
    stamps: list[float] = []

    def on_token(row: int, _token: int) -> None:
        if row == 0:
            stamps.append(time.perf_counter())

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    res = llm.generate(prompt, params, _on_token=on_token)
    if timeline is not None:
        llm.runner.timeline = llm.prefetcher.timeline = None
    return res, stamps, timeline


def _add_floors(
    case: dict[str, object], llm, probes: dict[str, object], tokens: int, prefill_s: float
) -> None:
    """The case's physical floors (``bench.floors``) and its measured/floor ratios."""
    from ollm.bench.floors import compute_floors, ratio

    probes = _reprobe_cpu(probes, llm.spec, tokens)
    from ollm.kv.codecs import kv_format

    cfg, spec = llm.config, llm.spec  # compressed KV: floors count its stored bytes
    codec = getattr(llm.plan, "kv_codecs", None) or cfg.kv_codec  # auto: the plan's choice
    fmt = kv_format(codec, cfg.kv_recent, spec.head_dim, llm.store.dtype.itemsize)
    floors = compute_floors(spec, llm.store, llm.plan, probes, tokens, kv_format=fmt)
    case["floors"] = floors
    step = case.get("decode_step_median_s")
    case["ratios"] = {
        "prefill": ratio(prefill_s, floors["prefill"]["floor_s"]),  # type: ignore[index]
        "decode": ratio(step, floors["decode"]["floor_s"]),  # type: ignore[arg-type, index]
    }
    case["cpu_matmul_GFLOPs"] = probes.get("cpu_matmul_GFLOPs")


def linear_shape(spec, tokens: int) -> tuple[int, int, int]:
    """(hidden, intermediate, tokens) of the model's largest projection, for ``probe_linear``."""
    return spec.hidden_size, spec.intermediate_size, tokens


def _reprobe_cpu(probes: dict[str, object], spec, tokens: int) -> dict[str, object]:
    """On a CPU run, the matmul rate measured again right after the case; the higher of the two
    is kept (a floor divides by the best rate the machine reached: on shared cores the first
    probe may have met a load the case did not)."""
    if probes.get("device") != "cpu" or not probes.get("cpu_matmul_GFLOPs"):
        return probes
    import torch

    from ollm.bench.probes import cpu_matmul_rate

    dtype = getattr(torch, str(probes.get("dtype", "float32")))
    again = cpu_matmul_rate(dtype, linear_shape(spec, tokens)) / 1e9
    return {**probes, "cpu_matmul_GFLOPs": max(float(probes["cpu_matmul_GFLOPs"]), again)}  # type: ignore[arg-type]


def _title(case: dict[str, object]) -> str:
    return f"context {case['label']}, {case['new_tokens']} new tokens"


def _kv_tier(p) -> KvTier:
    return getattr(p, "kv_tier", KvTier.DEVICE)


def _plan_summary(llm) -> dict[str, object]:
    plan = llm.plan
    return {
        "device": plan.device,
        "budget": plan.budget,
        "gpu_layers": plan.count(Tier.GPU),
        "ram_layers": plan.count(Tier.CPU),
        "disk_layers": plan.count(Tier.DISK),
        "cpu_layers": len(plan.cpu_layers),
        "streamed_decode": len(plan.streamed_for(Phase.DECODE)),
        "kv_ram_layers": sum(_kv_tier(p) == KvTier.CPU for p in plan.layers),
        "kv_disk_layers": sum(_kv_tier(p) == KvTier.DISK for p in plan.layers),
        "prefill_chunk_tokens": getattr(plan, "prefill_chunk_tokens", 0),
        "reserved_bytes": plan.peak_device_bytes,
    }


def _metrics(m, steps: list[float]) -> dict[str, object]:
    return {
        "prompt_tokens": m.prompt_tokens,
        "generated_tokens": m.generated_tokens,
        "prefill_s": m.prefill_seconds,
        "prefill_tok_s": m.prefill_tokens_per_second,
        "ttft_s": m.time_to_first_token,
        "decode_s": m.decode_seconds,
        "decode_tok_s": m.decode_tokens_per_second,
        "decode_step_median_s": statistics.median(steps) if steps else None,
        "decode_steps_s": steps,
        "peak_gpu_bytes": m.peak_gpu_memory,
        "bytes_read_disk": m.bytes_read_disk,
        "bytes_copied_h2d": m.bytes_copied_h2d,
        "io_wait_s": m.io_wait_seconds,
        "prefill_io_wait_s": m.prefill_io_wait_seconds,
        "read_s": m.read_seconds,
        "copy_s": m.copy_seconds,
        "cpu_path_s": m.cpu_path_seconds,
        "expert_hit_rate": m.expert_hit_rate,  # MoE expert cache (None: no cache)
        "speculation": m.speculation,  # drafter, acceptance, tokens per target pass (or None)
    }


def _plot_path(plot: str | Path | None, context: int, several: bool) -> Path | None:
    if plot is None:
        return None
    p = Path(plot)
    return p.with_name(f"{p.stem}-{context_label(context)}{p.suffix or '.png'}") if several else p


def run_bench(
    *,
    model: str | None = None,
    synthetic: str | None = None,
    contexts: list[int],
    new_tokens: int,
    llm_kwargs: dict[str, Any] | None = None,
    plot: str | Path | None = None,
    progress: bool = False,
    on_case: Callable[[dict[str, object]], None] | None = None,
) -> dict[str, object]:
    """Probe the machine, then run one case per context; returns the whole report as a dict."""
    import platform

    import torch

    import ollm
    from ollm.bench.probes import measure_bandwidth
    from ollm.config import EngineConfig

    if new_tokens < 2:
        raise OllmError("--new-tokens must be at least 2 (decode is timed between tokens)")
    llm_kwargs = dict(llm_kwargs or {})
    cfg = EngineConfig(**{k: v for k, v in llm_kwargs.items() if k in _CONFIG_KEYS})
    device = cfg.resolve_device()
    store, name = resolve_model(model, synthetic, cfg.cache_dir, progress, device, cfg.offload)
    from ollm.storage.store import LayerStore

    meta = LayerStore(store)
    info = {
        "name": name,
        "store": str(store),
        "model_type": meta.model_type,
        "layers": meta.num_layers,
        "dtype": str(meta.dtype).removeprefix("torch."),
        "weights_bytes": meta.total_nbytes,
        "disk_bytes": disk_bytes(store),
    }
    from ollm.models.registry import build_spec

    linear = linear_shape(build_spec(meta.hf_config()), max(contexts))
    meta.close()
    probes = measure_bandwidth(device, store, meta.dtype, linear)
    report: dict[str, object] = {
        "model": info,
        "settings": {
            "device": device,
            "contexts": contexts,
            "new_tokens": new_tokens,
            **{k: v for k, v in llm_kwargs.items() if k != "progress"},
        },
        "probes": probes,
        "versions": {
            "ollm": ollm.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "cases": [],
    }
    for c in contexts:
        log.info("bench: context %d, %d new tokens", c, new_tokens)
        case = run_case(
            {**llm_kwargs, "device": device},
            c,
            new_tokens,
            model=store,
            probes=probes,
            plot=_plot_path(plot, c, len(contexts) > 1),
        )
        report["cases"].append(case)  # type: ignore[attr-defined]
        if on_case is not None:
            on_case(case)
    return report


_CONFIG_KEYS = ("device", "gpu_memory", "cpu_memory", "offload", "hybrid", "cache_dir")
