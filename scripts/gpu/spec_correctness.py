"""Speculative decoding's greedy output against plain decoding on a device (issue 15), over the
tiny random configs of ``tests/conftest.py`` (every family).

float32: every drafter (an oracle that drafts the plain continuation as a chain and as a tree
whose accepted path needs its KV moved, prompt lookup, self-speculation, a draft model, mix,
cascade, each also as a tree) must give exactly the plain tokens, as the CI asserts on the CPU;
the oracle and tree lookup also run with the KV spread over device / pinned RAM / disk pools.
bfloat16: the oracle and lookup (and the single-request path against the batch engine, no
drafts), reported, not asserted: where a pass of ``1 + k`` query rows picks another token than
the one-row pass did, the row shows the first divergence, the plain run's logit margin there
(top-1 minus top-2), the bf16 spacing at the top-1 logit and ``max_row_diff`` (how far the two
passes' logits of that position differ anywhere). Label (`label`): "bf16 rounding" only when
the margin is within one spacing (logits are bf16 numbers: a tie or adjacent values, flipped by
any rounding difference of other GEMM shapes); "near-tie within the passes' logit difference"
when the margin is larger but at most twice ``max_row_diff``; else "NOT explained by rounding".

Phases run in order of importance (float32 chains, trees and KV tiers; bf16; float32 model
drafters) until ``budget_s`` (default 45 s); units left are listed as skipped, never passed.

    PYTHONPATH=src:tests python scripts/gpu/spec_correctness.py --device cuda:0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

NEW = 12  # greedy tokens per prompt
FP32_KINDS = ("oracle", "tree:oracle", "lookup", "tree:lookup", "self:2", "tree:self:2",
              "mix:self:2", "cascade:self:2", "draft", "tree:draft")  # fmt: skip
SPREAD_KINDS = ("oracle", "tree:oracle", "tree:lookup")  # KV over device / RAM / disk
BF16_KINDS = ("oracle", "tree:oracle", "lookup", "tree:lookup")


def prompts() -> list[list[int]]:
    """The CI's prompts: a repetitive one (lookup finds n-grams), a random one, a short one."""
    g = torch.Generator().manual_seed(5)
    rep = torch.randint(0, 256, (9,), generator=g).tolist()
    return [rep * 4, torch.randint(0, 256, (30,), generator=g).tolist(), [3, 1, 4]]


class Oracle:
    """Drafts the plain run's continuation: a chain of up to 8, or (``tree``) a tree holding it
    at a varying rank among distractor siblings that have children of their own, so accepted
    paths are rarely the first nodes and their KV must move (as the CI's `OracleTree`)."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]], tree: bool) -> None:
        self.answers, self.tree, self.name = answers, tree, "oracle"
        self.turn = 0

    def _next(self, tokens) -> list[int]:
        for prompt, out in self.answers.items():
            if tuple(tokens[: len(prompt)]) == prompt:
                return out[len(tokens) :]
        return []

    def propose(self, requests):
        from ollm.engine.drafting import Draft

        out = {}
        for rid, r in requests.items():
            want = self._next(r.tokens)[: 8 if not self.tree else 4]
            if not self.tree:
                out[rid] = Draft(want)
                continue
            toks, parents, prev = [], [], -1
            for t in want:
                self.turn += 1
                rank, here = self.turn % 3, -1
                for j in range(3):
                    tok = t if j == rank else (t + 1 + j + rank) % 256
                    if j == rank:
                        here = len(toks)
                    toks.append(tok)
                    parents.append(prev)
                    if j != rank:
                        toks.append((tok * 7) % 256)
                        parents.append(len(toks) - 2)
                prev = here
            out[rid] = Draft(toks, None, parents)
        return out


def recording_engine(runner, speculator, **kw):
    """A `BatchEngine` that keeps, per request and output position, the float32 logits row
    its token came from (the row after the prefix that token extends)."""
    from ollm.engine.batch import BatchEngine

    class Recording(BatchEngine):
        rows: dict[str, dict[int, torch.Tensor]]

        def _verify(self, st, logits):
            picked = super()._verify(st, logits)
            base = len(self.live[st.seq_id].out.token_ids)
            path = self._paths.get(st.seq_id)
            idx = [0, *(1 + j for j in path)] if path is not None else range(len(picked))
            got = self.rows.setdefault(st.seq_id, {})
            for i, r in enumerate(idx):
                got[base + i] = logits[r].float().cpu()
            return picked

    eng = Recording(runner, None, (), drafter=speculator, **kw)
    eng.rows = {}
    return eng


def run(runner, speculator, ps, **kw):
    """Greedy tokens per prompt, their logits rows, and the speculation counters."""
    from ollm import SamplingParams

    args = dict(block_tokens=8, max_batch=4, max_context=128, max_step_tokens=64)
    eng = recording_engine(runner, speculator, **{**args, **kw})
    try:
        ids = [eng.add(p, SamplingParams(temperature=0, max_new_tokens=NEW)) for p in ps]
        eng.run()
        toks = [eng.finished[r].token_ids for r in ids]
        rows = [eng.rows[r] for r in ids]
        leaked = eng.kv_blocks_used()
    finally:
        eng.close()
        if speculator is not None:
            speculator.close()
    stats = speculator.stats.summary() if speculator is not None else {}
    return toks, rows, {"kv_blocks_left": leaked, **stats}


def bf16_spacing(x: float) -> float:
    """Distance between adjacent bfloat16 numbers at ``x`` (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7) if x else 2.0**-133


def label(margin: float, spacing: float, diff: float | None) -> str:
    """Why greedy may have flipped: a tie at bf16 resolution; a margin the two passes' own logit
    difference at that position covers (a flip needs the pair to move by the margin, so some
    logit by half of it); or neither (look for a bug)."""
    if margin <= spacing:
        return "bf16 rounding"
    if diff is None:
        return "margin above one bf16 spacing (the other path's logits were not kept)"
    if diff is not None and margin <= 2 * diff:
        return "near-tie within the passes' logit difference"
    return "NOT explained by rounding"


def divergence(plain_toks, plain_rows, toks, rows) -> dict | None:
    """Where ``toks`` first leaves the plain tokens (over every prompt) and why it may."""
    for p, (a, b) in enumerate(zip(plain_toks, toks, strict=True)):
        i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if i is None:
            if len(a) != len(b):
                return {"prompt": p, "position": min(len(a), len(b)), "note": "lengths differ"}
            continue
        top = torch.topk(plain_rows[p][i], 2).values.tolist()
        margin, spacing = top[0] - top[1], bf16_spacing(top[0])
        diff = float((plain_rows[p][i] - rows[p][i]).abs().max()) if i in rows[p] else None
        return {
            "prompt": p, "position": i, "plain_token": a[i], "token": b[i],
            "margin": margin, "bf16_spacing": spacing, "margin_in_spacings": margin / spacing,
            "max_row_diff": diff, "logit_std": float(plain_rows[p][i].std()),
            "label": label(margin, spacing, diff),
        }  # fmt: skip
    return None


def speculator_for(kind, llm, answers, draft):
    from ollm.engine.speculative import Speculator, build_speculator

    if kind.endswith("oracle"):
        return Speculator(Oracle(answers, kind.startswith("tree")), k=8)
    if kind.endswith("draft"):
        return build_speculator(kind + ":tiny", llm.runner, 4, 128, draft.runner)
    return build_speculator(kind, llm.runner, 4, 128)


def spread_runner(llm):
    """The model's runner with its layers' KV in device / pinned RAM / disk pools in turn."""
    from ollm.engine.runner import Runner

    tiers = ("device", "cpu", "disk")
    layers = tuple(replace(p, kv_tier=tiers[i % 3]) for i, p in enumerate(llm.plan.layers))
    return Runner(llm.spec, replace(llm.plan, layers=layers), llm.prefetcher, llm.dtype)


def family_rows(family, dtype, kinds, device, work: Path, draft, first: bool, deadline: float):
    """One family at ``dtype``: plain, then each (drafter, KV placement) of ``kinds`` until
    ``deadline`` (`time.perf_counter`; later ones come back as skipped); with ``first``, also
    the single-request path (`LLM.generate`) against the batch engine's."""
    from conftest import make_hf_model
    from ollm import LLM, SamplingParams

    hf = work / f"hf-{family}"
    if not hf.exists():
        make_hf_model(family, hf)
    out = []
    with LLM(hf, device=device, dtype=dtype, max_context=128, prefill_chunk=32, hybrid="off",
             cache_dir=work / "cache", progress=False) as llm:  # fmt: skip
        ps = prompts()
        ptoks, prows, _ = run(llm.runner, None, ps)
        if first:  # the single-request path's own prefill and decode shapes, no drafts
            greedy = SamplingParams(temperature=0, max_new_tokens=NEW)
            stoks = [llm.generate(p, greedy).token_ids for p in ps]
            row = {"family": family, "dtype": dtype, "kind": "generate vs batch", "kv": "device"}
            out.append({**row, "same": stoks == ptoks})
            if stoks != ptoks:
                out[-1]["divergence"] = divergence(ptoks, prows, stoks, [{} for _ in ps])
        answers = {tuple(p): list(p) + o for p, o in zip(ps, ptoks, strict=True)}
        for kind, where in kinds:
            t0 = time.perf_counter()
            if t0 > deadline:
                out.append({"family": family, "dtype": dtype, "kind": kind, "kv": where,
                            "same": None, "skipped": True})  # fmt: skip
                continue
            runner, kw = llm.runner, {}
            if where == "spread":
                runner, kw = spread_runner(llm), {"kv_dir": str(work / "kv")}
            try:
                spec = speculator_for(kind, llm, answers, draft)
                toks, rows, stats = run(runner, spec, ps, **kw)
            except Exception as exc:  # a failure to report (counted as one), not to stop at
                out.append({"family": family, "dtype": dtype, "kind": kind, "kv": where,
                            "same": False, "error": f"{type(exc).__name__}: {exc}"})  # fmt: skip
                print(json.dumps(out[-1]), flush=True)
                continue
            row = {
                "family": family, "dtype": dtype, "kind": kind, "kv": where,
                "same": toks == ptoks, "seconds": time.perf_counter() - t0,
                "drafted": stats.get("drafted"), "accepted": stats.get("accepted"),
                "tokens_per_pass": stats.get("tokens_per_pass"),
                "kv_blocks_left": stats["kv_blocks_left"],
            }  # fmt: skip
            if not row["same"]:
                row["divergence"] = divergence(ptoks, prows, toks, rows)
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


# (dtype, [(drafter, KV placement)]) in the order they run: what matters most first, so a time
# budget skips the least (reported as skipped, never as passed).
PHASES = (
    ("float32", [(k, "device") for k in ("oracle", "tree:oracle", "lookup", "tree:lookup")]
     + [(k, "spread") for k in SPREAD_KINDS]),
    ("bfloat16", [(k, "device") for k in BF16_KINDS]),
    ("float32", [(k, "device") for k in FP32_KINDS[4:]]),
)  # fmt: skip


def correctness(device: str, families=None, dtypes=("float32", "bfloat16"), budget_s=45.0):
    """Every phase x family (module docstring) until ``budget_s`` seconds have passed (the
    units left are listed in ``skipped``); ``float32_all_same`` is the verdict."""
    from conftest import FAMILIES, make_hf_model
    from ollm import LLM

    t0 = time.perf_counter()
    rows: list[dict] = []
    skipped: list[str] = []
    deadline = t0 + budget_s
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_hf_model("llama", work / "draft", seed=7)
        with LLM(work / "draft", device=device, dtype="float32", max_context=128,
                 cache_dir=work / "cache", progress=False) as draft:  # fmt: skip
            seen: set[str] = set()
            for dtype, kinds in PHASES:
                if dtype not in dtypes:
                    continue
                for family in families or FAMILIES:
                    if time.perf_counter() > deadline:
                        skipped += [f"{family} {dtype} {k}/{w}" for k, w in kinds]
                        continue
                    first = (family, dtype) not in seen
                    seen.add((family, dtype))
                    try:
                        rows += family_rows(
                            family, dtype, kinds, device, work, draft, first, deadline
                        )
                    except Exception as exc:  # reported as a failure of every unit
                        err = f"{type(exc).__name__}: {exc}"
                        rows += [{"family": family, "dtype": dtype, "kind": k, "kv": w,
                                  "same": False, "error": err} for k, w in kinds]  # fmt: skip
    skipped += [
        f"{r['family']} {r['dtype']} {r['kind']}/{r['kv']}" for r in rows if r.get("skipped")
    ]
    rows = [r for r in rows if not r.get("skipped")]
    fp32 = [r for r in rows if r["dtype"] == "float32"]
    bad = [r for r in fp32 if not r["same"] or r.get("kv_blocks_left")]
    bf16 = [r for r in rows if r["dtype"] == "bfloat16" and not r["same"]]
    return {
        "device": device, "new_tokens": NEW, "rows": rows, "seconds": time.perf_counter() - t0,
        "float32_runs": len(fp32), "float32_all_same": bool(fp32) and not bad, "float32_failures": bad,
        "bfloat16_runs": sum(r["dtype"] == "bfloat16" for r in rows),
        "bfloat16_divergent": len(bf16),
        "bfloat16_labels": sorted({r["divergence"]["label"] for r in bf16 if r.get("divergence")}),
        "skipped": skipped, "complete": not skipped,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--families", default=None, help="comma list (default: every family)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--budget-s", type=float, default=45.0, help="stop starting new units")
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()
    fams = None if a.families is None else a.families.split(",")
    rep = correctness(a.device, fams, tuple(a.dtypes.split(",")), a.budget_s)
    keys = ("float32_runs", "float32_all_same", "bfloat16_divergent", "bfloat16_labels")
    print(json.dumps({k: rep[k] for k in (*keys, "seconds", "skipped")}, indent=1))
    if a.output:
        Path(a.output).write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
