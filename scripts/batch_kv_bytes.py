"""KV bytes of the batch engine's paged pools with and without a KV codec (issue 17), and one
short static batch per setting (tokens against the single-request path of the same codec).

    python scripts/batch_kv_bytes.py --out docs/runs/DATE/NAME.json [--model PATH]

The pools are sized as ``LLM.generate`` sizes them (``BatchEngine.for_plan`` for ``--batch`` x
``--context``); bytes per token are the pools' bytes over that many tokens, every layer (the
sliding-window groups of Gemma 3 stay exact and are counted too).
"""

from __future__ import annotations

import argparse
import json
import time


def case(store, codec: str, args) -> dict:
    """Pool bytes for ``codec`` and a timed static batch of ``args.run`` prompts."""
    import torch

    from ollm import LLM, SamplingParams
    from ollm.engine.batch import BatchEngine

    kw = dict(device="cpu", max_batch=args.batch, max_context=args.context, progress=False)
    with LLM(store, kv_codec=codec, kv_recent=args.recent, **kw) as llm:
        eng = BatchEngine.for_plan(llm.runner, None, (), args.batch, args.context)
        full = eng.pools.managers["full"]
        out = {
            "kv_codec": codec,
            "kv_recent": args.recent,
            "block_tokens": full.block_tokens,
            "full_blocks": full.capacity_blocks(),
            "exact_slots": getattr(full, "exact_slots", None),
            "pool_bytes": sum(eng.pools.nbytes.values()),
        }
        tokens = args.batch * args.context
        out["bytes_per_token"] = out["pool_bytes"] / tokens
        # the full-attention group alone (what a codec encodes; windows stay exact)
        out["full_bytes_per_token"] = (
            sum(s.nbytes for s in eng.pools.stores["full"].values()) / tokens
        )
        if not args.run:
            eng.close()
            return out
        g = torch.Generator().manual_seed(0)
        vocab = llm.spec.vocab_size
        ps = [
            torch.randint(0, vocab, (args.prompt,), generator=g).tolist() for _ in range(args.run)
        ]
        sp = SamplingParams(temperature=0, max_new_tokens=args.new, ignore_eos=True)
        t0 = time.perf_counter()
        outs, m = eng.generate(ps, sp)
        out["static_wall_s"] = time.perf_counter() - t0
        out["decode_tok_s"] = sum(len(o.token_ids) - 1 for o in outs) / m.decode_seconds
        eng.close()
        alone = [llm.generate(p, sp).token_ids for p in ps]
        out["tokens_equal_single_path"] = [o.token_ids for o in outs] == alone
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default=None, help="HF directory, .gguf or store (default Gemma 3 270M)"
    )
    p.add_argument("--codecs", default="none/int8/k:int4,v:int8", help="/-separated")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--recent", type=int, default=128)
    p.add_argument("--run", type=int, default=2, help="prompts of the timed static batch")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=8)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from ollm.bench.run import resolve_model

    store, name = resolve_model(args.model, None, None, False, "cpu")
    cases = [case(store, c, args) for c in args.codecs.split("/")]
    report = {"model": name, "settings": vars(args), "cases": cases}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
