"""llama.cpp as a peer, run on the same machine and workload as ``ollm bench``.

The tools folder (``--llamacpp``, default ``.peers/llamacpp``: a copy of the prebuilt tools, see
``scripts/peers.py``) holds ``bin/lcbin.tar.xz`` (``llama-bench`` built for CUDA sm_90 with AVX2
and AVX-512 CPU backends), ``make_gguf.py`` (random-weight GGUF with Llama-3.1-8B shapes) and
``src/gguf-py`` (llama.cpp's GGUF writer). The run:

1. writes the GGUF (F16: the same bytes per weight as our bf16 store),
2. picks ``-ngl`` so that the GPU layers, their KV and llama.cpp's buffers fit the same GPU budget
   (``choose_ngl``; llama.cpp keeps the other layers in RAM and computes them on the CPU),
3. runs ``llama-bench`` twice with flash attention: prefill of the prompt (``-p N``) and decode of
   ``new_tokens`` at the prompt's depth (``-n T -d N``), with llama-bench's own warm-up (an
   untimed pass of the full prompt, one generated token), the same warm-up ``ollm bench`` and
   the Python peers get,
4. turns its JSON lines into a case like the other peers' (``case_from_records``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

from ollm.bench.run import context_label

__all__ = [
    "GPU_RESERVE_BYTES",
    "SUPPORTED_PRESETS",
    "choose_ngl",
    "bench_commands",
    "parse_jsonl",
    "case_from_records",
    "run_llamacpp",
]

GiB = 1 << 30
# CUDA context plus llama.cpp's CUDA compute buffers at the default -ub 512 with a 128k vocab:
# on the H200, -ngl 14 of Llama-3.1-8B (5.7 GiB of layers, 0.47 GiB of KV) peaked at 7.8 GiB.
GPU_RESERVE_BYTES = int(1.5 * GiB)
SUPPORTED_PRESETS = ("llama3-8b",)  # the shapes make_gguf.py writes
_AVX512 = (
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512vbmi",
    "avx512_vnni",
    "avx512_bf16",
)


def choose_ngl(
    layer_bytes: int,
    kv_layer_bytes: int,
    num_layers: int,
    head_bytes: int,
    budget: int,
    reserve: int = GPU_RESERVE_BYTES,
) -> int:
    """``-ngl`` whose GPU share fits ``budget``: each GPU layer brings its weights and its KV
    (``kv_layer_bytes`` for the whole context); llama.cpp moves the output head to the GPU only
    when ``-ngl`` exceeds the layer count."""
    room = budget - reserve
    per_layer = layer_bytes + kv_layer_bytes
    n = max(0, min(num_layers, room // per_layer))
    if n == num_layers and room >= n * per_layer + head_bytes:
        return num_layers + 1
    return int(n)


def bench_commands(
    binary: str | Path, gguf: str | Path, ngl: int, context: int, new_tokens: int
) -> dict[str, list[str]]:
    """The two ``llama-bench`` runs: ``prefill`` (``context`` tokens) and ``decode``
    (``new_tokens`` at depth ``context``; the depth pass itself is untimed)."""
    base = [str(binary), "-m", str(gguf), "-fa", "1", "-ngl", str(ngl), "-r", "1", "-o", "jsonl"]
    return {
        "prefill": [*base, "-p", str(context), "-n", "0"],
        "decode": [*base, "-p", "0", "-n", str(new_tokens), "-d", str(context)],
    }


def parse_jsonl(text: str) -> list[dict]:
    """The result records of ``llama-bench -o jsonl`` (other lines are ignored)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "avg_ns" in rec:
                out.append(rec)
    return out


def case_from_records(records: list[dict], context: int, new_tokens: int) -> dict:
    """A peer case (the fields ``peers.parse_events`` gives) from llama-bench's records."""
    case: dict = {"context": context, "status": "ok", "generated_tokens": 0}
    pre = [r for r in records if r.get("n_prompt") == context and not r.get("n_gen")]
    dec = [r for r in records if r.get("n_gen") and r.get("n_depth") == context]
    if pre:
        secs = pre[0]["avg_ns"] / 1e9
        case.update(prefill_s=secs, prefill_tok_s=context / secs)
    if dec:
        n = dec[0]["n_gen"]
        step = dec[0]["avg_ns"] / 1e9 / n  # llama-bench times the n steps together
        case.update(decode_step_median_s=step, decode_tok_s=1 / step, generated_tokens=n)
    if records:
        r = records[0]
        case["ngl"] = r.get("n_gpu_layers")
        case["model_bytes"] = r.get("model_size")
        case["build"] = r.get("build_commit")
    if not pre or not dec or (dec and dec[0]["n_gen"] != new_tokens):
        case["status"] = "partial"
    return case


def _cpu_variant() -> str:
    """The CPU backend this processor can run (both are built from the same source)."""
    try:
        flags = next(
            (
                ln.split()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("flags")
            ),
            [],
        )
    except OSError:
        return "avx2"
    return "avx512" if all(f in flags for f in _AVX512) else "avx2"


def _cublas_dir() -> str | None:
    """torch's CUDA 13 cuBLAS (the prebuilt CUDA backend links libcublas.so.13)."""
    import glob
    import site

    roots = [*site.getsitepackages(), *[p for p in sys.path if p.endswith("-packages")]]
    try:
        import torch  # its wheels' nvidia/ folder sits beside it

        roots.insert(0, str(Path(torch.__file__).parents[1]))
    except ImportError:
        pass
    for root in roots:
        for pat in ("nvidia/cu13/lib/libcublas.so.13", "nvidia/cublas/lib/libcublas.so*"):
            hits = glob.glob(os.path.join(root, pat))
            if hits:
                return os.path.dirname(hits[0])
    return None


def unpack(tools: Path, dest: Path) -> tuple[Path, dict[str, str]]:
    """Unpack the binaries once; returns ``llama-bench`` and the environment it needs."""
    bindir = dest / "lcbin"
    if not (bindir / "llama-bench").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        with tarfile.open(tools / "bin" / "lcbin.tar.xz") as tar:
            tar.extractall(dest, filter="data")
    libs = dest / "cpu"
    shutil.rmtree(libs, ignore_errors=True)
    shutil.copytree(bindir / f"cpu-{_cpu_variant()}", libs)
    # the system's libgomp wins when present: the bundled one is only a fallback
    paths = [str(libs), str(bindir), _cublas_dir(), "/usr/local/cuda/lib64"]
    paths += [os.environ.get("LD_LIBRARY_PATH"), str(bindir / "gomp")]
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(p for p in paths if p)}
    return bindir / "llama-bench", env


class GpuMemoryPeak:
    """Peak used memory of GPU 0 from ``nvidia-smi`` every 250 ms (whole device, so it is read
    while llama.cpp is the only process on it)."""

    def __init__(self) -> None:
        self.peak = 0
        self._proc = None
        if shutil.which("nvidia-smi"):
            cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
            self._proc = subprocess.Popen(
                [*cmd, "-i", "0", "-lms", "250"], stdout=subprocess.PIPE, text=True
            )
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._proc.stdout:  # type: ignore[union-attr]
            if line.strip().isdigit():
                self.peak = max(self.peak, int(line) << 20)  # MiB

    def stop(self) -> int:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
        return self.peak


def write_gguf(tools: Path, out: Path, log) -> float:
    """Write the random F16 GGUF with make_gguf.py; returns seconds."""
    env = {**os.environ, "PYTHONPATH": str(tools / "src" / "gguf-py")}
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, str(tools / "make_gguf.py"), str(out), "--dtype", "f16"],
        env=env, stdout=log, stderr=subprocess.STDOUT, check=True,
    )  # fmt: skip
    return time.perf_counter() - t


def precheck(tools: Path, preset: str | None) -> str:
    """Why llama.cpp cannot run here ('' when it can)."""
    if preset not in SUPPORTED_PRESETS:
        return f"the GGUF writer has only {', '.join(SUPPORTED_PRESETS)} shapes (--synthetic)"
    if not (tools / "bin" / "lcbin.tar.xz").is_file() or not (tools / "make_gguf.py").is_file():
        return (
            f"no llama.cpp tools in {tools} (copy the prebuilt folder there, git-ignored, and "
            "carry it)"
        )
    if not shutil.which("nvidia-smi"):
        return "the prebuilt llama-bench needs an NVIDIA GPU (CUDA sm_90)"
    return ""


def _shapes(preset: str, context: int) -> dict[str, int]:
    """F16 bytes of one layer, of one layer's KV for ``context`` positions, and of the head."""
    from ollm.models.registry import build_spec
    from ollm.storage.synthetic import preset_config

    spec = build_spec(preset_config(preset))
    return {
        "layer_bytes": 2 * spec.layer_param_count(),
        "kv_layer_bytes": 2 * 2 * spec.num_kv_heads * spec.head_dim * context,
        "num_layers": spec.num_layers,
        "head_bytes": 2 * spec.vocab_size * spec.hidden_size,
    }


def run_llamacpp(
    tools: Path,
    preset: str,
    contexts: list[int],
    new_tokens: int,
    budget: int,
    workdir: Path,
    limit_s: float,
    log_path: Path,
) -> dict:
    """Write the GGUF, run both llama-bench passes per context within ``limit_s`` and return the
    peer's result (one case per context; the GGUF is deleted afterwards to free the disk)."""
    res: dict = {"peer": "llama.cpp", "time_limit_s": round(limit_s, 1), "cases": []}
    workdir.mkdir(parents=True, exist_ok=True)
    gguf = workdir / f"{preset}-f16.gguf"
    t0 = time.perf_counter()
    errors: list[str] = []
    with open(log_path, "w") as log:
        try:
            binary, env = unpack(tools, workdir / "bin")
            res["gguf_s"] = round(write_gguf(tools, gguf, log), 1)
            for ctx in contexts:
                left = limit_s - (time.perf_counter() - t0)
                case = _run_context(binary, env, gguf, preset, ctx, new_tokens, budget, left, log)
                errors += [f"{context_label(ctx)} {e}" for e in case.pop("errors")]
                res["cases"].append(case)
        except (OSError, subprocess.CalledProcessError, tarfile.TarError) as exc:
            errors.append(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        finally:
            gguf.unlink(missing_ok=True)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    ok = [c for c in res["cases"] if c["status"] == "ok"]
    if len(ok) == len(contexts):
        res["status"] = "ran"
    else:
        res["status"] = (
            "partial"
            if any(c.get("generated_tokens") or c.get("prefill_s") for c in res["cases"])
            else "failed"
        )
    res["reason"] = "; ".join(errors)
    res["log"] = str(log_path)
    return res


def _run_context(binary, env, gguf, preset, ctx, new_tokens, budget, left, log) -> dict:
    """Both llama-bench passes of one context; its case, with ``errors``."""
    shapes = _shapes(preset, ctx + new_tokens)  # llama-bench's n_ctx: prompt + depth + gen
    ngl = choose_ngl(**shapes, budget=budget)
    t0 = time.perf_counter()
    records: list[dict] = []
    errors: list[str] = []
    peak = 0
    for name, cmd in bench_commands(binary, gguf, ngl, ctx, new_tokens).items():
        remaining = left - (time.perf_counter() - t0)
        if remaining < 10:
            errors.append(f"{name}: no time left")
            continue
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        watch = GpuMemoryPeak()
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=remaining)
        except subprocess.TimeoutExpired:
            errors.append(f"{name}: killed at its time limit")
            continue
        finally:
            peak = max(peak, watch.stop())
        log.write(r.stdout + r.stderr)
        log.flush()
        records += parse_jsonl(r.stdout)
        if r.returncode != 0:
            errors.append(f"{name}: exit {r.returncode}: {' '.join(r.stderr.split())[-300:]}")
    case = case_from_records(records, ctx, new_tokens)
    case.update(ngl=ngl, peak_gpu_bytes=peak or None, errors=errors)
    # ollm and the Python peers report torch's reserved bytes, which leave out the CUDA context
    case["peak_gpu_source"] = "nvidia-smi: whole GPU, CUDA context included"
    return case
