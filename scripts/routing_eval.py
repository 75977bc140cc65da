"""Attention routing quality on the default model (issue 18), several settings in one process:

    .venv/bin/python scripts/routing_eval.py --contexts 8k --passkey 8k --out FILE.json

The same measurements as ``ollm eval --attention X`` (perplexity, KL(exact || setting), top-1
agreement on the standard library's docs; single and multi-key passkey at depths), computed
so that a 2-core CPU can afford them: every setting shares one model. Scoring: one exact
teacher-forced pass, then one per setting with ``attention_prefill`` (every position routed as
if decoded, what ``evaluate`` does), compared chunk by chunk. Passkey: the prompt is prefilled
once, exactly (routing leaves prefill exact), then each setting decodes its answer from that
KV with its routers attached (summaries built from the prompt's keys, as the prefill would
have), and the KV is trimmed back to the prompt for the next setting: the tokens are those
``LLM(attention=X).generate`` produces for the same prompt. A setting ``ATTENTION@PART`` (e.g.
``topk:16@question``) marks a part of the passkey prompt full (routing by segment: its pages read
at every step besides the routing's own, ``ollm eval --passkey-full PART``).

A setting ``kv:CODEC:RECENT`` (e.g. ``kv:int4:128``, passkey only) is ``ollm eval --kv-codec CODEC
--kv-recent RECENT``: compressed KV changes the prompt's own attention (decode-faithful), so it
prefills the prompt again into its own compressed caches and decodes from them; the cell also
records the compressed layers' stored bytes per token.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from ollm import LLM
from ollm.api_support import encode_parts
from ollm.bench.run import parse_contexts
from ollm.corpus import load_text
from ollm.engine.routing_calibration import plan_routing
from ollm.eval.passkey import _NAMES, build_parts, marked
from ollm.kv.routed import attach_routers, force_spans
from ollm.layers.segments import resolve_spans
from ollm.telemetry.stats import IOStats

SETTINGS = {
    "exact": "full",
    "auto": "auto",
    "topk:16": "topk:16",
    "window": "window:256,sinks:64",
}


def _routing(llm: LLM, attention: str, prefill: bool, context: int):
    """The setting's routing planned for ``context`` tokens (``auto`` scales its top-k pages)."""
    return plan_routing(attention, llm.spec, llm.store_path, 32, prefill, context=context)


def _budget(routing, context: int) -> dict:
    """Top-k pages per routed layer and the share of the routed layers' KV a decode step at
    ``context`` keys reads (computed: ``LayerRouting.read_tokens``)."""
    if routing is None:
        return {"pages": None, "kv_read_last_step": 1.0}
    used = [r for r in routing if r is not None]
    read = sum(r.read_tokens(context - 1, context) for r in used)
    total = sum(context * len(r.heads) for r in used)
    return {"pages": [r.pages for r in used], "kv_read_last_step": read / total}


def quality(llm: LLM, ids: list[int], settings: dict[str, str]) -> dict[str, dict]:
    """Per setting: perplexity, KL(exact || setting) mean/max, top-1 agreement (as
    ``ollm.eval.quality.compare``), from one final-hidden pass each."""
    runner = llm.runner
    settings = {  # spans and KV codecs: passkey prompts only
        n: a for n, a in settings.items() if "@" not in a and not a.startswith("kv:")
    }
    hidden, budget = {}, {}
    for name, attention in settings.items():
        t0 = time.perf_counter()
        runner.routing = _routing(llm, attention, prefill=True, context=len(ids))
        budget[name] = _budget(runner.routing, len(ids))
        hidden[name] = llm._engine.final_hidden(ids)[:, :-1]
        print(f"  {name}: pass over {len(ids)} tokens {time.perf_counter() - t0:.0f} s", flush=True)
    runner.routing = None
    target = torch.tensor(ids[1:])
    stats = {n: {"nll": 0.0, "kl": 0.0, "kl_max": 0.0, "agree": 0} for n in settings}
    rows = 64  # float64 [rows, vocab] per setting at a time
    for c0 in range(0, len(target), rows):
        c1 = min(len(target), c0 + rows)
        lp = {
            n: torch.log_softmax(runner.logits(h[:, c0:c1])[0], -1).double()
            for n, h in hidden.items()
        }
        ref, tgt = lp["exact"], target[c0:c1, None]
        p = ref.exp()
        for n, lp_t in lp.items():
            s = stats[n]
            s["nll"] -= float(lp_t.gather(-1, tgt).sum())
            kl = torch.where(p > 0, p * (ref - lp_t), torch.zeros_like(p)).sum(-1).clamp_min(0)
            s["kl"] += float(kl.sum())
            s["kl_max"] = max(s["kl_max"], float(kl.max()))
            s["agree"] += int((lp_t.argmax(-1) == ref.argmax(-1)).sum())
    n_tok = len(target)
    exact_ppl = math.exp(stats["exact"]["nll"] / n_tok)
    return {
        n: {
            "context": len(ids),
            "perplexity": math.exp(s["nll"] / n_tok),
            "exact_perplexity": exact_ppl,
            "ppl_delta_pct": 100 * (math.exp(s["nll"] / n_tok) / exact_ppl - 1),
            "kl_mean": s["kl"] / n_tok,
            "kl_max": s["kl_max"],
            "top1_agreement": s["agree"] / n_tok,
            **budget[n],
        }
        for n, s in stats.items()
    }


@torch.inference_mode()
def passkey_cell(llm: LLM, parts: dict, want: int, settings: dict[str, str]) -> dict[str, dict]:
    """Prefill the prompt once exactly; each setting decodes 8 greedy tokens from that KV."""
    runner, new = llm.runner, 8
    ids = llm.encode(marked(parts, None))
    n = len(ids)
    llm.ensure_context(n + new)
    runner = llm.runner
    runner.routing = None
    kv = runner.new_kv(1, n + new)
    out = {}
    try:
        logits = runner.forward(torch.tensor([ids]), torch.arange(n)[None], kv)
        first = int(logits.argmax(-1))
        for name, setting in settings.items():
            if setting.startswith("kv:"):
                out[name] = _codec_cell(llm, ids, new, want, setting)
                continue
            attention, _, part = setting.partition("@")
            stats = IOStats()
            routing = _routing(llm, attention, prefill=False, context=n + new)
            spans = None
            if part:  # the tokens of the parts encoded together: the prompt's own
                tokens, marks = encode_parts(llm.engine, marked(parts, part), True)
                assert tokens == ids
                spans = [resolve_spans(marks, n)]
            if routing is not None:
                attach_routers(kv, routing, 1, n + new, stats)
                force_spans(kv, spans)
                for cache in kv:
                    if getattr(cache, "router", None) is not None:
                        cache.router.on_append(cache.k[:, :, :n], 0)  # the prompt's keys
            toks = [first]
            for step in range(new - 1):
                pos = torch.tensor([[n + step]])
                logits = runner.forward(torch.tensor([[toks[-1]]]), pos, kv)
                toks.append(int(logits.argmax(-1)))
            for cache in kv:
                cache.router = None
                cache.trim(n)
            text = llm.tokenizer.decode(toks)
            got = re.search(r"\d+", text)
            read = stats.kv_read_tokens / stats.kv_total_tokens if stats.kv_total_tokens else 1.0
            out[name] = {
                "correct": bool(got and int(got.group()) == want),
                "answer": text,
                "tokens": toks,
                "kv_read_fraction": read,
                "full_spans": spans and spans[0],
            }
    finally:
        for cache in kv:
            cache.close()
    return out


def _codec_cell(llm: LLM, ids: list[int], new: int, want: int, setting: str) -> dict:
    """Prefill ``ids`` into compressed caches (``kv:CODEC:RECENT``) and decode ``new`` greedy
    tokens, as ``LLM(kv_codec=CODEC, kv_recent=RECENT).generate`` would."""
    codec, recent = setting[len("kv:") :].rsplit(":", 1)  # kv:k:int4,v:int8:128 too
    runner, n = llm.runner, len(ids)
    runner.kv_codec, runner.kv_recent = codec, int(recent)
    try:
        kv = runner.new_kv(1, n + new)
    finally:
        runner.kv_codec, runner.kv_recent = "none", 128
    try:
        logits = runner.forward(torch.tensor([ids]), torch.arange(n)[None], kv)
        toks = [int(logits.argmax(-1))]
        comp = [c for c in kv if type(c).__name__ == "CompressedKVCache"]
        # Bytes per token of the prompt: encoded prefix plus exact tail, and the codec's own rate
        stored = [c.bytes_read() / n for c in comp]
        rate = comp[0].codec.bytes_per_token(llm.spec.head_dim, 4) if comp else None
        for step in range(new - 1):
            pos = torch.tensor([[n + step]])
            logits = runner.forward(torch.tensor([[toks[-1]]]), pos, kv)
            toks.append(int(logits.argmax(-1)))
    finally:
        for cache in kv:
            cache.close()
    text = llm.tokenizer.decode(toks)
    got = re.search(r"\d+", text)
    return {
        "correct": bool(got and int(got.group()) == want),
        "answer": text,
        "tokens": toks,
        "compressed_layers": len(comp),
        "stored_bytes_per_token_per_layer": stored,
        "codec_bytes_per_token_per_head": rate,
    }


def passkey(llm, contexts, depths, settings, variants=("single", "multi")) -> list[dict]:
    """The cells of ``ollm.eval.passkey.run_passkey`` (same prompts: same seeded draws)."""
    rng = random.Random(0)
    rows = []
    for context in contexts:
        for depth in depths:
            for variant in variants:
                k = 1 if variant == "single" else 3
                names = rng.sample(_NAMES, k)
                keys = {name: rng.randint(10000, 99999) for name in names}
                ask = rng.choice(names)
                parts, want = build_parts(llm.tokenizer, context, depth, keys, ask)
                t0 = time.perf_counter()
                res = passkey_cell(llm, parts, want, settings)
                took = time.perf_counter() - t0
                print(f"  passkey {variant} {context} @ {depth}: "
                      + ", ".join(f"{n} {int(r['correct'])}" for n, r in res.items())
                      + f" ({took:.0f} s)", flush=True)  # fmt: skip
                rows.append({"context": context, "depth": depth, "variant": variant, **res})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="8k")
    ap.add_argument("--passkey", default="8k")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--variants", default="single,multi")
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--settings",
        default=None,
        help="name=attention;... (default: exact, auto, topk:16, window)",
    )
    args = ap.parse_args()
    settings = dict(SETTINGS)
    if args.settings:
        settings = dict(item.split("=", 1) for item in args.settings.split(";"))
        settings = {"exact": "full", **settings}
    ctxs = parse_contexts(args.contexts) if args.contexts != "none" else []
    pks = parse_contexts(args.passkey) if args.passkey != "none" else []
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    report: dict = {"commit": commit, "settings": settings, "argv": sys.argv[1:]}
    out = Path(args.out)
    with LLM(device="cpu", max_context=max([*ctxs, *pks, 512]) + 16, progress=False) as llm:
        cal = Path(llm.store_path) / "attention_calibration.json"  # what auto uses, if any
        report["calibration"] = json.loads(cal.read_text())["choice"] if cal.exists() else None
        corpus = load_text(None, 6 * max(ctxs, default=1))
        report["quality"] = []
        for c in ctxs:
            print(f"quality at {c}", flush=True)
            ids = list(llm.tokenizer(corpus)["input_ids"][:c])
            report["quality"].append(quality(llm, ids, settings))
            out.write_text(json.dumps(report, indent=1))
        if pks:
            depths = [float(d) for d in args.depths.split(",")]
            variants = tuple(args.variants.split(","))
            report["passkey"] = passkey(llm, pks, depths, settings, variants)
    out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
