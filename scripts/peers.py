"""Peers on the same workload as ``ollm bench``, each in its own process with a wall-time limit:

    PYTHONPATH=src python scripts/peers.py --synthetic llama3-8b --gpu-memory 8GiB \\
        --context 8k,32k --new-tokens 16 --out $OUT --budget-s 520

1. ``ollm bench`` with the same settings (a subprocess; its table is printed, its JSON kept), or
   the report given with ``--ollm-json``.
2. An HF checkpoint of the same shapes (``--synthetic``; random bf16, one shard per module) or
   ``--model HF_DIR``.
3. Peers, each printed as a ratio to ollm (peer time / ollm time; decode = median step), each
   with the same warm-up as ollm (one untimed generate at the full prompt length):
   llama.cpp (``llama-bench`` with partial offload, ``-ngl`` fitted to the same GPU budget, on a
   random F16 GGUF of the same shapes; run before the HF checkpoint is written, its GGUF deleted
   after, so the two never share the disk), accelerate-cpu / accelerate-disk (transformers
   ``device_map="auto"`` + ``max_memory``, CPU offload / disk offload via ``offload_folder``),
   ollm-upstream (oLLM 1.0.3 from PyPI with transformers 4.57 in its own ``--target`` folder,
   first on its PYTHONPATH), airllm. A peer that cannot run is listed with the reason. llama.cpp
   figures measured on another machine are printed below as reference lines, without ratios.

llama.cpp's prebuilt tools (``/work/shared/tools/llamacpp`` on the build host) are copied into the
git-ignored ``.peers/llamacpp`` (``--llamacpp``) and carried to the device machine.

Peer wheels never become project dependencies: ``scripts/fetch_peer_wheels.sh`` downloads them to
``.whl/peers/<peer>/`` and this script installs them with ``pip install --no-index --no-deps
--target /tmp/peer-<peer>`` at run time. ``--dry-run`` lists every peer's status without running.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from ollm.bench import llamacpp  # noqa: E402
from ollm.bench.peers import LLAMA_CPP, add_ratios, parse_events, print_table, summarize_ollm  # noqa: E402
from ollm.bench.run import disk_bytes, parse_contexts  # noqa: E402
from ollm.errors import OllmError  # noqa: E402
from ollm.sizes import parse_size  # noqa: E402

WORKER = ROOT / "src" / "ollm" / "bench" / "peer_worker.py"
RUN_PEERS = ("accelerate-cpu", "accelerate-disk", "ollm-upstream", "airllm")
PEERS = ("llama.cpp", *RUN_PEERS)
WHEELS = {"ollm-upstream": "ollm", "airllm": "airllm"}  # peer -> .whl/peers/<dir>
OLLM_FAMILIES = ("llama", "gemma3_text")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", help="preset name (llama3-8b, ...)")
    src.add_argument("--model", help="HF checkpoint directory (safetensors)")
    ap.add_argument("--gpu-memory", default="8GiB")
    ap.add_argument("--context", default="8k")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--ollm-json", help="an existing `ollm bench --output` report")
    ap.add_argument("--skip-ollm", action="store_true", help="no ollm run (no ratios)")
    ap.add_argument("--plot", help="passed to ollm bench --plot")
    ap.add_argument("--time-limit", type=float, default=150, help="most seconds per peer")
    ap.add_argument(
        "--budget-s", type=float, default=0, help="wall seconds for everything (0=none)"
    )
    ap.add_argument("--workdir", default="/tmp/ollm-peers")
    ap.add_argument("--wheels", default=str(ROOT / ".whl" / "peers"))
    ap.add_argument("--llamacpp", default=str(ROOT / ".peers" / "llamacpp"), help="tools folder")
    ap.add_argument("--out", help="directory for bench.json, peers.json and peer logs")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    return ap.parse_args(argv)


# -- checks ---------------------------------------------------------------------------------------
def model_info(args: argparse.Namespace) -> dict:
    """model_type and vocab of the workload, without writing anything."""
    if args.synthetic:
        from ollm.storage.synthetic import preset_config

        cfg = preset_config(args.synthetic)
        return {"model_type": cfg.model_type, "vocab": cfg.vocab_size}
    path = Path(args.model)
    if not (path / "config.json").is_file():
        return {"error": f"{path} is not an HF checkpoint (no config.json); peers need one"}
    cfg = json.loads((path / "config.json").read_text())
    vocab = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
    return {"model_type": cfg.get("model_type"), "vocab": vocab}


def precheck(peer: str, args: argparse.Namespace, info: dict) -> tuple[str, str]:
    """(status, reason) of a peer before running anything."""
    if peer == "llama.cpp":
        why = llamacpp.precheck(Path(args.llamacpp), args.synthetic)
        if not why and args.device == "cpu":
            why = "the prebuilt llama-bench is the CUDA build; this run is on the CPU"
        return ("cannot run", why) if why else ("would run", "")
    reasons = []
    if info.get("error"):
        reasons.append(info["error"])
    if args.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            reasons.append("no CUDA GPU on this machine")
    for mod in ("transformers", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            reasons.append(f"{mod} is not installed")
    if peer in WHEELS:
        whls = glob.glob(str(Path(args.wheels) / WHEELS[peer] / "*.whl"))
        found = peer == "airllm" and importlib.util.find_spec("airllm") is not None
        if not whls and not found:
            reasons.append(
                f"no wheels in {Path(args.wheels) / WHEELS[peer]} (run scripts/fetch_peer_wheels.sh "
                "where PyPI is reachable, then carry .whl/peers)"
            )
    if peer == "ollm-upstream" and info.get("model_type") not in (None, *OLLM_FAMILIES):
        reasons.append(f"upstream oLLM 1.0.3 has no loader for {info.get('model_type')}")
    return ("cannot run", "; ".join(reasons)) if reasons else ("would run", "")


# -- installing and running -----------------------------------------------------------------------
def install(peer: str, args: argparse.Namespace) -> tuple[str | None, str]:
    """Install a peer's wheels into /tmp/peer-<name>; returns (target or None, error)."""
    name = WHEELS[peer]
    whls = sorted(glob.glob(str(Path(args.wheels) / name / "*.whl")))
    if not whls:
        return None, ""  # airllm installed in this environment
    target = Path(f"/tmp/peer-{name}")
    stamp = target / ".ollm-peer-wheels"
    names = "\n".join(Path(w).name for w in whls)
    if stamp.is_file() and stamp.read_text() == names:
        return str(target), ""
    shutil.rmtree(target, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet"]
    r = subprocess.run([*cmd, "--target", str(target), *whls], capture_output=True, text=True)
    if r.returncode != 0:
        if "No module named pip" not in r.stderr:
            return None, "pip install failed: " + " ".join(r.stderr.split())[-400:]
        for w in whls:  # no pip here: a wheel is a zip laid out for site-packages
            with zipfile.ZipFile(w) as z:
                z.extractall(target)
    stamp.write_text(names)
    return str(target), ""


def run_peer(peer: str, args: argparse.Namespace, hf_dir: Path, info: dict, limit: float) -> dict:
    res: dict = {"peer": peer, "time_limit_s": round(limit, 1), "cases": []}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    if peer in WHEELS:
        target, err = install(peer, args)
        if err:
            return {**res, "status": "cannot run", "reason": err}
        if target:
            env["PYTHONPATH"] = target
    work = Path(args.workdir) / peer
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    deadline = time.time() + limit - max(5.0, 0.05 * limit)  # the worker stops generating here
    cmd = [sys.executable, "-P", str(WORKER), "--peer", peer, "--model", str(hf_dir)]
    cmd += ["--contexts", ",".join(map(str, args.contexts)), "--new-tokens", str(args.new_tokens)]
    cmd += ["--gpu-memory", str(parse_size(args.gpu_memory)), "--vocab", str(info["vocab"])]
    cmd += ["--device", args.device, "--workdir", str(work), "--deadline", str(deadline)]
    log = Path(args.out or args.workdir) / f"peer-{peer}.log"
    split = hf_dir / "splitted_model"  # AirLLM's per-layer split (links to the shards)
    split_existed = split.exists()
    t = time.perf_counter()
    killed = False
    with open(log, "w") as f:
        p = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            p.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            killed = True
            os.killpg(p.pid, signal.SIGKILL)  # the worker's own process group
            p.wait()
    res.update(wall_s=round(time.perf_counter() - t, 1), exit_code=p.returncode, log=str(log))
    res.update(parse_events(log.read_text(errors="replace"), args.contexts, killed))
    shutil.rmtree(work, ignore_errors=True)  # offload folders, KV files
    if not split_existed:
        shutil.rmtree(split, ignore_errors=True)
    return res


# Share of --budget-s by the work a peer does: llama.cpp writes its GGUF and runs llama-bench twice
# (prefill; decode after an untimed prefill of the same depth), about four Python peers' work.
SHARE = {"llama.cpp": 4.0}


def peer_limit(args: argparse.Namespace, t_start: float, left: list[str]) -> float:
    """Seconds for the next peer (``left[0]``): ``--time-limit``, or its share of what
    ``--budget-s`` leaves to the peers not yet run (``left``, the next one first)."""
    limit = args.time_limit
    if args.budget_s and left:
        remaining = args.budget_s - (time.time() - t_start) - 10
        weights = [SHARE.get(p, 1.0) for p in left]
        limit = min(limit, remaining * weights[0] / sum(weights))
    return limit


def run_ollm(args: argparse.Namespace, out: Path) -> dict | None:
    if args.ollm_json:
        return json.loads(Path(args.ollm_json).read_text())
    if args.skip_ollm:
        return None
    path = out / "bench.json"
    src = ["--synthetic", args.synthetic] if args.synthetic else ["--model", args.model]
    cli = "from ollm.cli import main; main()"
    cmd = [sys.executable, "-c", cli, "bench", *src, "--context", args.context]
    cmd += ["--new-tokens", str(args.new_tokens), "--output", str(path)]
    cmd += ["--device", args.device] + (
        ["--gpu-memory", args.gpu_memory] if args.device != "cpu" else []
    )
    cmd += ["--plot", args.plot] if args.plot else []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])
        ),
    }
    print("$", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, env=env)
    if r.returncode != 0 or not path.is_file():
        print(f"ollm bench failed (exit {r.returncode}); peers run without ratios", flush=True)
        return None
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    args.contexts = parse_contexts(args.context)
    wanted = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PEERS]
    if unknown:
        sys.exit(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(PEERS)}")
    info = model_info(args)
    checks = {p: precheck(p, args, info) for p in wanted}
    workload = {
        "model": args.synthetic or args.model,
        "gpu_memory": args.gpu_memory,
        "contexts": args.contexts,
        "new_tokens": args.new_tokens,
        **info,
    }
    if args.dry_run:
        rows = [{"peer": p, "status": s, "reason": r} for p, (s, r) in checks.items()]
        result = {"dry_run": True, "workload": workload, "peers": rows}
        if args.json:
            print(json.dumps(result))
        else:
            for r in rows:
                print(f"{r['peer']:16s} {r['status']:16s} {r['reason']}")
        return 0
    out = Path(args.out or args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    ollm = run_ollm(args, out)
    peers: list[dict] = []
    if "llama.cpp" in wanted and checks["llama.cpp"][0] == "would run":
        left = [p for p in wanted if checks[p][0] == "would run"]  # llama.cpp first
        limit = peer_limit(args, t_start, left)
        print(f"peer llama.cpp: up to {limit:.0f} s", flush=True)
        peers.append(
            llamacpp.run_llamacpp(
                Path(args.llamacpp),
                args.synthetic,
                args.contexts,
                args.new_tokens,
                parse_size(args.gpu_memory),
                Path(args.workdir) / "llama.cpp",
                limit,
                out / "peer-llama.cpp.log",
            )
        )
        print(f"peer llama.cpp: {peers[-1]['status']} {peers[-1].get('reason', '')}", flush=True)
    hf_dir = Path(args.model) if args.model else Path(args.workdir) / f"hf-{args.synthetic}"
    runnable = [p for p in wanted if checks[p][0] == "would run" and p != "llama.cpp"]
    if runnable and args.synthetic:
        from ollm.bench.models import write_hf_checkpoint

        t = time.perf_counter()
        try:
            write_hf_checkpoint(args.synthetic, hf_dir)
        except (OllmError, OSError) as exc:
            why = f"writing the HF checkpoint failed: {' '.join(str(exc).split())}"
            checks.update({p: ("cannot run", why) for p in runnable})
            runnable = []
        workload["hf_checkpoint_s"] = round(time.perf_counter() - t, 1)
        print(f"HF checkpoint {hf_dir} ({workload['hf_checkpoint_s']} s)", flush=True)
    if runnable:
        workload["hf_checkpoint_bytes"] = disk_bytes(hf_dir)
    for p in wanted:
        status, reason = checks[p]
        if p == "llama.cpp" and status == "would run":
            continue  # ran above
        if status != "would run":
            peers.append({"peer": p, "status": status, "reason": reason, "cases": []})
            continue
        limit = peer_limit(
            args, t_start, [q for q in runnable if q not in {r["peer"] for r in peers}]
        )
        if limit < 30:
            peers.append(
                {
                    "peer": p,
                    "status": "not run",
                    "reason": "no time left in --budget-s",
                    "cases": [],
                }
            )
            continue
        print(f"peer {p}: up to {limit:.0f} s", flush=True)
        peers.append(run_peer(p, args, hf_dir, info, limit))
        print(f"peer {p}: {peers[-1]['status']} {peers[-1].get('reason', '')}", flush=True)
    order = {p: k for k, p in enumerate(wanted)}
    peers.sort(key=lambda r: order[r["peer"]])
    result = {"workload": workload, "ollm": summarize_ollm(ollm), "peers": peers}
    add_ratios(peers, result["ollm"])
    result["reference"] = LLAMA_CPP
    (out / "peers.json").write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
