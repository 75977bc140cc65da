"""Host syncs and torch ops per routed decode layer counted on the CPU stand-in (issue 18):

    PYTHONPATH=src:tests python scripts/routed_syncs.py [--out FILE] [--new N]

A tiny random-weight Llama with Llama-3.1-8B's head grouping (32 query, 8 KV heads) decodes
greedily with all of its KV offloaded to RAM and ``topk`` attention (every layer routed) on the
stand-in accelerator ("cpu:1"), tokens checked against the plain CPU run
(``tests/test_routed_syncs.py`` ``routed_decode``, whose docstring says what counts as a sync).
Per decode layer: syncs by kind, aten ops dispatched by the layer (views included) and by its
attention over the cache. To compare two versions of the code run it with each on
``PYTHONPATH`` (the counter patches ``kv.routed._to_host``, which both have).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def count(new: int, kv_heads: int) -> dict:
    import test_routed_syncs as t

    with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as mp:
        layers, facts = t.routed_decode(Path(d), mp, new, num_key_value_heads=kv_heads)
    n = len(layers)
    syncs = sum((s for s, *_ in layers), collections.Counter())
    ops = sum((by for *_, by in layers), collections.Counter())
    return dict(
        kv_heads=kv_heads,
        decode_layers=n,
        **facts,
        syncs_per_layer=round(sum(syncs.values()) / n, 3),
        syncs_by_kind={k: round(v / n, 3) for k, v in sorted(syncs.items())},
        ops_per_layer=round(sum(x[1] for x in layers) / n, 2),
        attention_ops_per_layer=round(sum(x[2] for x in layers) / n, 2),
        ops_by_name={k: round(v / n, 2) for k, v in ops.most_common(12)},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--new", type=int, default=8, help="tokens generated (decode steps + 1)")
    args = ap.parse_args()
    runs = [count(args.new, h) for h in (8, 2)]
    text = json.dumps({"device": "cpu stand-in ('cpu:1')", "runs": runs}, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
