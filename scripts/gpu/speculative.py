"""Device run of speculative decoding (issue 15): Llama-3.1-8B shapes (random bf16 weights) under
8 GiB of GPU memory, most layers streamed from pinned RAM every weight pass.

    PYTHONPATH=src:tests python scripts/gpu/speculative.py --out $OUT [--quick]

(a) Verify-pass time vs query tokens (1, 2, 4, ..., 64): each is one weight pass through the
    batch engine's verification path (a decode token plus a tree of n - 1 draft nodes under the
    tree attention mask), timed per step (CUDA synchronised), next to the streamed-bytes floor
    (bytes the plan streams per decode pass / pinned host->GPU bandwidth measured now).
(b) End-to-end tok/s of greedy decoding, plain vs prompt lookup (chain and tree), on a quoting
    task. Random weights make real drafts meaningless, so the task is made self-consistent: the
    "document" the lookup drafter quotes from is the model's own plain greedy continuation
    (given to the drafter only, not to the model), i.e. the acceptance of a verbatim quote.
    Measured: wall time, tokens, target passes, tokens per pass, and whether the tokens equal
    plain decoding's (bf16 rows of other step shapes may round differently: reported, not
    assumed). Also the acceptance-independent table: effective tok/s = tokens per pass /
    measured pass time, for tokens-per-pass values a drafter might reach on real text (the CPU
    measurements on Gemma 3 270M in docs/benchmarks.md give the real-text tokens per pass).

Writes ``speculative.json`` under ``--out``. The issue's target: effective >= 20 tok/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SIZES = (1, 2, 4, 8, 16, 32, 64)  # query tokens per verify pass
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


def pass_times(llm, prompt: list[int], reps: int) -> list[dict]:
    """Seconds of one engine step (one weight pass) per query-token count."""
    from ollm import SamplingParams
    from ollm.engine.batch import BatchEngine
    from ollm.engine.speculative import Speculator

    tree = FixedTree(llm.spec.vocab_size)
    eng = BatchEngine(
        llm.runner, None, (), max_batch=1, max_context=llm.workload.context,
        drafter=Speculator(tree, k=max(SIZES)),
    )  # fmt: skip
    steps = 2 + reps * len(SIZES) * 2
    eng.add(prompt, SamplingParams(temperature=0, max_new_tokens=steps, ignore_eos=True))
    eng.step()  # the prompt's prefill
    rows = []
    for n in SIZES:
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


def end_to_end(llm, prompt: list[int], new: int) -> dict:
    """Plain vs lookup (chain, tree) on the self-consistent quoting task (module docstring)."""
    from ollm import SamplingParams
    from ollm.engine.batch import BatchEngine
    from ollm.engine.speculative import Speculator

    params = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
    w = llm.workload
    out: dict = {"new_tokens": new, "prompt_tokens": len(prompt)}
    plain = None
    for name in ("plain", "lookup", "tree:lookup"):
        spec = None
        if name != "plain":
            spec = Speculator(QuoteLookup(plain), tree=name.startswith("tree"))
        eng = BatchEngine(llm.runner, None, (), max_batch=1, max_context=w.context, drafter=spec)
        eng.add(prompt, params)
        eng.step()  # prefill, not timed: decode rate is what speculation changes
        sync()
        t, steps = time.perf_counter(), 0
        while eng.has_work():
            eng.step()
            steps += 1
        sync()
        dt = time.perf_counter() - t
        (toks,) = [o.token_ids for o in eng.finished.values()]
        eng.close()
        plain = toks if plain is None else plain
        pairs = enumerate(zip(toks, plain, strict=False))
        diverge = next((i for i, (a, b) in pairs if a != b), None)
        row = {
            "decode_s": dt, "decode_passes": steps, "decode_tok_s": (len(toks) - 1) / dt,
            "tokens": len(toks), "same_as_plain": toks == plain,
            # bf16 rows of other step shapes round differently; a random model's flat logits
            # have near-ties, so greedy may flip there and the quote stops matching after it
            "first_divergence": diverge,
        }  # fmt: skip
        if spec is not None:
            row.update(spec.stats.summary())
        out[name] = row
        print(name, row, flush=True)
    return out


def _summaries(report: dict) -> None:
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
    q = report["quote"]
    report["target_20_tok_s"] = {
        "measured_tree_lookup_decode_tok_s": q["tree:lookup"]["decode_tok_s"],
        "met_by_measured": q["tree:lookup"]["decode_tok_s"] >= 20,
        "note": "acceptance of a verbatim quote (the self-consistent task above)",
    }


def run(out: Path, quick: bool, device: str = "cuda:0", preset: str = "llama3-8b",
        budget: str = "8GiB", overrides: dict | None = None) -> dict:  # fmt: skip
    """Both parts; writes ``speculative.json`` under ``out`` and returns the report."""
    from ollm import LLM
    from ollm.bench.floors import compute_floors
    from ollm.bench.probes import measure_bandwidth
    from ollm.models.registry import STORE_FAMILIES
    from ollm.storage.synthetic import make_synthetic_store

    work = Path(os.environ.get("OLLM_WORKDIR", "/tmp/ollm-gpu"))
    work.mkdir(parents=True, exist_ok=True)
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
    llm = LLM(store, device=device, max_context=prompt_tokens + new + 2 * max(SIZES),
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
    report["verify_pass"] = pass_times(llm, prompt, 2 if quick else 3)
    one = report["verify_pass"][0]["median_s"]
    for r in report["verify_pass"]:
        r["vs_one"] = r["median_s"] / one
    report["quote"] = end_to_end(llm, prompt, new)
    _summaries(report)
    report["total_s"] = time.perf_counter() - t0
    llm.close()
    out.mkdir(parents=True, exist_ok=True)
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
    a = ap.parse_args()
    over = None if a.layers is None else {"num_hidden_layers": a.layers}
    rep = run(Path(a.out), a.quick, a.device, a.preset, a.budget, over)
    print(json.dumps({k: rep[k] for k in ("verify_pass", "target_20_tok_s", "total_s")}, indent=1))


if __name__ == "__main__":
    main()
