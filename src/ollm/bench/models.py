"""Benchmark models: cached random-weight layer stores of real architectures (``--synthetic``) and
the same shapes as an HF checkpoint for the peers (transformers, upstream oLLM, AirLLM)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ollm.errors import OllmError

__all__ = [
    "synthetic_store",
    "synthetic_nbytes",
    "check_synthetic",
    "write_hf_checkpoint",
    "write_tokenizer",
]

# HF causal-LM class of each preset family (config.json "architectures", read by the peers).
_ARCHS = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}


def synthetic_nbytes(name: str, **overrides: object) -> int:
    """Bytes of bf16 weights of preset ``name`` (every layer, embeddings and untied head)."""
    from ollm.models.registry import build_spec
    from ollm.storage.synthetic import preset_config

    spec = build_spec(preset_config(name, **overrides))
    tables = 1 if spec.tie_word_embeddings else 2
    params = (
        spec.layer_param_count() * spec.num_layers + tables * spec.vocab_size * spec.hidden_size
    )
    return 2 * params


def _check_space(where: Path, need: int, what: str) -> None:
    from ollm.sizes import format_size

    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    if free < need:
        raise OllmError(
            f"not enough free disk space in {where} for {what}: about {format_size(need)} is "
            f"needed, {format_size(free)} is free"
        )


def write_rate(where: Path, sample_elems: int = 1 << 22) -> tuple[float, str]:
    """Weights per second the synthetic writer reaches here, timed now on a sample through the
    same steps (random normals made where ``SyntheticSource`` makes them, bf16 on the CPU, the
    store's crc32, a file written and synced in ``where``), and the generating device. Python
    and the converter's bookkeeping come on top, so a time from it is a lower bound."""
    import os
    import tempfile
    import time
    import zlib

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device).manual_seed(0)
    where.mkdir(parents=True, exist_ok=True)

    def once() -> None:
        t = torch.randn(sample_elems, generator=g, device=device).mul_(0.02)
        data = memoryview(t.to(torch.bfloat16).cpu().view(torch.uint8).numpy())
        zlib.crc32(data)
        with tempfile.NamedTemporaryFile(dir=where) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    once()  # first-call setup
    t = time.perf_counter()
    once()
    return sample_elems / max(time.perf_counter() - t, 1e-9), device


def check_synthetic(
    name: str, dst_parent: Path, device: str | None, offload: str | None
) -> list[str]:
    """Before writing preset ``name``: one-line ``OllmError`` when it cannot fit the free disk, or
    the RAM when ``offload="cpu"`` keeps every streamed layer in RAM on the CPU device; warnings
    (returned and logged) when it is larger than the available RAM or slow to write here."""
    import logging

    import psutil

    from ollm.sizes import format_size

    nbytes = synthetic_nbytes(name)
    _check_space(dst_parent, int(nbytes * 1.02) + (64 << 20), f"synthetic {name}")
    ram = psutil.virtual_memory().available
    if (device or "cpu") == "cpu" and offload == "cpu" and nbytes > ram:
        raise OllmError(
            f"synthetic {name} ({format_size(nbytes)}) does not fit the {format_size(ram)} of "
            "available RAM with --offload cpu on the CPU; use --offload disk or a smaller preset"
        )
    rate, gen_device = write_rate(dst_parent)
    seconds = nbytes / 2 / rate
    warnings = []
    if seconds > 60:
        warnings.append(
            f"synthetic {name}: writing {format_size(nbytes)} of random weights takes at least "
            f"{seconds / 60:.0f} min on this {gen_device.upper()} (once; cached afterwards)"
        )
    if nbytes > ram:
        warnings.append(
            f"synthetic {name} ({format_size(nbytes)}) is larger than the available RAM "
            f"({format_size(ram)}): layers that do not fit are read from disk on every pass"
        )
    for w in warnings:
        logging.getLogger(__name__).warning(w)
    return warnings


def synthetic_store(
    name: str,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    device: str | None = None,
    offload: str | None = None,
) -> Path:
    """The layer store of synthetic preset ``name`` under ``<cache>/synthetic/<name>``, written
    now (with a progress bar) when missing, after ``check_synthetic`` (disk and RAM refusals,
    size and time warnings) for the ``device`` and ``offload`` the benchmark will use."""
    from ollm.models.registry import STORE_FAMILIES
    from ollm.storage.convert import default_cache_dir
    from ollm.storage.store import is_store
    from ollm.storage.synthetic import PRESETS, make_synthetic_store

    if name not in PRESETS:
        raise OllmError(f"unknown synthetic model {name!r}; available: {', '.join(PRESETS)}")
    dst = Path(cache_dir or default_cache_dir()) / "synthetic" / name
    if is_store(dst):
        return dst
    check_synthetic(name, dst.parent, device, offload)
    return make_synthetic_store(name, dst, progress=progress, families=STORE_FAMILIES)


def write_tokenizer(path: str | Path, vocab_size: int = 256) -> None:
    """A small word-level tokenizer (``tokenizer.json`` + config) loadable by any transformers
    version: the peers need one to load a model, while benchmarks feed random token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = Path(path)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = specials + [f"w{i}" for i in range(max(0, min(vocab_size, 256) - len(specials)))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": 1 << 20,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    special = {k: v for k, v in config.items() if k.endswith("_token")}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=1))


def _legacy_config_keys(cfg: dict) -> dict:
    """Keys older transformers (4.x, used by upstream oLLM) read instead of ``rope_parameters``."""
    extra: dict[str, object] = {"torch_dtype": "bfloat16"}
    rp = cfg.get("rope_parameters") or {}
    if "full_attention" in rp:  # Gemma 3: one table per layer type
        full, local = rp["full_attention"], rp.get("sliding_attention", {})
        extra["rope_theta"] = full.get("rope_theta")
        extra["rope_local_base_freq"] = local.get("rope_theta")
        if full.get("rope_type", "default") != "default":
            extra["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
    elif rp:
        extra["rope_theta"] = rp.get("rope_theta")
        if rp.get("rope_type", "default") != "default":
            extra["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    return {k: v for k, v in extra.items() if k not in cfg}


def _modules(names: list[str]) -> list[tuple[str, list[str]]]:
    """Tensor names grouped by module in checkpoint order: embeddings, each layer, norm, head."""
    groups: dict[str, list[str]] = {}
    for n in names:
        if n.startswith("model.layers."):
            key = ".".join(n.split(".")[:3]) + "."
        else:
            key = n.rsplit(".", 1)[0] + "."
        groups.setdefault(key, []).append(n)

    def order(key: str) -> tuple[int, int]:
        if key.startswith("model.embed_tokens"):
            return (0, 0)
        if key.startswith("model.layers."):
            return (1, int(key.split(".")[2]))
        return (2, 0 if key.startswith("model.norm") else 1)

    return sorted(groups.items(), key=lambda kv: order(kv[0]))


def write_hf_checkpoint(
    preset: str,
    path: str | Path,
    seed: int = 0,
    progress: bool = False,
    **overrides: object,
) -> Path:
    """Write random bf16 weights with the shapes of synthetic preset ``preset`` as an HF
    checkpoint at ``path``: ``config.json`` (with ``architectures`` and legacy rope keys for
    transformers 4.x), a small tokenizer, and one safetensors shard per module (embeddings, each
    decoder layer, final norm, head) named ``model-0000k-of-0000n.safetensors`` with
    ``model.safetensors.index.json``; one module per shard lets AirLLM link its per-layer split
    to the shards instead of copying them. Config fields may be overridden (tiny test models).
    Written into ``<path>.tmp`` and renamed, so an interrupted write leaves no checkpoint.
    """
    from safetensors.torch import save_file

    from ollm.models.registry import STORE_FAMILIES
    from ollm.storage.synthetic import SyntheticSource

    path = Path(path)
    if (path / "model.safetensors.index.json").is_file():
        return path
    # bf16 experts: the peers load this checkpoint as plain HF weights (no MXFP4 config)
    src = SyntheticSource(preset, seed=seed, families=STORE_FAMILIES, mxfp4=False, **overrides)
    _check_space(path.parent, int(synthetic_nbytes(preset, **overrides) * 1.01), str(path))
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        cfg = src.hf_config()
        cfg.architectures = [_ARCHS.get(cfg.model_type, "LlamaForCausalLM")]
        cfg.save_pretrained(str(tmp))
        raw = json.loads((tmp / "config.json").read_text())
        raw.update(_legacy_config_keys(raw))
        (tmp / "config.json").write_text(json.dumps(raw, indent=2))
        write_tokenizer(tmp)
        modules = _modules(src.names())
        weight_map: dict[str, str] = {}
        total = 0
        items = modules
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(modules, desc=f"writing {preset} checkpoint", unit="shard")
        for k, (_, names) in enumerate(items, start=1):
            fname = f"model-{k:05d}-of-{len(modules):05d}.safetensors"
            tensors = {n: src.get(n).contiguous() for n in names}
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(names, fname))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        src.close()
    return path
