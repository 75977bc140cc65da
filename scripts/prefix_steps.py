"""The bench's shared-prefix case on the CPU: steps and walls (issue 13, in-step adoption).

    PYTHONPATH=src python scripts/prefix_steps.py [--out FILE] [--layers 8] [--prefix 2048]
        [--tail 32] [--new-tokens 16] [--repeats 3]

Runs `ollm.bench.batching.prefix_run` (16 requests of ``--prefix + --tail`` tokens, ``--new-tokens``
each: sharing their first ``--prefix`` tokens on a ``shared_prefix`` plan, and sharing nothing on
the batch plan, as ``ollm bench --batch`` does) with whatever ``ollm`` is on the path, so a tree
before a change and one after run the same arrivals of their own ``prefix_run``. A random-weight
llama of tiny widths (`batch_overhead.SHAPES`, ``--layers`` deep), float32, one thread. Per case:
median wall over ``--repeats``, steps (weight passes), query tokens, prefix hits (and those that
adopted blocks computed in their own step, where the tree counts them), each step's wall.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from batch_overhead import SHAPES  # noqa: E402


def _store(tmp: Path, layers: int) -> Path:
    from ollm.models.registry import STORE_FAMILIES
    from ollm.storage.convert import convert
    from ollm.storage.synthetic import SyntheticSource

    src = SyntheticSource("llama3-8b", families=STORE_FAMILIES, num_hidden_layers=layers, **SHAPES)
    return convert(src, tmp / "store", dtype=torch.float32, progress=False, families=STORE_FAMILIES)


def _case(store: Path, args, shared: bool) -> list[dict]:
    from ollm import LLM
    from ollm.bench.batching import PREFIX_REQUESTS, prefix_run

    n = args.prefix + args.tail
    kw = dict(shared_prefix=args.prefix) if shared else {}
    llm = LLM(store, device="cpu", progress=False, max_batch=PREFIX_REQUESTS,
              max_context=n + args.new_tokens, **kw)  # fmt: skip
    try:
        return [
            prefix_run(llm, n, args.new_tokens, r, args.prefix if shared else 0)
            for r in range(args.repeats)
        ]
    finally:
        llm.close()


def _summary(runs: list[dict]) -> dict:
    """Medians over the runs; ``admission_s``: the steps carrying prompt tokens (more query
    tokens than requests), ``decode_s``: the others."""
    from ollm.bench.batching import PREFIX_REQUESTS

    adm = [sum(s for s, n in r["steps"] if n > PREFIX_REQUESTS) for r in runs]
    dec = [sum(s for s, n in r["steps"] if n <= PREFIX_REQUESTS) for r in runs]
    return {
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "walls_s": [round(r["wall_s"], 4) for r in runs],
        "admission_s": statistics.median(adm),
        "decode_s": statistics.median(dec),
        "admission_steps": sum(n > PREFIX_REQUESTS for _, n in runs[0]["steps"]),
        "steps": len(runs[0]["steps"]),
        "query_tokens": runs[0]["query_tokens"],
        "prefix_hits": runs[0]["prefix_hits"],
        "inflight_hits": runs[0].get("inflight_hits"),
        "step_walls_s": [s for s, _ in runs[0]["steps"]],
        "step_tokens": [n for _, n in runs[0]["steps"]],
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--tail", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import ollm

    tree = Path(ollm.__file__).resolve().parents[2]
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        store = _store(Path(tmp), args.layers)
        shared = _summary(_case(store, args, True))
        distinct = _summary(_case(store, args, False))
    report = {
        "tree": str(tree), "commit": commit or None, "settings": vars(args),
        "shared": shared, "distinct": distinct, "ratio": shared["wall_s"] / distinct["wall_s"],
    }  # fmt: skip
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
