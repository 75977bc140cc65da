"""Speculative decoding on real text: tokens per target pass and end-to-end tok/s per drafter.

Two tasks with the default model (Gemma 3 270M) and greedy decoding:
(a) quote: a ~2k-token document (this repository's docs) and a request to quote from it
    (prompt lookup finds the quoted n-grams in the prompt);
(b) free: an open-ended continuation (little for lookup to find).
Each setting runs through the public API on one ``LLM`` (``SamplingParams(speculate=...)`` per
request); the greedy output must equal plain decoding's. End-to-end tok/s = generated tokens / wall time of the whole request (prefill
included, as a user sees it); decode tok/s excludes the prefill.

    .venv/bin/python scripts/spec_bench.py --device cpu --new-tokens 128 -o spec.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ollm import LLM, SamplingParams

ROOT = Path(__file__).resolve().parent.parent


def as_prompt(llm: LLM, user: str, answer_start: str) -> str:
    """The chat template's prompt when the model has one, else plain text for a base model."""
    if getattr(llm.tokenizer, "chat_template", None):
        return llm.render_chat([{"role": "user", "content": user}]) + answer_start
    bos = llm.tokenizer.bos_token or ""
    return f"{bos}{user}\n\nAnswer: {answer_start}"


def quote_prompt(llm: LLM, doc_tokens: int) -> str:
    """A document of about ``doc_tokens`` tokens, then a question answered by quoting it."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"][:doc_tokens]
    doc = llm.tokenizer.decode(ids)
    ask = (
        "Question: how does the engine page the KV cache? Answer by quoting the relevant "
        "paragraphs of the document above word for word."
    )
    return as_prompt(llm, f"{doc}\n\n{ask}", '"')


FREE = "Write a long story about a lighthouse keeper who finds a strange map."


def run_one(llm: LLM, speculate: str, text: str, new: int, chat: bool):
    """One request on ``llm`` with ``speculate`` for it (`SamplingParams.speculate`; "batch":
    the batch engine without drafts); returns (token ids, row of numbers)."""
    batch = speculate == "batch"
    params = SamplingParams(
        temperature=0, max_new_tokens=new, ignore_eos=True, speculate="off" if batch else speculate
    )
    t0 = time.perf_counter()
    if batch:  # the batch engine without drafts: what speculation adds to, on its path
        from ollm.engine.batch_generate import generate_many

        ids = llm.tokenizer(text, add_special_tokens=not chat)["input_ids"]
        w = llm.workload
        outs, mets = generate_many(llm._engine, [ids], params, w.batch, w.context)
        res = type("R", (), {"token_ids": outs[0].token_ids, "metrics": mets[0]})
    else:
        res = llm.generate(text, params, _special=not chat)
    wall = time.perf_counter() - t0
    m, s = res.metrics, None if batch else llm.last_speculation
    row = {
        "speculate": speculate,
        "prompt_tokens": m.prompt_tokens,
        "generated": m.generated_tokens,
        "e2e_tok_s": m.generated_tokens / wall,
        "decode_tok_s": m.decode_tokens_per_second,
        "prefill_s": m.prefill_seconds,
        "tokens_per_pass": s.tokens_per_pass if s else 1.0,
        "acceptance": s.acceptance_rate if s else None,
        "drafter_share": s.drafter_share if s else 0.0,
        "by_drafter": s.by_drafter if s else {},  # proposals, drafted, accepted per drafter
        "draft_seconds_by": s.draft_seconds_by if s else {},  # drafting time per drafter
        "load_avg_1min": os.getloadavg()[0],  # other work on the machine skews the tok/s
    }
    return res.token_ids, row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: Gemma 3 270M")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--doc-tokens", type=int, default=2000)
    ap.add_argument(
        "--drafters",
        default="off,batch,lookup,tree:lookup,self:6,tree:self:6,mix:self:6",
        help="'batch': batch engine, no drafts; any speculate value (tree:, mix:, cascade:)",
    )
    ap.add_argument("--tasks", default="quote,free", help="quote, free or both")
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()
    free = lambda llm: as_prompt(llm, FREE, "")  # noqa: E731
    tasks = {"quote": lambda llm: quote_prompt(llm, a.doc_tokens), "free": free}
    rows = []
    tasks = {k: v for k, v in tasks.items() if k in a.tasks.split(",")}
    # One model for every row: the drafter is chosen per request (SamplingParams.speculate).
    with LLM(a.model, device=a.device, max_context=4096) as llm:
        for task, prompt in tasks.items():
            text = prompt(llm)
            llm.generate(text, SamplingParams(temperature=0, max_new_tokens=2), _special=False)
            base = None
            for spec in a.drafters.split(","):
                toks, row = run_one(llm, spec, text, a.new_tokens, chat=True)
                base = toks if base is None else base
                row.update(task=task, same_as_plain=toks == base)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(
        "\n| task | speculate | tok/pass | accept | e2e tok/s | decode tok/s | drafter % | same |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        print(
            f"| {r['task']} | {r['speculate']} | {r['tokens_per_pass']:.2f} | {acc} | "
            f"{r['e2e_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['drafter_share']:.0%} | "
            f"{r['same_as_plain']} |"
        )
    if a.output:
        Path(a.output).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
