"""The MLP-on-the-CPU decode path (``mlp_cpu``, on by default; ``planning/mlp_cpu.py``) on a
device:

    PYTHONPATH=src:tests python3 scripts/gpu/mlp_cpu_check.py [--out FILE] [--device cuda]
        [--families llama,mistral,qwen2,qwen3,gemma3_text]

Per dense family (default: all five), a tiny random-weight model (float32): 4 prompts sharing a
48-token prefix through
``BatchEngine.for_plan`` on an engine-sized plan whose budget streams layers, three times: the
plain plan, the same with two streamed layers marked ``mlp_cpu`` (a decode step copies only
their attention; their MLP runs on the CPU from the pinned RAM copy), and that again with the
engine's measured choice (``StepMode`` probing steps that stream every layer). The ring slots
are overwritten before every step, so a computation from stale slot bytes shows. Reported:
greedy tokens equal to each prompt alone (per run), the bytes each step copied, and whether
every decode step after a decode step of the forced run copied exactly the skipped bytes fewer.
``--device cpu``: the accelerator played by the CPU (``tests/test_mlp_cpu.py`` runs it so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

PREFIX, ROWS = 48, 4


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    head = torch.randint(0, 256, (PREFIX,), generator=g).tolist()
    return [head + torch.randint(0, 256, (5 + 3 * i,), generator=g).tolist() for i in range(4)]


def _plans(llm, device: str):
    """(plain, split, skipped bytes, MLP bytes): an engine plan that streams at least 3 layers,
    and it with its first two streamed layers' MLP on the CPU in decode steps of <= ``ROWS``
    rows; the bytes a decode copy skips (MLP and padding) and the MLP's alone."""
    from conftest import plan_on_device, streaming_engine_plan
    from ollm.planning.placement import Workload
    from ollm.runtime.mlp_split import MLP_PREFIX, attention_ranges
    from ollm.storage.store import layer_file

    store = llm.store
    plain = streaming_engine_plan(llm.spec, store, Workload(4, 96, 96, PREFIX))
    two = plain.streamed[:2]
    layers = tuple(replace(p, mlp_cpu=i in two) for i, p in enumerate(plain.layers))
    split = replace(plain, layers=layers, cpu_max_tokens=ROWS)
    skipped = sum(store.layer_nbytes(i) - sum(n for _, n in attention_ranges(store, layer_file(i)))
                  for i in two)  # fmt: skip
    mlp = sum(e.nbytes for i in two for name, e in store.files[layer_file(i)].tensors.items()
              if name.startswith(MLP_PREFIX))  # fmt: skip
    if device == "cpu":  # the accelerator played by the CPU
        plain, split = plan_on_device(plain, "cpu:1"), plan_on_device(split, "cpu:1")
    return plain, split, skipped, mlp


def _poison(pf) -> None:
    """Overwrite every ring-slot byte no issued copy has put there for the coming step: whole
    free slots, and in a slot whose copy is in flight (issued ahead at the last step's end) the
    bytes outside that copy's ranges (a split layer's MLP region). The in-flight copy's ranges
    follow the current phase: a phase change drops and re-issues in-flight copies."""
    if pf.cuda:
        torch.cuda.synchronize(pf.device)  # the ahead copies have landed; nothing races the fill
    slots, m = len(pf._slots), len(pf.streamed)
    held = {n % slots: pf.streamed[n % m] for n in range(pf._consumed, pf._issued)}
    for k, buf in enumerate(pf._slots):
        if k not in held:
            buf.fill_(0x7F)
            continue
        at = 0
        for off, n in pf._ranges(held[k]):
            buf[at:off].fill_(0x7F)
            at = off + n
        buf[at:].fill_(0x7F)


def _run(llm, plan, measured: bool) -> tuple[list, list]:
    """(tokens per prompt, [query rows, bytes copied] per step) of the batch on ``plan``."""
    from ollm import SamplingParams
    from ollm.engine.batch import BatchEngine
    from ollm.engine.runner import Runner
    from ollm.engine.step_mode import StepMode
    from ollm.runtime.prefetch import Prefetcher
    from ollm.storage.store import LayerStore

    params = SamplingParams(max_new_tokens=8, temperature=0)
    prefetcher = Prefetcher(LayerStore(llm.store_path), plan, llm.stats)
    eng = BatchEngine.for_plan(Runner(llm.spec, plan, prefetcher, llm.dtype), None, (), 4, 96)
    try:
        if not measured:  # the plan's choice in every decode step (no probe of streaming)
            eng.step_mode = StepMode(None)
        ids = [eng.add(q, params) for q in _prompts()]
        steps = []
        while eng.has_work():
            _poison(prefetcher)
            rows, copied = eng.step_tokens, llm.stats.bytes_h2d
            eng.step()
            steps.append([eng.step_tokens - rows, llm.stats.bytes_h2d - copied])
        assert eng.kv_blocks_used() == 0
        return [eng.finished[r].token_ids for r in ids], steps
    finally:
        eng.close()
        prefetcher.close()


def check(path: Path, device: str, cache: Path) -> dict:
    """One model: the three runs against each prompt alone (see the module docstring)."""
    from ollm import LLM, SamplingParams

    kw = dict(device=device, dtype="float32", cache_dir=cache, progress=False, max_batch=4,
              max_context=96)  # fmt: skip
    with LLM(path, **kw, shared_prefix=PREFIX) as llm:
        params = SamplingParams(max_new_tokens=8, temperature=0)
        want = [llm.generate(p, params).token_ids for p in _prompts()]
        plain, split, skipped, mlp = _plans(llm, device)
        runs = {name: _run(llm, p, m) for name, p, m in
                (("plain", plain, False), ("split", split, False), ("measured", split, True))}  # fmt: skip
    # Decode steps after a decode step: copies are counted when issued, and the first decode
    # step also re-issues the ahead copies its phase change dropped (counted in the step before).
    plain_steps, split_steps = runs["plain"][1], runs["split"][1]
    fewer = [plain_steps[j][1] - split_steps[j][1] for j in range(1, len(plain_steps))
             if plain_steps[j][0] <= ROWS and plain_steps[j - 1][0] <= ROWS]  # fmt: skip
    return {
        "equal": all(r[0] == want for r in runs.values()),
        "equal_runs": {k: r[0] == want for k, r in runs.items()},
        "streamed": len(plain.streamed),
        "skipped_bytes": skipped,
        "mlp_bytes": mlp,
        "decode_steps": len(fewer),
        "copies_fewer_by_skipped": bool(fewer) and all(f == skipped for f in fewer),
        "steps": {k: v[1] for k, v in runs.items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="mlp_cpu_check.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--families", default="llama,mistral,qwen2,qwen3,gemma3_text")
    args = ap.parse_args()
    from conftest import make_hf_model

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            make_hf_model(family, Path(tmp) / family)
            try:
                rows[family] = check(Path(tmp) / family, args.device, Path(tmp) / "cache")
            except Exception as exc:  # the other families still run
                rows[family] = {"equal": False, "error": repr(exc)}
            print(family, {k: v for k, v in rows[family].items() if k != "steps"}, flush=True)
    Path(args.out).write_text(json.dumps({"device": args.device, "rows": rows}, indent=1))
    ok = all(r.get("equal") and r.get("copies_fewer_by_skipped") and r.get("skipped_bytes")
             for r in rows.values())  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
