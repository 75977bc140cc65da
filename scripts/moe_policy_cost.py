"""Host time of the expert cache's replacement bookkeeping per decode call (issue 19), on the CPU:

    PYTHONPATH=src python scripts/moe_policy_cost.py [--out FILE]

The policies of ``runtime/experts_policy.py`` (LRU, LFU) driven as ``ExpertCache.run`` drives
them (a ``touch`` per routed expert, then for each miss a victim, its ``remove`` and the new
expert's ``add``), with Qwen3-30B-A3B's routing shape over the H200 bench's cache: 8 layers of
128 experts, top-8, 70 slots; experts drawn uniformly or Zipf(1.2) (a random ranking per
layer), 400 tokens. Reports microseconds per call (policy and the harness's dict work) and the
hit rate (CPU time of this thread over all calls). No torch op is involved: this is the Python the policies add to each sparse layer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ollm.runtime.experts_policy import Lfu, Lru

LAYERS, EXPERTS, TOP_K, SLOTS, TOKENS = 8, 128, 8, 70, 400


def run(policy, a: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    p = np.arange(1, EXPERTS + 1) ** -a if a else np.ones(EXPERTS)
    p = p / p.sum()
    perms = [rng.permutation(EXPERTS) for _ in range(LAYERS)]
    calls = [
        [int(perms[j][x]) for x in rng.choice(EXPERTS, TOP_K, replace=False, p=p)]
        for _ in range(TOKENS)
        for j in range(LAYERS)
    ]
    pol, where, free, hits = policy(), set(), SLOTS, 0
    t0 = time.thread_time()  # this thread's CPU time: steadier than wall time on a shared host
    for c, used in enumerate(calls):
        j = c % LAYERS
        pinned, misses = set(), []
        for e in used:
            key = (j, e)
            cached = key in where
            pol.touch(key, cached)
            if cached:
                pinned.add(key)
                hits += 1
            else:
                misses.append(key)
        for key in misses:
            if free:
                free -= 1
            else:
                victim = pol.victim(pinned)
                pol.remove(victim)
                where.discard(victim)
            where.add(key)
            pol.add(key)
            pinned.add(key)
    seconds, n = time.thread_time() - t0, len(calls)
    return {"us_per_call": round(seconds / n * 1e6, 2), "hit_rate": round(hits / (n * TOP_K), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    out = {
        "shape": dict(layers=LAYERS, experts=EXPERTS, top_k=TOP_K, slots=SLOTS, tokens=TOKENS),
        "runs": [
            {"policy": pol.__name__.lower(), "zipf": a} | run(pol, a)
            for a in (0.0, 1.2)
            for pol in (Lru, Lfu)
        ],
    }
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
