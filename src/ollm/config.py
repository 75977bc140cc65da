"""EngineConfig: every knob of an LLM instance, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ollm.errors import DeviceError, OllmError
from ollm.planning.placement import OFFLOAD_MODES
from ollm.sizes import parse_size

_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class EngineConfig:
    """Settings of an ``LLM``; sizes accept strings like ``"6GiB"``."""

    model: str | None = None  # HF dir, .gguf file or layer store; None = default model
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    gpu_memory: int | None = None  # GPU budget in bytes; None = 90% of the card's free memory
    cpu_memory: int | None = None  # RAM budget for weights kept in RAM; None = no limit
    offload: str = "auto"  # "auto" (by budgets), "cpu" (pinned RAM) or "disk" (stream from store)
    dtype: str | None = None  # conversion dtype; None = the source's, float32 -> half on a GPU
    max_context: int = 4096  # tokens per sequence the plan reserves KV and activations for
    max_batch: int = 1  # sequences per request the plan reserves KV for
    # leading prompt tokens every sequence shares (a system prompt): their KV is planned once
    shared_prefix: int = 0
    cache_dir: str | None = None  # where converted stores live; None = ~/.cache/ollm
    verify_checksums: bool = True  # check each store file's CRC32 on its first read
    hybrid: str = (
        "auto"  # "auto": a measured cost model picks RAM layers the CPU computes in decode; "off"
    )
    kv_cache: str = "auto"  # "auto": KV on the GPU, then pinned RAM; "disk": offloaded KV on disk
    kv_dir: str | None = (
        None  # where the disk tier writes (per-run subdirectory); None = cache_dir/kv
    )
    prefill_chunk: int | None = None  # rows per prefill chunk; None = sized from the budget
    kv_block_tokens: int = 256  # KV block size (token slots): the unit KV is split between tiers in
    cpu_layers: int | None = None  # force how many RAM layers the CPU computes in decode (hybrid)
    # Streamed layers held on the GPU while decode runs, in the bytes prefill's activations
    # leave (planning/decode_resident.py; the cost model picks them). Opt-in (False: never)
    # until a device budget check passes: on an H200 its peak reserved memory was 8.018 GiB
    # at gpu_memory=8GiB (docs/architecture.md, "Decode-resident layers").
    decode_resident: bool = False
    # Batch-engine decode: some streamed layers copy only their attention and the CPU runs their
    # MLP from RAM where the cost model says the step is shorter (planning/mlp_cpu.py); the
    # engine measures the choice against streaming every layer (engine/step_mode.py).
    mlp_cpu: bool = True
    # A long prompt's hidden states during prefill: on the GPU ("gpu"), in pinned RAM with
    # chunks moved per layer ("ram"), or in RAM only when the GPU plan is refused ("auto").
    prefill_residual: str = "auto"
    # A long prompt prefilled in segments of this many tokens, each a forward over every layer
    # (planning/segments.py): "auto"/None only when one forward is refused or pins more RAM
    # than cpu_memory; 0: always one forward.
    prefill_segment: int | str | None = "auto"
    progress: bool = True  # progress bar while converting
    strict_context: bool = False  # a prompt beyond max_position_embeddings: error, not a warning
    kv_codec: str = "none"  # KV compression (issue 17): none, int8, int4, fp8, k:KIND,v:KIND, auto
    kv_recent: int = 128  # newest tokens per sequence a compressed KV cache keeps exact
    kv_evict: str = "none"  # KV eviction (issue 17): none, streaming, h2o or snapkv
    kv_keep: str = "50%"  # tokens an evicting cache keeps: a share of the context or a count
    speculate: str = "off"  # off, auto (=lookup), lookup, self[:N], draft:PATH; tree:/mix:/cascade:
    attention: str = "full"  # decode attention routing: full, auto, window:W,sinks:S, topk:PAGES
    attention_page_tokens: int = 32  # key slots per top-k page (one min/max key summary each)
    attention_prefill: bool = False  # route prefill rows too, each as if decoded (eval scoring)

    moe_offload: str = "auto"  # MoE: "expert" (experts placed and cached one by one), "layer", auto
    expert_cache: str = "lru"  # replacement policy of the device's expert cache: lru or lfu
    expert_slots: int | None = None  # force the expert cache's slot count (None: from the budget)
    expert_cpu: str = "auto"  # RAM experts missing from the cache run on the CPU: auto, on, off
    expert_lookahead: bool = False  # prefetch the next layer's predicted experts (issue 19)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "gpu_memory", parse_size(self.gpu_memory))
        set_(self, "cpu_memory", parse_size(self.cpu_memory))
        if self.offload not in OFFLOAD_MODES:
            raise OllmError(
                f"offload must be one of {', '.join(OFFLOAD_MODES)}, not {self.offload!r}"
            )
        if self.dtype is not None:
            name = str(self.dtype).removeprefix("torch.")
            if name not in _DTYPES:
                raise OllmError(f"dtype must be one of {', '.join(_DTYPES)}, not {self.dtype!r}")
            set_(self, "dtype", name)
        if self.hybrid not in ("auto", "off"):
            raise OllmError(f"hybrid must be 'auto' or 'off', not {self.hybrid!r}")
        if self.kv_cache not in ("auto", "disk"):
            raise OllmError(f"kv_cache must be 'auto' or 'disk', not {self.kv_cache!r}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise OllmError("prefill_chunk must be >= 1")
        from ollm.planning.residual import check_mode

        check_mode(self.prefill_residual)
        from ollm.planning.segments import check_segment

        check_segment(self.prefill_segment)
        if self.kv_block_tokens < 1:
            raise OllmError("kv_block_tokens must be >= 1")
        if self.cpu_layers is not None and self.cpu_layers < 0:
            raise OllmError("cpu_layers must be >= 0")
        if self.max_context < 1 or self.max_batch < 1:
            raise OllmError("max_context and max_batch must be positive")
        if not 0 <= self.shared_prefix < self.max_context:
            raise OllmError(
                f"shared_prefix must be at least 0 and under max_context ({self.max_context}), "
                f"got {self.shared_prefix}"
            )
        if self.model is not None:
            set_(self, "model", str(Path(self.model).expanduser()))
        _check_speculate(self.speculate)
        _check_moe(self)
        _check_kv_codec(self)
        from ollm.layers.routing import parse_attention

        parse_attention(self.attention)  # a bad value is a one-line error here
        if self.attention_page_tokens < 1:
            raise OllmError("attention_page_tokens must be >= 1")

    def resolve_device(self) -> str:
        """The concrete device string; DeviceError when CUDA is asked for but absent."""
        import torch

        dev = self.device.strip().lower()
        if dev == "auto":
            return "cuda:0" if torch.cuda.is_available() else "cpu"
        if dev == "cpu":
            return "cpu"
        if dev.startswith("cuda"):
            if not torch.cuda.is_available():
                raise DeviceError(
                    f'device {self.device!r} requested but this machine has no CUDA GPU; use device="cpu"'
                )
            index = int(dev.split(":", 1)[1]) if ":" in dev else 0
            if index >= torch.cuda.device_count():
                raise DeviceError(
                    f"device {self.device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
                )
            return f"cuda:{index}"
        raise DeviceError(f"unknown device {self.device!r}: use auto, cpu, cuda or cuda:N")


def _check_moe(cfg: EngineConfig) -> None:
    """The mixture-of-experts options name known modes; a forced slot count is positive."""
    from ollm.planning.experts import CPU_MODES, MOE_MODES, POLICIES

    for name, value, allowed in (
        ("moe_offload", cfg.moe_offload, MOE_MODES),
        ("expert_cache", cfg.expert_cache, POLICIES),
        ("expert_cpu", cfg.expert_cpu, CPU_MODES),
    ):
        if value not in allowed:
            raise OllmError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    if cfg.expert_slots is not None and cfg.expert_slots < 1:
        raise OllmError("expert_slots must be >= 1")
    if not isinstance(cfg.expert_lookahead, bool):
        raise OllmError(f"expert_lookahead must be True or False, not {cfg.expert_lookahead!r}")


SPECULATE_MODES = ("tree", "mix", "cascade")  # prefixes of a speculate value


def parse_speculate(value: str) -> tuple[frozenset[str], str, str]:
    """(modes, drafter, argument) of a ``speculate`` value: ``[tree:][mix:][cascade:]KIND[:ARG]``
    with KIND off, auto, lookup, self (ARG: N >= 1 layers) or draft (ARG: PATH). ``tree``
    drafts trees, ``mix`` chooses lookup or the model per span, ``cascade`` drafts the model's
    own drafts by lookup (the last two need a model drafter). OllmError when malformed."""
    rest, modes = str(value), set()
    while rest.partition(":")[0] in SPECULATE_MODES:
        mode, _, rest = rest.partition(":")
        modes.add(mode)
    kind, _, arg = rest.partition(":")
    ok = (kind in ("off", "auto", "lookup") and not arg) or (kind == "draft" and bool(arg))
    ok = ok or (kind == "self" and (not arg or (arg.isdigit() and int(arg) >= 1)))
    ok = ok and not (modes and kind == "off")
    ok = ok and not ({"mix", "cascade"} & modes and kind not in ("self", "draft"))
    if not ok:
        raise OllmError(
            "speculate must be off, auto, lookup, self, self:N or draft:PATH, optionally "
            f"prefixed by tree:, mix: or cascade: (the last two with self or draft), not {value!r}"
        )
    return frozenset(modes), kind, arg


def _check_speculate(value: str) -> None:
    """``speculate`` is well formed (`parse_speculate`)."""
    parse_speculate(value)


def _check_kv_codec(cfg: EngineConfig) -> None:
    """``kv_codec`` parses (``kv/codecs.parse_kv_codec``), ``kv_recent`` >= 0, and no other
    option that reads the KV its own way (attention routing) is combined with it."""
    from ollm.kv.codecs import parse_kv_codec

    if cfg.kv_recent < 0:
        raise OllmError("kv_recent must be >= 0 tokens")
    try:
        codec = parse_kv_codec(cfg.kv_codec, cfg.kv_recent)
    except ValueError as exc:
        raise OllmError(str(exc)) from None
    from ollm.kv.evict import parse_eviction

    try:
        evict = parse_eviction(cfg.kv_evict, cfg.kv_keep)
    except ValueError as exc:
        raise OllmError(str(exc)) from None
    routing = getattr(cfg, "attention", "full")
    uses = (("kv_codec", codec is not None or cfg.kv_codec == "auto"), ("kv_evict", evict))
    for name, on in uses:
        if on and routing != "full":
            raise OllmError(f"{name} cannot be combined with attention {routing!r}")
    if evict is not None and codec is not None:
        from ollm.kv.codecs import KVCodec

        # an evicting cache stores its older slots encoded per token (kv/evict_codec.py)
        if cfg.kv_codec.strip().lower() == "auto" or not isinstance(codec, KVCodec):
            raise OllmError(
                f"kv_evict combines with one codec for every slot (int8, int4, fp8 or "
                f"k:KIND,v:KIND), not kv_codec {cfg.kv_codec!r}"
            )


def choose_dtype(requested: str | None, source: str, device: str, bf16_ok: bool) -> tuple[str, str]:
    """(dtype name, why) a model converts to: the requested one; else on an accelerator a
    float32 source (GGUF dequantized, or an HF float32 checkpoint) halves to bfloat16, or
    float16 where bf16 is unsupported, since float32 doubles every streamed byte; else the
    source's. ``device`` is a resolved device string such as ``"cuda:0"``."""
    if requested is not None:
        return requested, "requested"
    kind = device.split(":", 1)[0]
    if kind != "cpu" and source == "float32":
        half = "bfloat16" if bf16_ok else "float16"
        return half, f"default for {kind}; source float32"
    return source, "source's"


def source_dtype_name(model: str | None) -> str | None:
    """The dtype a conversion of ``model`` keeps by default ("float32" for GGUF and the default
    model, the config's for an HF directory); None for a layer store, which is used as it is."""
    if model is None or model.lower().endswith(".gguf"):
        return "float32"
    from ollm.storage.cache import target_dtype_name
    from ollm.storage.store import is_store

    path = Path(model)
    return None if is_store(path) else target_dtype_name(path, None)
