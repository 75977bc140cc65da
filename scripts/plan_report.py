"""The planner's device reservations for a large model, without a GPU and without its weights:

    PYTHONPATH=src .venv/bin/python scripts/plan_report.py [--context 100000] [--budget 8]
        [--json out.json]

Plans Llama-3.1-8B shapes (bf16, from ``storage.synthetic.preset_config``) for ``cuda:0`` with
a sizes-only layer store (``MetaStore``: no files) and fixed machine rates (``H200``: the H200
host of docs/runs/2026-12-02, pinned host->GPU ~54 GB/s, the routed CPU read 8.4 GB/s), as
``scripts/gpu/kv_codec.py`` (KV codecs none / int8 / int4) and
``scripts/gpu/routing.py`` (full vs ``topk:189`` pages of 64, offload cpu, hybrid off) plan
their 100k rows. Prints per case the bytes reserved by part for prefill and for decode (where
they differ: prefill-only activations given to decode-resident layers), where layers and KV
sit, and the plan's predicted decode step. Planner only: seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from types import SimpleNamespace as NS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GIB = 1 << 30
RECENT = 128  # scripts/gpu/kv_codec.py's exact recent window
PAGE = 64
ATTENTION = "topk:189,window:256,sinks:64"  # scripts/gpu/routing.py's setting


def h200_rates():
    """The H200 host's rates (tests/test_routed_placement.py, cpu_routed measured 2026-12-02)."""
    from ollm.planning.costmodel import MachineRates

    return MachineRates(
        54e9, 53e9, 50.8e9, 50.8e9, 16, 3.9e12, 6.4e12, 7.4e14, cpu_attn=8.5e9, cpu_routed=8.4e9
    )


class MetaStore:
    """The sizes a plan reads of a layer store (``LayerStore``) for a bf16 model: every layer
    ``2 x layer_param_count`` bytes, globals the embedding table, an untied head and the norm."""

    def __init__(self, spec, tied: bool = False, config=None) -> None:
        self._config = config
        self.max_layer_nbytes = 2 * spec.layer_param_count()
        table = 2 * spec.vocab_size * spec.hidden_size
        tensors = {
            "embed_tokens.weight": NS(nbytes=table),
            "norm.weight": NS(nbytes=2 * spec.hidden_size),
        }
        if not tied:
            tensors["lm_head.weight"] = NS(nbytes=table)
        self.files = {"globals.bin": NS(tensors=tensors)}

    def layer_nbytes(self, i: int) -> int:
        return self.max_layer_nbytes

    def hf_config(self):
        """The model's config, as ``LayerStore.hf_config`` (``kv_codec.capacity`` builds the
        spec from it)."""
        return self._config


def llama8b():
    """(spec, MetaStore) of Llama-3.1-8B shapes."""
    from ollm.models.registry import build_spec
    from ollm.storage.synthetic import preset_config

    config = preset_config("llama3-8b")
    spec = build_spec(config)
    return spec, MetaStore(spec, config=config)


def routing_inputs(spec, work, attention: str = ATTENTION):
    """(summary bytes, per-layer KV read share) of ``attention`` as ``engine/replan`` gives them
    to the planner (``routing_summary_bytes``, ``routing_kv_read``)."""
    from ollm.engine.replan import routing_kv_read, routing_summary_bytes
    from ollm.engine.routing_calibration import plan_routing

    cfg = NS(attention=attention, attention_page_tokens=PAGE, kv_codec="none", kv_evict="none")
    routing = plan_routing(attention, spec, "/nonexistent", PAGE)  # top-k: no calibration read
    engine = NS(config=cfg, routing=routing)
    return routing_summary_bytes(spec, cfg, work, 2), routing_kv_read(engine, work)


def plan_case(spec, store, work, budget: int, rates, codec: str = "none",
              attention: str = "full", chunk_tokens: int | None = None,
              decode_resident: bool = False):  # fmt: skip
    """The plan of one device row: ``codec`` as kv_codec.py plans it, or ``attention`` as
    routing.py does (offload cpu, hybrid off)."""
    from ollm.kv.codecs import kv_format
    from ollm.planning.placement import plan_placement

    fmt = kv_format(codec, RECENT, spec.head_dim, 2)
    kw: dict = {"kv_format": fmt, "chunk_tokens": chunk_tokens,
                "decode_resident": decode_resident}  # fmt: skip
    # The device rows planned no CPU-computed layer (all 32 streamed): hybrid off here too, so
    # the figures do not hang on the CPU rates assumed for the H200 host.
    # (offload auto without a cpu_memory limit puts every streamed layer in RAM, as cpu does.)
    offload, hybrid = "cpu", "off"
    if attention != "full":
        kw["summary_bytes"], kw["kv_read"] = routing_inputs(spec, work, attention)
    return plan_placement(spec, store, "cuda:0", budget, None, offload, work, 2, rates, hybrid,
                          **kw)  # fmt: skip


def describe(plan) -> dict:
    """What a report row says of a plan: reserved bytes by part (prefill; decode where it
    differs), tiers and the predicted decode step."""
    from ollm.tiers import KvTier, Phase, Tier

    layers = plan.layers
    decode = getattr(plan, "decode_reserved", None) or plan.reserved
    return {
        "reserved_prefill": dict(plan.reserved),
        "reserved_decode": dict(decode),
        "total_prefill_GiB": round(sum(plan.reserved.values()) / GIB, 3),
        "total_decode_GiB": round(sum(decode.values()) / GIB, 3),
        "prefill_chunk_tokens": plan.prefill_chunk_tokens,
        "ring_slots": plan.ring_slots,
        "resident_layers": [i for i, p in enumerate(layers) if p.tier == Tier.GPU],
        "decode_resident_layers": [
            i for i, p in enumerate(layers) if getattr(p, "decode_resident", False)
        ],
        "streamed_decode": len(plan.streamed_for(Phase.DECODE)),
        "kv_device_layers": sum(p.kv_tier == KvTier.DEVICE for p in layers),
        "kv_ram_layers": sum(p.kv_tier == KvTier.CPU for p in layers),
        "kv_fetch_layers": sum(p.kv_fetch for p in layers),
        "kv_split_tokens": sum(p.kv_device_tokens for p in layers),
        "predicted_decode_s": plan.predicted.get("decode s (KV split)"),
        "predicted": dict(plan.predicted),
    }


CASES = (
    ("codec none", {"codec": "none"}),
    ("codec int8", {"codec": "int8"}),
    ("codec int4", {"codec": "int4"}),
    ("attention full", {"attention": "full"}),
    ("attention topk:189", {"attention": ATTENTION}),
)


def report(
    context: int = 100000, budget_gib: float = 8.0, new: int = 20, capacity: bool = False
) -> dict:
    """Every case's ``describe`` at ``context`` (+ ``new`` tokens, as the device scripts plan),
    with the predicted step without decode-resident layers (``before``) next to it; with
    ``capacity``, ``scripts/gpu/kv_codec.capacity`` over the meta store."""
    from ollm.planning.placement import Workload

    spec, store = llama8b()
    work = Workload(1, context + new, context + new)
    rates, budget = h200_rates(), int(budget_gib * GIB)
    out = {"model": "llama3-8b (bf16, meta store)", "context": work.context, "budget": budget,
           "rates": rates.__dict__, "cases": {}}  # fmt: skip
    for name, kw in CASES:
        # decode-resident layers (opt-in in the engine) held, and without them (``before``)
        row = describe(plan_case(spec, store, work, budget, rates, decode_resident=True, **kw))
        off = plan_case(spec, store, work, budget, rates, decode_resident=False, **kw)
        row["predicted_decode_s_before"] = off.predicted.get("decode s (KV split)")
        out["cases"][name] = row
    if capacity:
        # as the engine plans (prefill_segment auto, that RAM as cpu_memory)
        out["capacity"] = kv_codec_capacity(store, budget, context)
        # every prompt prefilled in one forward (the measure before segmented prefill)
        out["capacity_one_forward"] = kv_codec_capacity(store, budget, context, segment=0)
        # one forward, the residual stream forced to pinned RAM (counted there)
        out["capacity_residual_ram"] = kv_codec_capacity(store, budget, context, "ram", 0)
    return out


def kv_codec_capacity(
    store, budget: int, context: int, residual: str = "auto", segment="auto"
) -> dict:
    """``scripts/gpu/kv_codec.capacity`` (planner only) on a sizes-only store."""
    import importlib.util

    path = Path(__file__).parent / "gpu" / "kv_codec.py"
    spec = importlib.util.spec_from_file_location("gpu_kv_codec", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.capacity(store, budget, context, "cuda:0", residual=residual, segment=segment)


def _fmt(n: int) -> str:
    return f"{n / GIB:7.3f}"


def print_report(rep: dict) -> None:
    for name, row in rep["cases"].items():
        pre, dec = row["reserved_prefill"], row["reserved_decode"]
        print(f"== {name}: predicted decode step {row['predicted_decode_s']}")
        for key in dict.fromkeys([*pre, *dec]):
            a, b = pre.get(key, 0), dec.get(key, 0)
            print(f"   {key:<24} prefill {_fmt(a)} GiB   decode {_fmt(b)} GiB")
        print(f"   {'total':<24} prefill {row['total_prefill_GiB']:7.3f} GiB   decode "
              f"{row['total_decode_GiB']:7.3f} GiB")  # fmt: skip
        keys = ("prefill_chunk_tokens", "ring_slots", "resident_layers", "decode_resident_layers",
                "streamed_decode", "kv_device_layers", "kv_ram_layers", "kv_fetch_layers",
                "kv_split_tokens")  # fmt: skip
        print("   " + ", ".join(f"{k}={row[k]}" for k in keys))
    print("predicted decode step (s): before (no decode-resident layers) -> after")
    for name, row in rep["cases"].items():
        a, b = row["predicted_decode_s_before"], row["predicted_decode_s"]
        print(f"   {name:<20} {a} -> {b}")
    for key in ("capacity", "capacity_one_forward", "capacity_residual_ram"):
        if key in rep:
            print(f"{key}:", json.dumps(rep[key]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=100000)
    ap.add_argument("--budget", type=float, default=8.0, help="GPU budget in GiB")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--capacity", action="store_true", help="also kv_codec.capacity (minutes)")
    args = ap.parse_args()
    rep = report(args.context, args.budget, capacity=args.capacity)
    print_report(rep)
    if args.json is not None:
        args.json.write_text(json.dumps(rep, indent=1, default=str))


if __name__ == "__main__":
    main()
