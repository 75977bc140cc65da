"""Host time between two decode steps of the paged batch engine, on the CPU (issue 13):

    PYTHONPATH=src nice python scripts/step_overhead.py [--batches 16,64] [--prompt 2000]
        [--steps 20] [--out FILE]

A llama of tiny widths (hidden 64, 2 layers, 4 heads, 2 KV heads of 16) but Llama 3's vocabulary
(128256 tokens: the LM head's logits rows and the greedy picks over them cost what they cost
at 8B), float32, everything on the CPU. ``B`` prompts of ~``--prompt`` tokens (block tables of
a 2k context: ~128 blocks a sequence) are prefilled, then pure decode steps are timed:

* ``step_ms``: wall per `BatchEngine.step` (median of ``--steps``);
* ``layers_ms``: wall inside the layer forwards (the runner's per-layer compute spans, a
  `Timeline`): on a GPU, the part the weight stream overlaps;
* ``head_ms``: wall of ``Runner.logits`` (norm + LM head over the rows that need logits);
* ``rest_ms``: ``step - layers - head``: the host time between the last layer of one step and
  the first layer of the next (scheduling, sampling, updates, the step's layout and its
  index tensors, the embedding), which a GPU step adds to the weight-stream floor;
* ``profile``: cProfile over ``--profile-steps`` steps: the functions with the most own time
  and the cumulative time of the engine's stages (microseconds per step, profiler inflated).

One JSON object (stdout, and ``--out``). Compare two trees by putting each ``src`` on
``PYTHONPATH`` (e.g. a ``git archive`` of the base commit), under ``nice``, three runs each.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import batch_overhead  # noqa: E402
from moe_overhead import _commit, _top, write_report  # noqa: E402

SHAPES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128256,  # Llama 3's: the head and the picks are real work
)
STAGES = (  # cumulative time of these (cProfile function names, ollm's files) per step
    "step", "schedule", "update", "_forward", "forward", "_embed", "logits", "greedy_picks",
    "layer_kv", "_layout", "_verify", "_accept", "sweep", "_drafts", "plan", "input_ids",
    "positions", "_register", "head",
)  # fmt: skip


class _Clock:
    """Wall seconds inside the layer forwards (timeline compute spans) and the LM head."""

    def __init__(self, runner) -> None:
        from ollm.telemetry.timeline import Timeline

        self.runner = runner
        runner.timeline = self.tl = Timeline("cpu")
        self.head = 0.0
        logits = runner.logits

        def timed(h: torch.Tensor) -> torch.Tensor:
            t0 = time.perf_counter()
            out = logits(h)
            self.head += time.perf_counter() - t0
            return out

        runner.logits = timed  # an instance attribute of this script's runner only

    def layers(self) -> float:
        return sum(s.end - s.start for s in self.tl._host if s.kind == "compute")

    def reset(self) -> None:
        self.tl._host.clear()
        self.head = 0.0


def _stages(prof: cProfile.Profile, steps: int) -> dict:
    return batch_overhead._stages(prof, steps, STAGES)


def _med(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 3)


def measure_batch(llm, clock: _Clock, batch: int, args) -> dict:
    """Timed decode steps of ``batch`` sequences with ~``args.prompt``-token prompts."""
    from ollm import SamplingParams
    from ollm.bench.stepprof import decode_ready
    from ollm.engine.batch import BatchEngine

    need = 4 + args.warmup + args.steps + args.profile_steps
    sp = SamplingParams(temperature=0, max_new_tokens=need, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    ctx = args.prompt + 128 + need
    eng = BatchEngine(llm.runner, None, (), block_tokens=16, max_batch=batch, max_context=ctx)
    for i in range(batch):
        n = args.prompt + (37 * i) % 97
        eng.add(torch.randint(0, SHAPES["vocab_size"], (n,), generator=g).tolist(), sp)
    t0 = time.perf_counter()
    decode_ready(eng)
    prefill = time.perf_counter() - t0
    for _ in range(args.warmup):
        eng.step()
    wall, layers, head = [], [], []
    for _ in range(args.steps):
        clock.reset()
        t0 = time.perf_counter()
        eng.step()
        wall.append(time.perf_counter() - t0)
        layers.append(clock.layers())
        head.append(clock.head)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.profile_steps):
        eng.step()
    prof.disable()
    assert len(eng.scheduler.seqs) == batch, "a sequence ended while measured"
    tokens = {rid: list(live.out.token_ids) for rid, live in eng.live.items()}
    eng.close()
    rest = [w - a - b for w, a, b in zip(wall, layers, head, strict=True)]
    return dict(
        batch=batch,
        prefill_s=round(prefill, 2),
        step_ms=_med(wall),
        layers_ms=_med(layers),
        head_ms=_med(head),
        rest_ms=_med(rest),
        rest_ms_p10_p90=[
            round(sorted(rest)[len(rest) // 10] * 1e3, 3),
            round(sorted(rest)[9 * len(rest) // 10] * 1e3, 3),
        ],  # fmt: skip
        tokens_hash=hash(tuple(tuple(t) for t in tokens.values())) & 0xFFFFFFFF,
        profile=dict(
            stages=_stages(prof, args.profile_steps),
            top=_top(prof, args.profile_steps, args.top),
        ),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=2000, help="shortest prompt (tokens)")
    ap.add_argument("--steps", type=int, default=20, help="decode steps timed per batch")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--machine", default="2-core CPU VM")
    args = ap.parse_args()
    import ollm
    from ollm import LLM

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="step-overhead-"))
    path = batch_overhead._store(tmp, args.layers, SHAPES)
    batches = [int(b) for b in args.batches.split(",")]
    ctx = args.prompt + 256 + args.steps + args.warmup + args.profile_steps
    llm = LLM(path, device="cpu", dtype="float32", max_batch=max(batches), max_context=ctx,
              cache_dir=tmp / "c", progress=False)  # fmt: skip
    clock = _Clock(llm.runner)
    out = dict(
        machine=args.machine, commit=_commit(), ollm=str(Path(ollm.__file__).resolve().parent),
        torch=torch.__version__, threads=args.threads,
        shapes=SHAPES | {"layers": args.layers, "prompt": args.prompt},
        load_before=os.getloadavg()[0],
        cases=[measure_batch(llm, clock, b, args) for b in batches],
    )  # fmt: skip
    llm.close()
    write_report(out, args.out)


if __name__ == "__main__":
    main()
