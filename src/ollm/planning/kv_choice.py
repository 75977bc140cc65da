"""``--kv-codec auto``: the codec of each KV tier (device, pinned RAM, disk), chosen from the
machine's measured rates (pure: the engine hands the rates in, ``kv.codecs`` the candidates).

For each tier and the plan's context, a decode step's time to read and attend one layer's KV is
estimated for every candidate codec the quality rule allows, and the fastest is kept:

* device tier, GPU: stored bytes / GPU memory rate (the Triton kernel reads the codes and
  dequantizes in registers; unmeasured on a GPU, so taken as read-bound);
* device tier, CPU machine: exact bytes / the CPU attention rate x the codec's measured CPU
  decode cost (``kv.codecs.CPU_ATTN_COST``: codes cost more than bf16 there);
* pinned RAM: the faster of copying the stored bytes over the host->GPU link and attending
  them on the GPU, or attending them on the CPU (the planner's hybrid choice makes the same
  split per layer);
* disk: stored bytes / the disk read rate, then the GPU path above (or the CPU attention on
  a CPU machine).

A lossy codec is kept only where it saves at least ``MIN_GAIN`` of the layer's decode time
(its weights plus its exact KV): the device tier's KV read is negligible next to the weight
stream up to very long contexts, so it stays exact. Quality rule (measured on Gemma 3 270M,
docs/benchmarks.md "KV compression"): int8 changes perplexity by 0.001% (allowed with any
exact window); int4 keys and values with a 128-token exact window by +0.61% at 2k, +0.25% at
8k when first measured (+0.19% / +0.13% with today's 16-token key groups, exact sinks and
3-byte group parameters), so a codec with int4 keys or values (``k:int4,v:int8``, ``int4``)
needs ``recent >= 128``.
fp8 is not measured and never chosen. The result is made consistent with the planner's one
``KVFormat``: a farther tier never stores more bytes per token than a nearer compressed one,
and the device tier is either exact or the nearest compressed host tier's codec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ollm.tiers import KvTier

MIN_GAIN = 0.10  # a lossy codec must save >= 10% of its layer's decode time
INT4_MIN_RECENT = 128  # the exact window int4's measured quality was taken with
GPU_DECODE_LAYER_S = 1.0e-3  # a GPU decode layer's least time (planning.costmodel's figure)
# Rates when the machine is not calibrated, measured on the H200 host (docs/runs/2026-11-27c,
# docs/runs/gpu_check_32k.json): pinned host->GPU 54 GB/s, GPU GEMV reads 5.2 TB/s, CPU decode
# attention over RAM KV 21 GB/s, cold disk reads 1.9-2.2 GB/s (page cache: 10-15 GB/s).
DEFAULT_LINK = 54e9
DEFAULT_GPU_MEM = 5.2e12
DEFAULT_CPU_ATTN = 21e9
DEFAULT_DISK = 2.0e9
DEFAULT_PAGE_CACHE = 10e9


@dataclass(frozen=True)
class CodecCost:
    """One candidate: its ``spec`` (``kv.codecs.parse_kv_codec`` text), stored K+V bytes per
    token and KV head, CPU decode attention time relative to exact KV, and the least exact
    window its measured quality needs."""

    spec: str
    bytes_per_token: float
    cpu_attn_cost: float = 1.0
    min_recent: int = 0


@dataclass(frozen=True)
class KvRates:
    """Bytes/s of the paths KV takes: ``device`` (the GPU reading its memory; 0 on a CPU
    machine), ``link`` (pinned host->GPU; 0: no accelerator), ``cpu_attn`` (exact KV a CPU
    decode query attends), ``disk`` (KV file reads); ``measured``: from calibration."""

    device: float = DEFAULT_GPU_MEM
    link: float = DEFAULT_LINK
    cpu_attn: float = DEFAULT_CPU_ATTN
    disk: float = DEFAULT_DISK
    measured: bool = False

    @property
    def gpu(self) -> bool:
        return self.link > 0 and self.device > 0


CPU_DEFAULT_RATES = KvRates(device=0.0, link=0.0)


@dataclass(frozen=True)
class KvShape:
    """What one layer's KV and weights weigh: KV heads x batch, head_dim, bytes per exact
    element, encoding block and exact window (``KVCodec.boundary``)."""

    kv_heads: int
    head_dim: int
    elem_bytes: int
    recent: int = 128
    block: int = 32

    def split(self, context: int) -> tuple[int, int]:
        """(encoded, exact) tokens of a cache of ``context`` tokens."""
        enc = max(0, (context - self.recent) // self.block * self.block)
        return enc, context - enc


@dataclass(frozen=True)
class TierChoice:
    """One tier's codec, its KV bytes per token and KV head, its estimated KV time per layer
    and decode step, and why (one line)."""

    spec: str
    bytes_per_token: float
    seconds: float
    why: str


@dataclass(frozen=True)
class KvCodecChoice:
    """``auto``'s codec per KV tier (``KvTier`` value -> ``TierChoice``), for one context."""

    tiers: dict[str, TierChoice] = field(default_factory=dict)
    context: int = 0
    measured: bool = False

    def spec(self, tier: KvTier | str) -> str:
        """The codec text of ``tier`` ("none": exact; a tier the machine lacks: exact)."""
        got = self.tiers.get(KvTier(tier).value)
        return "none" if got is None else got.spec

    def summary(self) -> str:
        """One line: each tier's codec and stored bytes per token and KV head."""
        names = {"device": "device", "cpu": "RAM", "disk": "disk"}
        parts = [
            f"{names[t]} {_label(c.spec)} ({c.bytes_per_token:.0f} B/token/head)"
            for t, c in self.tiers.items()
        ]
        src = "measured rates" if self.measured else "default rates"
        return f"{', '.join(parts)} at {self.context} tokens, {src}"

    def describe(self) -> list[tuple[str, str]]:
        """(label, value) rows for ``ollm info`` and the plan summary."""
        names = {"device": "device", "cpu": "pinned RAM", "disk": "disk"}
        return [
            (f"KV codec (auto), {names[t]}", f"{_label(c.spec)}: {c.why}")
            for t, c in self.tiers.items()
        ]


def _label(spec: str) -> str:
    return "exact" if spec == "none" else spec


def _tier_seconds(tier: str, c: CodecCost, exact: CodecCost, shape: KvShape, context: int,
                  rates: KvRates) -> tuple[float, str]:  # fmt: skip
    """(seconds, what bounds it) of one layer's KV under ``c`` in ``tier`` for one step."""
    enc, tail = shape.split(context) if c.spec != "none" else (0, context)
    h = shape.kv_heads
    stored = h * (enc * c.bytes_per_token + tail * exact.bytes_per_token)
    # CPU attention over codes costs ``cpu_attn_cost`` times the exact KV of the same tokens
    cpu = h * exact.bytes_per_token * (enc * c.cpu_attn_cost + tail) / max(rates.cpu_attn, 1.0)
    if not rates.gpu:
        if tier == KvTier.DISK:
            return stored / rates.disk + cpu, "disk read + CPU attention"
        return cpu, "CPU attention"
    gpu = stored / rates.device
    if tier == KvTier.DEVICE:
        return gpu, "GPU memory read"
    fetch = stored / rates.link + gpu
    if tier == KvTier.DISK:
        return stored / rates.disk + fetch, "disk read + host->GPU copy"
    if cpu < fetch:
        return cpu, "CPU attention"
    return fetch, "host->GPU copy"


def _best(tier: str, allowed: list[CodecCost], exact: CodecCost, shape: KvShape, context: int,
          rates: KvRates, weight_s: float) -> TierChoice:  # fmt: skip
    """The fastest allowed codec of ``tier``, exact unless it saves >= MIN_GAIN."""
    timed = [(c, *_tier_seconds(tier, c, exact, shape, context, rates)) for c in allowed]
    t_exact, why_exact = timed[0][1], timed[0][2]
    c, t, why = min(timed, key=lambda x: (x[1], -x[0].bytes_per_token))  # ties: lighter codec
    step = weight_s + t_exact
    ms = 1e3
    if c.spec == "none" or t_exact - t < MIN_GAIN * step:
        gain = "no codec is faster" if c.spec == "none" else (
            f"{c.spec} would save {100 * (t_exact - t) / step:.1f}% of the {step * ms:.3g} ms "
            f"layer step (< {100 * MIN_GAIN:.0f}%)"
        )  # fmt: skip
        why = f"KV {t_exact * ms:.3g} ms/layer ({why_exact}); {gain}"
        return TierChoice("none", exact.bytes_per_token, t_exact, why)
    return TierChoice(
        c.spec, c.bytes_per_token, t,
        f"KV {t_exact * ms:.3g} -> {t * ms:.3g} ms/layer ({why}), "
        f"{100 * (t_exact - t) / step:.0f}% of the {step * ms:.3g} ms layer step",
    )  # fmt: skip


def choose_kv_codecs(
    candidates: list[CodecCost],
    rates: KvRates,
    shape: KvShape,
    context: int,
    weight_s: float,
) -> KvCodecChoice:
    """The codec of each KV tier for a decode step at ``context`` tokens. ``candidates``: exact
    ("none") first; ``weight_s``: seconds a decode step spends on one layer's weights (what the
    KV time is weighed against)."""
    exact = candidates[0]
    assert exact.spec == "none", "the exact format comes first"
    allowed = [c for c in candidates if c.min_recent <= shape.recent]
    host = (KvTier.CPU, KvTier.DISK) if rates.gpu else (KvTier.DISK,)  # no pinned RAM tier
    tiers = {t: _best(t, allowed, exact, shape, context, rates, weight_s) for t in host}
    # The planner's single KVFormat: disk never stores more per token than compressed RAM KV
    ram, disk = tiers.get(KvTier.CPU), tiers[KvTier.DISK]
    if ram is not None and ram.spec != "none" and disk.bytes_per_token > ram.bytes_per_token:
        tiers[KvTier.DISK] = TierChoice(ram.spec, ram.bytes_per_token, disk.seconds,
                                        f"as pinned RAM (one stored format); {disk.why}")  # fmt: skip
    near = next((tiers[t] for t in host if tiers[t].spec != "none"), None)
    dev_allowed = [exact] + [c for c in allowed if near is not None and c.spec == near.spec]
    device = _best(KvTier.DEVICE, dev_allowed, exact, shape, context, rates, weight_s)
    order = {KvTier.DEVICE.value: device, **{t.value: c for t, c in tiers.items()}}
    return KvCodecChoice(order, context, rates.measured)


def layer_weight_seconds(
    rates: KvRates, layer_bytes: int, streamed: int = 0, layers: int = 1
) -> float:
    """Seconds a decode step spends on one layer's weights, averaged over ``layers``, of which
    ``streamed`` cross the host->GPU link (the others read from GPU memory, at least a GPU
    layer's launch-bound time); on a CPU machine, read at the CPU attention's rate (a
    stand-in for its GEMV rate, of the same memory)."""
    if not rates.gpu:
        return layer_bytes / max(rates.cpu_attn, 1.0)
    resident = max(layer_bytes / rates.device, GPU_DECODE_LAYER_S)
    share = min(max(streamed, 0), layers) / max(layers, 1)
    return share * layer_bytes / rates.link + (1 - share) * resident
