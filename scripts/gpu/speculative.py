"""Device run of speculative decoding (issue 15): Llama-3.1-8B shapes (random bf16 weights) under
8 GiB of GPU memory, most layers streamed from pinned RAM every weight pass.

    PYTHONPATH=src:tests python scripts/gpu/speculative.py --out $OUT [--quick]

(a) Verify-pass time vs query tokens (1, 2, 4, ..., 64): each is one weight pass through the
    batch engine's verification path (a decode token plus a tree of n - 1 draft nodes under the
    tree attention mask), timed per step (CUDA synchronised), next to the streamed-bytes floor
    (bytes the plan streams per decode pass / pinned host->GPU bandwidth measured now).
(b) End-to-end tok/s of greedy decoding, plain vs prompt lookup (chain and tree), on a quoting
    task. Random weights make real drafts meaningless, so the task is made self-consistent: the
    "document" the lookup drafter quotes from is the model's own greedy continuation (given to
    the drafter only, not to the model), i.e. the acceptance of a verbatim quote. With bf16
    weights a pass of 1 + k rows may pick another token than a one-row pass where the logits
    nearly tie (other GEMM shapes round differently; float32 agrees, part (c)): each row says
    where it first left plain decoding, the plain margin there and whether that is within bf16
    resolution; the document then becomes the run's own output (`end_to_end`).
(c) Correctness on the device (`spec_correctness.py`, < 60 s, first, written at once to
    ``spec_correctness.json``): float32 greedy output of every drafter (trees too, KV in RAM
    and on disk too) equals plain decoding's for every tiny family of tests/conftest.py; bf16
    divergences reported with their margins.
(d) The issue's target, computed: effective tok/s = tokens per target pass measured on real text
    on the CPU (Gemma 3 270M, the document workload, read from the JSON of CPU_FIGURES) / the
    pass time measured here with the query tokens that drafter used per pass; met when >= 20.

Writes ``speculative.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # query tokens per verify pass
ROOT = Path(__file__).resolve().parents[2]
# Tokens per target pass on real text (CPU, Gemma 3 270M; docs/benchmarks.md), read, not copied.
CPU_FIGURES = (
    "docs/runs/2026-12-01/spec_tree_cpu_057de96.json",
    "docs/runs/2026-12-01/spec_tree_cpu_quote_rerun_c01e9da.json",
)
TPP = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)  # tokens per pass for the effective-rate table


def sync() -> None:
    """Wait for the GPU (nothing to wait for in a CPU dry run)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class FixedTree:
    """A tree of ``nodes`` random draft tokens (a chain of up to 8 with siblings): only the
    query-row count matters for timing a verify pass."""

    name = "fixed-tree"

    def __init__(self, vocab: int) -> None:
        self.vocab, self.nodes = vocab, 0
        self.g = torch.Generator().manual_seed(0)

    def propose(self, requests):
        from ollm.engine.drafting import Draft

        out = {}
        for rid in requests:
            n = self.nodes
            toks = torch.randint(0, self.vocab, (n,), generator=self.g).tolist()
            depth = min(8, n)
            parents = [i - 1 for i in range(depth)]  # a chain, then leaves spread over it
            parents += [(i - depth) % depth - 1 for i in range(depth, n)]
            out[rid] = Draft(toks, None, parents) if n else Draft([])
        return out


def pass_times(llm, prompt: list[int], reps: int, sizes: tuple[int, ...] = SIZES) -> list[dict]:
    """Seconds of one engine step (one weight pass) per query-token count in ``sizes``."""
    from ollm import SamplingParams
    from ollm.engine.batch import BatchEngine
    from ollm.engine.speculative import Speculator

    tree = FixedTree(llm.spec.vocab_size)
    eng = BatchEngine(
        llm.runner, None, (), max_batch=1, max_context=llm.workload.context,
        drafter=Speculator(tree, k=max(sizes)),
    )  # fmt: skip
    steps = 2 + reps * len(sizes) * 2
    eng.add(prompt, SamplingParams(temperature=0, max_new_tokens=steps, ignore_eos=True))
    eng.step()  # the prompt's prefill
    rows = []
    for n in sizes:
        tree.nodes = n - 1
        eng.step()  # warm-up of this shape
        times = []
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            eng.step()
            sync()
            times.append(time.perf_counter() - t)
        rows.append({"query_tokens": n, "seconds": times, "median_s": statistics.median(times)})
        print(rows[-1], flush=True)
    eng.close()
    return rows


class QuoteLookup:
    """Prompt lookup whose source is a hidden document (tokens the model does not see) followed
    by the context: the real lookup code (`LookupDrafter`, chains or tries) on that text."""

    def __init__(self, document: list[int]) -> None:
        from ollm.engine.drafting import LookupDrafter

        self.inner, self.document, self.name = LookupDrafter(), document, "quote-lookup"

    def propose(self, requests):
        from dataclasses import replace

        asks = {
            rid: replace(r, tokens=self.document + list(r.tokens)) for rid, r in requests.items()
        }
        return self.inner.propose(asks)


def decode(llm, prompt: list[int], params, spec) -> tuple[list[int], dict, float, int]:
    """One greedy request on a recording engine: tokens, logits rows, decode seconds (prefill
    not timed: decode rate is what speculation changes) and decode passes."""
    from spec_correctness import recording_engine

    eng = recording_engine(llm.runner, spec, max_batch=1, max_context=llm.workload.context)
    rid = eng.add(prompt, params)
    eng.step()  # the prefill
    sync()
    t, steps = time.perf_counter(), 0
    while eng.has_work():
        eng.step()
        steps += 1
    sync()
    dt = time.perf_counter() - t
    toks, rows = eng.finished[rid].token_ids, eng.rows[rid]
    eng.close()
    return toks, rows, dt, steps


def end_to_end(llm, prompt: list[int], new: int, rounds: int = 3) -> dict:
    """Plain vs lookup (chain, tree) on the self-consistent quoting task (module docstring).
    The document starts as plain decoding's output; where a multi-row pass picks another token
    (bf16 near-ties: each row's ``divergence`` says where, the plain margin there and its
    label), the quote would stop matching, so the document becomes that run's own output and
    the drafter runs again (at most ``rounds`` times) until it quotes its own output verbatim;
    the last run is the one measured."""
    from spec_correctness import divergence

    from ollm import SamplingParams
    from ollm.engine.speculative import Speculator

    params = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
    out: dict = {"new_tokens": new, "prompt_tokens": len(prompt)}
    plain, plain_rows, dt, steps = decode(llm, prompt, params, None)
    out["plain"] = {"decode_s": dt, "decode_passes": steps, "decode_tok_s": (new - 1) / dt}
    print("plain", out["plain"], flush=True)
    for name in ("lookup", "tree:lookup"):
        doc, first, runs = plain, None, 0
        while True:
            runs += 1
            spec = Speculator(QuoteLookup(doc), tree=name.startswith("tree"))
            toks, rows, dt, steps = decode(llm, prompt, params, spec)
            first = first or divergence([plain], [plain_rows], [toks], [rows])
            if toks == doc or runs == rounds:
                break
            doc = toks
        row = {
            "decode_s": dt, "decode_passes": steps, "decode_tok_s": (len(toks) - 1) / dt,
            "tokens": len(toks), "same_as_plain": toks == plain, "runs": runs,
            "quotes_own_output": toks == doc, "document": "plain" if doc is plain else "own",
            "first_divergence_from_plain": first, **spec.stats.summary(),
        }  # fmt: skip
        out[name] = row
        print(name, row, flush=True)
    return out


def cpu_figures(paths: tuple[str, ...] = CPU_FIGURES) -> list[dict]:
    """The document workload's speculative rows (task "quote") of the CPU runs in ``paths``
    (`scripts/spec_bench.py` JSON, Gemma 3 270M on real text): tokens per target pass, and the
    query tokens a drafted pass carried there (1 + drafted tokens / drafted passes, rounded
    up). Passes: tokens per pass = (accepted + passes) / passes."""
    out = []
    for path in paths:
        for r in json.loads((ROOT / path).read_text()):
            if r.get("task") != "quote" or r["speculate"] in ("off", "batch"):
                continue
            by = r["by_drafter"].values()  # [drafted passes, drafted tokens, accepted] each
            drafts, drafted, accepted = (sum(v[i] for v in by) for i in range(3))
            tpp = r["tokens_per_pass"]
            passes = round(accepted / (tpp - 1)) if tpp > 1 else r["generated"]
            rows = 1 + drafted / drafts if drafts else 1.0
            out.append({
                "source": path, "speculate": r["speculate"], "tokens_per_pass": tpp,
                "passes": passes, "drafted_passes": drafts, "mean_query_tokens": rows,
                "query_tokens": math.ceil(rows), "cpu_drafter_share": r["drafter_share"],
            })  # fmt: skip
    return out


def effective(figures: list[dict], by_n: dict[int, float]) -> dict:
    """Effective tok/s per CPU row (the issue's definition, module docstring) and the target."""
    rows = []
    for f in figures:
        t_q, t_1, p, d = by_n[f["query_tokens"]], by_n[1], f["passes"], f["drafted_passes"]
        tokens = f["tokens_per_pass"] * p
        rows.append({
            **f, "pass_s": t_q,
            # every pass priced as a drafted one (conservative): the headline number
            "effective_tok_s": f["tokens_per_pass"] / t_q,
            # drafted passes at their rows, the others at one row
            "effective_tok_s_mixed": tokens / (d * t_q + (p - d) * t_1),
            "meets_20": f["tokens_per_pass"] / t_q >= 20,
            "note": "drafting time not included" if f["cpu_drafter_share"] > 0.01 else "",
        })  # fmt: skip
        print("effective", rows[-1], flush=True)
    # A model drafter's drafting time on the device is not measured here: not counted as met.
    met = sorted({r["speculate"] for r in rows if r["meets_20"] and not r["note"]})
    return {
        "label": "effective tok/s = tokens per target pass measured on real text on the CPU "
        "(Gemma 3 270M, document workload) / median time of a pass with that drafter's query "
        "tokens measured here; computed, not measured end to end",
        "sources": sorted({f["source"] for f in figures}),
        "rows": rows,
        "target_tok_s": 20,
        "met": bool(met),
        "met_by": met,
    }


def _summaries(report: dict, figures: list[dict]) -> None:
    """Add the computed tables (effective tok/s, tokens per pass needed) and the target check."""
    by_n = {r["query_tokens"]: r["median_s"] for r in report["verify_pass"]}
    report["effective_tok_s_table"] = {
        "note": "computed, not measured end to end: tokens per pass / the measured median "
        "time of a pass with the query tokens a drafter would use for it (8 rows up to 4 "
        "tokens per pass, 16 beyond)",
        "rows": [
            {
                "tokens_per_pass": t,
                "query_tokens": (q := 8 if t <= 4 else 16),
                "effective_tok_s": t / by_n[q],
            }
            for t in TPP
        ],  # fmt: skip
    }
    report["tokens_per_pass_for_20_tok_s"] = [
        {"query_tokens": n, "pass_s": t, "needed": 20 * t} for n, t in by_n.items() if n >= 8
    ]  # what a drafter must reach on real text, from measured pass times alone
    report["target_20_tok_s"] = effective(figures, by_n)
    q = report["quote"]
    report["quote_measured"] = {
        name: {k: q[name][k] for k in ("decode_tok_s", "tokens_per_pass", "quotes_own_output")}
        for name in ("lookup", "tree:lookup")
    }
    report["quote_measured"]["note"] = (
        "measured end to end here: random weights quoting their own greedy output verbatim "
        "(module docstring, part b); the issue's target is the computed effective tok/s"
    )


def run(out: Path, quick: bool, device: str = "cuda:0", preset: str = "llama3-8b",
        budget: str = "8GiB", overrides: dict | None = None, check: bool = True) -> dict:  # fmt: skip
    """Every part; writes ``speculative.json`` under ``out`` and returns the report
    (``check``: the float32 / bf16 correctness part first, also written alone at once)."""
    from ollm import LLM
    from ollm.bench.floors import compute_floors
    from ollm.bench.probes import measure_bandwidth
    from ollm.models.registry import STORE_FAMILIES
    from ollm.storage.synthetic import make_synthetic_store

    work = Path(os.environ.get("OLLM_WORKDIR", "/tmp/ollm-gpu"))
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    checked = None
    if check:  # tiny random models of every family: seconds, and kept if the rest is cut short
        from spec_correctness import correctness

        checked = correctness(device)
        (out / "spec_correctness.json").write_text(json.dumps(checked, indent=1))
    figures = cpu_figures()
    sizes = tuple(sorted(set(SIZES) | {f["query_tokens"] for f in figures}))
    t0 = time.perf_counter()
    tag = preset + (
        "" if not overrides else "-" + "-".join(f"{k}{v}" for k, v in overrides.items())
    )
    store = make_synthetic_store(preset, work / tag, progress=False, families=STORE_FAMILIES,
                                 **(overrides or {}))  # fmt: skip
    report: dict = {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else device,
        "torch": torch.__version__, "preset": preset, "overrides": overrides or {},
        "budget": budget, "store_build_s": time.perf_counter() - t0, "quick": quick,
    }  # fmt: skip
    prompt_tokens, new = (256, 24) if quick else (512, 48)
    mem = {"gpu_memory": budget} if device.startswith("cuda") else {"cpu_memory": budget}
    llm = LLM(store, device=device, max_context=prompt_tokens + new + 2 * max(sizes),
              hybrid="off", progress=False, **mem)  # fmt: skip
    plan = llm.plan
    report["plan"] = {
        "layers": len(plan.layers), "streamed_decode": len(plan.streamed_for("decode")),
        "reserved_bytes": plan.peak_device_bytes,
    }  # fmt: skip
    probes = measure_bandwidth(device)
    floors = compute_floors(llm.spec, llm.store, plan, probes, prompt_tokens)
    report["probes"] = probes
    report["floor"] = {
        "streamed_bytes_decode": floors["streamed_bytes_decode"],
        "h2d_pinned_GBps": probes.get("h2d_pinned_GBps"),
        "decode_io_s": floors["decode"].get("io_s"),
        "decode_floor_s": floors["decode"].get("floor_s"),
    }
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, llm.spec.vocab_size, (prompt_tokens,), generator=g).tolist()
    report["verify_pass"] = pass_times(llm, prompt, 2 if quick else 3, sizes)
    one = report["verify_pass"][0]["median_s"]
    for r in report["verify_pass"]:
        r["vs_one"] = r["median_s"] / one
    report["quote"] = end_to_end(llm, prompt, new)
    _summaries(report, figures)
    report["total_s"] = time.perf_counter() - t0
    llm.close()
    if checked is not None:
        report["correctness"] = checked
    (out / "speculative.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="shorter prompt and output, 2 reps")
    ap.add_argument("--device", default="cuda:0", help="cpu: a dry run of the script itself")
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--budget", default="8GiB")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness part")
    a = ap.parse_args()
    over = None if a.layers is None else {"num_hidden_layers": a.layers}
    rep = run(Path(a.out), a.quick, a.device, a.preset, a.budget, over, not a.no_check)
    keys = ("verify_pass", "target_20_tok_s", "total_s")
    print(json.dumps({k: rep[k] for k in keys}, indent=1, default=str))
    if "correctness" in rep:
        c = rep["correctness"]
        print({k: c[k] for k in ("float32_all_same", "bfloat16_divergent", "seconds")})


if __name__ == "__main__":
    main()
