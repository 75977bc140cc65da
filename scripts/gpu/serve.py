"""Device load benchmark of ``ollm serve`` (issue 14): Llama-3.1-8B shapes (random bf16 weights)
under 8 GiB of GPU memory, driven by ``scripts/serve_load.py`` at concurrency 1, 8 and 32.

    PYTHONPATH=src python scripts/gpu/serve.py --out $OUT [--quick]
    (carry .whl/serve, written by scripts/fetch_serve_wheels.sh)

1. The serving stack: when FastAPI, uvicorn, prometheus-client, openai or httpx is missing (the
   device machine has none), the carried wheels of ``.whl/serve`` are installed into a temporary
   folder put first on ``sys.path`` and the server's ``PYTHONPATH`` (they hold no torch, numpy
   or transformers; the modules they shadow are printed).
2. The model: the synthetic store of ``--synthetic`` (``bench.models.synthetic_store``; ``--set
   KEY=VALUE`` overrides config fields, e.g. fewer layers) plus a word-level tokenizer over its
   whole vocabulary (the load generator's English words first, so prompts are distinct tokens,
   then ``w<id>``: every generated id decodes to a non-empty piece, which the client times).
   ``--model PATH``: any model with a tokenizer instead.
3. ``ollm serve`` in a subprocess (``--port 0``, loopback, ``--gpu-memory``, ``--max-batch 32``),
   its output in ``serve.log``; one warm-up request; then at each concurrency a bounded number of
   greedy streaming completions (``serve_load.run_level``: throughput, TTFT and inter-token
   percentiles, ``/metrics`` scraped before and after and checked against the client's counts).
   A level that would pass ``--deadline`` (estimated from the last inter-token time) runs fewer
   requests, or is skipped and says so.
4. Ctrl-C (SIGINT) to the server at the end or on error; its exit code is reported.

Writes ``serve_load.json`` under ``--out`` after every level (a call cut short keeps what ended).
A dry run of the script on the CPU (tests/test_serve_device_script.py runs it):
    python scripts/gpu/serve.py --device cpu --out /tmp/o --set num_hidden_layers=2 \
        --set hidden_size=64 --set intermediate_size=128 --set vocab_size=256 ...
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STACK = ("fastapi", "uvicorn", "prometheus_client", "openai", "httpx")
LISTEN = re.compile(r"ollm serve: .* on (http://\S+)/v1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def ensure_stack(wheels: Path) -> dict:
    """Make the serving stack importable here and in the server: nothing when it already is,
    else the wheels of ``wheels`` installed into a temporary folder put first on the paths."""
    missing = [m for m in STACK if importlib.util.find_spec(m) is None]
    if not missing:
        return {"installed": False}
    whl = sorted(wheels.glob("*.whl"))
    if not whl:
        sys.exit(
            f"serve.py: {', '.join(missing)} not installed and no wheels in {wheels}: run "
            "scripts/fetch_serve_wheels.sh here and carry .whl/serve to the device"
        )
    target = Path(tempfile.mkdtemp(prefix="ollm-serve-wheels-"))
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
           "--disable-pip-version-check", "--target", str(target), *map(str, whl)]  # fmt: skip
    if subprocess.run(cmd).returncode != 0:  # no pip: a wheel is a zip of its installed files
        for w in whl:
            zipfile.ZipFile(w).extractall(target)
    tops = sorted(
        p.name.removesuffix(".py")
        for p in target.iterdir()
        if not p.name.endswith((".dist-info", ".data")) and p.name not in ("bin", "__pycache__")
    )
    shadowed = [t for t in tops if importlib.util.find_spec(t) is not None]
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(target), os.environ.get("PYTHONPATH")) if p
    )
    importlib.invalidate_caches()
    print(f"serve.py: {len(whl)} wheels installed into {target}; shadowing {shadowed or 'none'}")
    still = [m for m in STACK if importlib.util.find_spec(m) is None]
    if still:
        sys.exit(f"serve.py: still missing after installing the wheels: {', '.join(still)}")
    return {"installed": True, "wheels": [w.name for w in whl], "shadowed": shadowed}


def word_tokenizer(path: Path, vocab_size: int, words: list[str]) -> None:
    """A word-level tokenizer over all ``vocab_size`` ids: specials, ``words`` (the prompts'),
    then ``w<id>``; decoding joins words with spaces, so every id is a non-empty piece."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab += [w for w in dict.fromkeys(words) if w not in vocab]
    vocab = vocab[:vocab_size] + [f"w{i}" for i in range(len(vocab), vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", clean_up_tokenization_spaces=False,
    )  # fmt: skip
    fast.save_pretrained(path)


def prepare_model(a: argparse.Namespace, work: Path, words: list[str]) -> tuple[Path, str]:
    """The model directory to serve and its served name: ``--model``, else the synthetic store
    (with ``--set`` overrides: a smaller model of the same family) and its word tokenizer."""
    if a.model:
        return Path(a.model), Path(a.model).name
    from ollm.bench.models import synthetic_store
    from ollm.models.registry import STORE_FAMILIES
    from ollm.storage.synthetic import make_synthetic_store, preset_config

    if not a.overrides:
        store = synthetic_store(a.synthetic, work, progress=False, device=a.device)
    else:
        tag = "-".join(f"{k}{v}" for k, v in a.overrides.items())
        store = work / "synthetic" / f"{a.synthetic}-{tag}"
        make_synthetic_store(
            a.synthetic, store, progress=False, families=STORE_FAMILIES, **a.overrides
        )
    import torch

    torch.cuda.empty_cache()  # the store was drawn on the GPU: leave it to the server
    if not (store / "tokenizer.json").exists():
        word_tokenizer(store, preset_config(a.synthetic, **a.overrides).vocab_size, words)
    return store, a.synthetic


class ServerProcess:
    """``ollm serve`` in a subprocess on a free loopback port, its output in ``log``."""

    def __init__(self, cmd: list[str], log: Path, timeout: float) -> None:
        self.log_path = log
        self.log = open(log, "w")  # noqa: SIM115 (closed in stop)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (os.environ.get("PYTHONPATH"), str(ROOT / "src")) if p
        ))  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        try:
            self.url = self._wait_listening(timeout)
        except BaseException:
            self.stop(5)
            raise

    def _wait_listening(self, timeout: float) -> str:
        """The base URL once the server prints it and ``/health`` answers 200."""
        import httpx

        end = time.monotonic() + timeout
        url = None
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ollm serve exited {self.proc.returncode}:\n{self.tail()}")
            m = url or LISTEN.search(self.log_path.read_text(errors="replace"))
            url = url or (m.group(1) if m else None)
            if url:
                try:
                    if httpx.get(url + "/health", timeout=5).status_code == 200:
                        return url
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        raise RuntimeError(f"ollm serve not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace: float) -> int | None:
        """Ctrl-C (drain, then cancel), then SIGTERM, then SIGKILL; the exit code."""
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        self.log.close()
        return self.proc.poll()


def serve_command(a: argparse.Namespace, model: Path, name: str, work: Path) -> list[str]:
    """The ``ollm serve`` command line."""
    cmd = [sys.executable, "-c", "from ollm.cli import main; main()", "serve",
           "--model", str(model), "--served-model-name", name, "--host", "127.0.0.1",
           "--port", "0", "--device", a.device, "--max-batch", str(max(a.levels)),
           "--max-context", str(a.max_context), "--max-pending", "256", "--drain", "5",
           "--cache-dir", str(work / "cache")]  # fmt: skip
    if a.device.startswith("cuda"):
        cmd += ["--gpu-memory", a.budget]
    return cmd


def level_plan(a: argparse.Namespace, c: int, left: float, pass_s: float) -> tuple[int, str]:
    """Requests to send at concurrency ``c`` within ``left`` seconds, and a note if reduced."""
    want = a.requests or (max(2, c) if a.quick else max(4, 2 * c))
    # Rounds of a full batch, one weight pass per token (prefill included); a batch of 32 costs
    # more per pass than a single sequence, 1.5x as a margin.
    per_round = (a.max_tokens + 1) * pass_s * (1.5 if c >= 8 else 1.0)
    fits = int(left // per_round) * c if per_round > 0 else want
    if fits >= want:
        return want, ""
    if fits < c:
        return 0, f"skipped: one round of {c} (~{per_round:.0f} s) does not fit {left:.0f} s left"
    return fits, f"reduced from {want} to {fits} requests to fit {left:.0f} s left"


def run_levels(a: argparse.Namespace, url: str, name: str, report: dict, out: Path) -> None:
    """Warm-up, then every level; ``serve_load.json`` rewritten after each."""
    import serve_load

    ns = argparse.Namespace(
        url=url, model=name, api_key=None, prompt_words=a.prompt_words, max_tokens=a.max_tokens
    )
    warm = asyncio.run(_warmup(serve_load, url, name, a.max_tokens))
    report["warmup"] = warm
    pass_s = max(warm["gaps_p50_s"], 1e-3)
    print(f"warm-up: TTFT {warm['ttft'] * 1000:.0f} ms, inter-token {pass_s * 1000:.1f} ms")
    print(serve_load.HEADER, flush=True)
    for c in a.levels:
        left = a.deadline - (time.perf_counter() - report["t0"])
        n, note = level_plan(a, c, left, pass_s)
        if n == 0:
            report["levels"].append({"concurrency": c, "skipped": note})
            print(f"{c:>4}  {note}", flush=True)
            continue
        ns.requests = n
        # A level that hangs past the deadline (plus a minute) is cut, the server still stopped.
        cut = max(60.0, left + 60)
        try:
            row = asyncio.run(asyncio.wait_for(serve_load.run_level(ns, c), cut))
        except TimeoutError:
            report["levels"].append({"concurrency": c, "requests": n, "ok": False,
                                     "error": f"not done after {cut:.0f} s"})  # fmt: skip
            print(f"{c:>4}  not done after {cut:.0f} s: stopping", flush=True)
            break
        row["ok"] = not row["failed"] and not row["metrics_mismatch"]
        row["max_tokens"], row["note"] = a.max_tokens, note
        report["levels"].append(row)
        print(serve_load.summary_line(row) + (f"  ({note})" if note else ""), flush=True)
        if row["itl_ms"][50] > 0:
            pass_s = row["itl_ms"][50] / 1000
        write(out, report)


async def _warmup(serve_load, url: str, name: str, max_tokens: int) -> dict:
    """One request before the measured ones (kernels, allocator, first weight passes)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    try:
        r = await serve_load.one(client, name, serve_load.prompt(10_000, 16), min(max_tokens, 16))
    finally:
        await client.close()
    gaps = sorted(r.pop("gaps"))
    r["gaps_p50_s"] = gaps[len(gaps) // 2] if gaps else r["latency"]
    return r


def write(out: Path, report: dict) -> None:
    report["total_s"] = time.perf_counter() - report["t0"]
    rep = {k: v for k, v in report.items() if k != "t0"}
    (out / "serve_load.json").write_text(json.dumps(rep, indent=1, default=str))


def final_metrics(url: str) -> dict[str, float]:
    """ollm's own counters and the scheduler gauges at the end (`/metrics`)."""
    import serve_load

    m = serve_load.scrape(url, None)
    keep = ("ollm:", "vllm:num_", "vllm:request_success", "vllm:num_preemptions")
    return {k: v for k, v in m.items() if k.startswith(keep) and not k.endswith("_created")}


def run(a: argparse.Namespace) -> dict:
    """The whole benchmark; the report (also in ``--out``/serve_load.json)."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"t0": time.perf_counter(), "args": vars(a), "levels": []}
    report["stack"] = ensure_stack(ROOT / a.wheels)
    sys.path.insert(0, str(ROOT / "scripts"))
    import serve_load
    import torch

    words = ["Request", ":", *serve_load.WORDS, *map(str, range(1000))]
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model, name = prepare_model(a, work, words)
    report["model_s"], report["model"] = time.perf_counter() - t, str(model)
    report["device"] = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else a.device
    cmd = serve_command(a, model, name, work)
    report["command"] = cmd[3:]
    print("serve.py: ollm " + " ".join(cmd[3:]), flush=True)
    t = time.perf_counter()
    server = ServerProcess(cmd, out / "serve.log", a.start_timeout)
    report["server_start_s"] = time.perf_counter() - t
    try:
        report["server_banner"] = server.tail(40).splitlines()
        print("\n".join(report["server_banner"]), flush=True)
        run_levels(a, server.url, name, report, out)
        report["metrics_final"] = final_metrics(server.url)
    except BaseException as exc:
        report["error"] = repr(exc)
        raise
    finally:
        t = time.perf_counter()
        report["server_exit"] = server.stop(a.drain_wait)
        report["server_stop_s"] = time.perf_counter() - t
        # 130: the CLI's exit after Ctrl-C and its clean-up (drain, cancel, free the model).
        report["server_clean_exit"] = report["server_exit"] in (0, 130)
        ran = [r for r in report["levels"] if "skipped" not in r]
        report["ok"] = report["server_clean_exit"] and bool(ran) and all(r["ok"] for r in ran)
        write(out, report)
    return report


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="fewer requests, 32 new tokens")
    ap.add_argument("--device", default="cuda:0", help="cpu: a dry run (with --set)")
    ap.add_argument("--synthetic", default="llama3-8b", help="synthetic preset to serve")
    ap.add_argument("--model", default=None, help="serve this model directory instead")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field of the preset (e.g. num_hidden_layers=4)",
    )  # fmt: skip
    ap.add_argument("--budget", default="8GiB", help="--gpu-memory of the server")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=0, help="per level; 0: max(4, 2 c), quick c")
    ap.add_argument("--max-tokens", type=int, default=0, help="0: 64 (--quick: 32)")
    ap.add_argument("--prompt-words", type=int, default=16)
    ap.add_argument("--max-context", type=int, default=128, help="the server's, per sequence")
    ap.add_argument("--deadline", type=float, default=0, help="seconds; 0: 420 (--quick: 210)")
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--drain-wait", type=float, default=30)
    ap.add_argument("--wheels", default=".whl/serve")
    ap.add_argument("--workdir", default=os.environ.get("OLLM_WORKDIR", "/tmp/ollm-gpu"))
    a = ap.parse_args(argv)
    a.overrides = {k: _value(v) for k, _, v in (x.partition("=") for x in a.set)}
    a.levels = [int(x) for x in a.concurrency.split(",") if x.strip()]
    a.max_tokens = a.max_tokens or (32 if a.quick else 64)
    a.deadline = a.deadline or (210 if a.quick else 420)
    return a


def _value(text: str) -> object:
    """``--set`` values: JSON numbers and literals, else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    rep = run(a)
    print(f"serve.py: ok={rep['ok']} server exit {rep['server_exit']} in {rep['total_s']:.0f} s")
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
