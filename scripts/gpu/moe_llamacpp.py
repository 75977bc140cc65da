"""llama.cpp with its experts on the CPU (``-ot exps=CPU``, like ``--cpu-moe``) on the same
Qwen3-30B-A3B shapes as ``scripts/gpu/moe.py``'s benchmark, in the same call (issue 19).

The tools folder (``OLLM_LLAMACPP``, default ``.peers/llamacpp``: a copy of
``../shared/tools/llamacpp``, git-ignored, named in the device call's ``carry``) gives the
prebuilt ``llama-bench`` and llama.cpp's ``gguf-py``. ``write_gguf`` writes a random F16 GGUF of
architecture ``qwen3moe`` with ``layers`` layers of the real per-layer shapes (the same bytes
per weight as ollm's bf16 store); ``run`` times decode of ``new`` tokens at depth ``context``
and a prefill of ``context`` tokens, every layer on the GPU (``-ngl 99``) except the experts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

# Qwen3-30B-A3B (config.json of the release)
SHAPES = dict(H=2048, I=6144, IE=768, E=128, K=8, V=151936, nh=32, nkv=4, hd=128)
TINY = dict(H=128, I=256, IE=64, E=8, K=2, V=512, nh=4, nkv=2, hd=32)


def tools_dir() -> Path | None:
    """The llama.cpp tools folder, or None when it is not there."""
    p = Path(os.environ.get("OLLM_LLAMACPP", ".peers/llamacpp"))
    ok = (p / "bin" / "lcbin.tar.xz").is_file() and (p / "src" / "gguf-py").is_dir()
    return p if ok else None


def _specs(c: dict, layers: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, torch-order shape, init) of every tensor: "rand" N(0, 0.02) or "ones"."""
    H, IE, E, V, nh, nkv, hd = (c[k] for k in ("H", "IE", "E", "V", "nh", "nkv", "hd"))
    specs = [("token_embd.weight", (V, H), "rand")]
    for i in range(layers):
        b = f"blk.{i}."
        specs += [
            (b + "attn_norm.weight", (H,), "ones"),
            (b + "attn_q.weight", (nh * hd, H), "rand"),
            (b + "attn_k.weight", (nkv * hd, H), "rand"),
            (b + "attn_v.weight", (nkv * hd, H), "rand"),
            (b + "attn_output.weight", (H, nh * hd), "rand"),
            (b + "attn_q_norm.weight", (hd,), "ones"),
            (b + "attn_k_norm.weight", (hd,), "ones"),
            (b + "ffn_norm.weight", (H,), "ones"),
            (b + "ffn_gate_inp.weight", (E, H), "rand"),
            (b + "ffn_gate_exps.weight", (E, IE, H), "rand"),
            (b + "ffn_up_exps.weight", (E, IE, H), "rand"),
            (b + "ffn_down_exps.weight", (E, H, IE), "rand"),
        ]
    return specs + [("output_norm.weight", (H,), "ones"), ("output.weight", (V, H), "rand")]


def write_gguf(tools: Path, out: Path, layers: int, tiny: bool = False) -> float:
    """Write the F16 qwen3moe GGUF (norms F32); returns seconds."""
    import numpy as np

    sys.path.insert(0, str(tools / "src" / "gguf-py"))
    import gguf

    c = TINY if tiny else SHAPES
    t0 = time.perf_counter()
    w = gguf.GGUFWriter(str(out), "qwen3moe")
    w.add_name("random-qwen3-30b-a3b-shapes")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(40960)
    w.add_embedding_length(c["H"])
    w.add_block_count(layers)
    w.add_feed_forward_length(c["I"])
    w.add_expert_feed_forward_length(c["IE"])
    w.add_expert_count(c["E"])
    w.add_expert_used_count(c["K"])
    w.add_head_count(c["nh"])
    w.add_head_count_kv(c["nkv"])
    w.add_key_length(c["hd"])
    w.add_value_length(c["hd"])
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(c["V"])
    w.add_tokenizer_model("none")
    specs = _specs(c, layers)
    for name, shape, kind in specs:
        n = int(np.prod(shape))
        dt, size = (np.float16, 2) if kind == "rand" else (np.float32, 4)
        w.add_tensor_info(name, shape, np.dtype(dt), n * size)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(dev).manual_seed(1234)
    for _, shape, kind in specs:
        if kind == "ones":
            arr = np.ones(shape, dtype=np.float32)
        else:
            t = torch.randn(shape, generator=g, device=dev).mul_(0.02)
            arr = t.to(torch.float16).cpu().numpy()
        w.write_tensor_data(arr)
    w.close()
    return time.perf_counter() - t0


def run(tools: Path, tmp: Path, layers: int, context: int, new: int) -> dict:
    """llama-bench with experts on the CPU: decode tok/s at depth ``context`` and prefill."""
    from ollm.bench.llamacpp import case_from_records, parse_jsonl, unpack

    gguf_path = tmp / "qwen3moe-f16.gguf"
    out: dict = {"peer": "llama.cpp -ngl 99 -ot exps=CPU", "layers": layers}
    out["gguf_s"] = write_gguf(tools, gguf_path, layers)
    binary, env = unpack(tools, tmp / "lc")
    base = [str(binary), "-m", str(gguf_path), "-fa", "1", "-ngl", "99", "-ot", "exps=CPU"]
    base += ["-r", "1", "-o", "jsonl"]
    records = []
    for args in (["-p", "0", "-n", str(new), "-d", str(context)], ["-p", str(context), "-n", "0"]):
        try:
            p = subprocess.run([*base, *args], env=env, capture_output=True, text=True, timeout=240)
        except subprocess.TimeoutExpired:
            out.setdefault("errors", []).append(f"timeout: {' '.join(args)}")
            continue
        records += parse_jsonl(p.stdout)
        if p.returncode:
            out.setdefault("errors", []).append(p.stderr[-2000:])
    out |= case_from_records(records, context, new)
    gguf_path.unlink(missing_ok=True)
    return out


def bench_row(tmp: Path, layers: int, full: int, ctx: int, new: int) -> dict | str:
    """llama.cpp with its experts on the CPU, same shapes and layers as ``moe.py``'s bench, its
    decode projected to ``full`` layers; a string when skipped or failed (ours still count)."""
    import json
    import traceback

    tools = tools_dir()
    if tools is None:
        return "skipped: copy ../shared/tools/llamacpp to .peers/llamacpp and carry it"
    try:
        r = run(tools, tmp, layers, ctx, new)
    except Exception:  # noqa: BLE001 - the peer's failure is reported, ours still count
        return "failed: " + traceback.format_exc()[-2000:]
    if r.get("decode_tok_s"):
        r["projected_decode_tok_s_full_model"] = r["decode_tok_s"] * layers / full
    print(json.dumps(r, default=str), flush=True)
    return r
