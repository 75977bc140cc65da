#!/usr/bin/env python
"""Load generator for ``ollm serve`` (or any OpenAI-compatible server with vLLM's metrics).

    python scripts/serve_load.py --url http://127.0.0.1:8000 --model NAME \
        --requests 32 --concurrency 1,8,32 --max-tokens 32

For each concurrency: ``--requests`` streaming completions (a bounded number), at most
``concurrency`` in flight; throughput, time to first token and inter-token percentiles measured by
the client; ``/metrics`` scraped before and after, and its deltas (requests, prompt and generated
tokens, TTFT observations) checked against the client's own counts. Exits 1 on a mismatch or a
failed request. ``--json FILE`` writes every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import httpx
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()


def scrape(url: str, key: str | None) -> dict[str, float]:
    """``/metrics`` samples summed over labels other than the finish reason."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    text = httpx.get(url.rstrip("/") + "/metrics", headers=headers, timeout=30).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) in milliseconds; 0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    return 1000 * xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def prompt(i: int, words: int) -> str:
    """A distinct prompt of about ``words`` words."""
    return f"Request {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))


async def one(client: AsyncOpenAI, model: str, text: str, max_tokens: int) -> dict:
    """One streaming request; its timings and token counts."""
    t0 = time.perf_counter()
    first, last, gaps, usage = None, None, [], None
    stream = await client.completions.create(
        model=model, prompt=text, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].text:
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last = now
    end = time.perf_counter()
    return {
        "ttft": (first or end) - t0,
        "gaps": gaps,
        "latency": end - t0,
        "prompt_tokens": usage.prompt_tokens if usage else 0,
        "completion_tokens": usage.completion_tokens if usage else 0,
    }


async def run_level(args: argparse.Namespace, concurrency: int) -> dict:
    """``args.requests`` requests at ``concurrency``; client figures and the metrics check."""
    client = AsyncOpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.api_key or "none",
                         max_retries=0, timeout=600)  # fmt: skip
    gate = asyncio.Semaphore(concurrency)

    async def gated(i: int) -> dict | BaseException:
        async with gate:
            try:
                return await one(client, args.model, prompt(i, args.prompt_words), args.max_tokens)
            except Exception as exc:  # counted as a failure, reported below
                return exc

    before = scrape(args.url, args.api_key)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(gated(i) for i in range(args.requests)))
    wall = time.perf_counter() - t0
    await client.close()
    await asyncio.sleep(0.2)  # the server observes a request as its stream ends
    after = scrape(args.url, args.api_key)
    ok = [r for r in results if isinstance(r, dict)]
    failed = [repr(r) for r in results if not isinstance(r, dict)]

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    gen = sum(r["completion_tokens"] for r in ok)
    client_counts = {
        "vllm:request_success_total": len(ok),
        "vllm:prompt_tokens_total": sum(r["prompt_tokens"] for r in ok),
        "vllm:generation_tokens_total": gen,
        "vllm:time_to_first_token_seconds_count": len(ok),
    }
    mismatches = {k: (v, delta(k)) for k, v in client_counts.items() if delta(k) != v}
    ttft = [r["ttft"] for r in ok]
    gaps = [g for r in ok for g in r["gaps"]]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "failed": failed,
        "wall_s": wall,
        "prompt_tokens": client_counts["vllm:prompt_tokens_total"],
        "completion_tokens": gen,
        "output_tok_s": gen / wall if wall else 0.0,
        "ttft_ms": {q: percentile(ttft, q) for q in (50, 90, 99)},
        "itl_ms": {q: percentile(gaps, q) for q in (50, 90, 99)},
        "server_ttft_mean_ms": 1000
        * delta("vllm:time_to_first_token_seconds_sum")
        / max(1, delta("vllm:time_to_first_token_seconds_count")),
        "metrics_mismatch": mismatches,
    }


HEADER = "conc  reqs  fail  wall s  out tok/s  TTFT p50/p90/p99 ms   ITL p50/p90/p99 ms   metrics"


def summary_line(r: dict) -> str:
    """One level's row under ``HEADER``; ends in ``ok`` when /metrics matched the client."""
    t, i = r["ttft_ms"], r["itl_ms"]
    check = "ok" if not r["metrics_mismatch"] else f"MISMATCH {r['metrics_mismatch']}"
    return (
        f"{r['concurrency']:>4}  {r['requests']:>4}  {len(r['failed']):>4}  {r['wall_s']:6.2f}"
        f"  {r['output_tok_s']:9.1f}  {t[50]:6.1f}/{t[90]:6.1f}/{t[99]:6.1f}"
        f"  {i[50]:6.1f}/{i[90]:6.1f}/{i[99]:6.1f}  {check}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--api-key", default=None)
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-words", type=int, default=16)
    p.add_argument("--json", default=None, help="write the figures to this file")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 10_000:
        p.error("--requests must be in 1..10000")
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    rows = [asyncio.run(run_level(args, c)) for c in levels]
    print(HEADER)
    for r in rows:
        print(summary_line(r))
        for f in r["failed"][:3]:
            print(f"      failed: {f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 1 if any(r["failed"] or r["metrics_mismatch"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
