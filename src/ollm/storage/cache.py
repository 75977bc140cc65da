"""The conversion cache: layer stores under ``<cache_dir>/stores/<stem>-<digest>``.

The digest is a cheap fingerprint of the source's *content* (each file's size, its first bytes,
where headers and metadata live, its last bytes and a few samples in between), the target dtype
and the converter version: ``touch config.json`` or moving a model keeps its store, a rewritten
weight makes a new one. Processes share the cache safely: conversion runs under a file lock per
store (the first process converts, the others wait and open its store), and every open
``LayerStore`` holds a shared ``flock`` on its manifest, so ``remove_store`` can refuse a store in
use without any registry of processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ollm.errors import OllmError
from ollm.storage.progress import heartbeat
from ollm.storage.store import MANIFEST, is_store

logger = logging.getLogger("ollm")

# Bump when convert() writes different bytes for the same source: old stores are then not reused.
# 3: experts split per expert and laid out after the dense part, with per-expert CRC32s.
# 4: MXFP4 experts (gpt-oss) kept as MXFP4 per expert (store version 2), not dequantized.
CONVERTER_VERSION = 4
STORES = "stores"
_HEAD = 1 << 20  # safetensors headers (tensor names, shapes, offsets) fit in this
GGUF_HEAD = 16 << 20  # GGUF metadata holds the whole vocabulary (~6 MB for 262k tokens)
_TAIL = 1 << 20
_SAMPLES, _SAMPLE = 16, 64 << 10


class _Concat:
    """Reads byte ranges of several files as if they were one (a model split in parts)."""

    def __init__(self, parts: Sequence[Path]) -> None:
        self.parts = [(p, p.stat().st_size) for p in parts]
        self.size = sum(n for _, n in self.parts)

    def read(self, offset: int, n: int) -> bytes:
        out, base = bytearray(), 0
        for path, size in self.parts:
            lo, hi = max(offset, base), min(offset + n, base + size)
            if lo < hi:
                with open(path, "rb") as f:
                    f.seek(lo - base)
                    out += f.read(hi - lo)
            base += size
        return bytes(out)


def content_digest(parts: Sequence[Path], head: int = _HEAD) -> str:
    """Fingerprint of the bytes of ``parts`` taken as one file: size, first ``head`` bytes, last
    bytes and evenly spaced samples; reads a few MiB however large the file is."""
    data = _Concat(parts)
    h = hashlib.sha256(str(data.size).encode())
    h.update(data.read(0, head))
    step = max(data.size // (_SAMPLES + 1), 1)
    for k in range(1, _SAMPLES + 1):
        h.update(data.read(k * step, _SAMPLE))
    h.update(data.read(max(data.size - _TAIL, 0), _TAIL))
    return h.hexdigest()


def source_digest(src: Path) -> str:
    """Content fingerprint of a model source: one file, or a directory's top-level files (names
    included, since a directory's files play roles by name); mtimes and paths are ignored."""
    if src.is_file():
        return content_digest([src], GGUF_HEAD if src.suffix.lower() == ".gguf" else _HEAD)
    h = hashlib.sha256()
    for f in sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")):
        head = GGUF_HEAD if f.suffix.lower() == ".gguf" else _HEAD
        h.update(f"{f.name}:{content_digest([f], head)};".encode())
    return h.hexdigest()


def target_dtype_name(src: Path, dtype: str | None) -> str:
    """The dtype conversion will write (an explicit one, else the source's), read cheaply so that
    ``dtype=None`` and the source's own dtype share one store."""
    if dtype is not None:
        return dtype
    config = src / "config.json" if src.is_dir() else None
    if config is None or not config.is_file():
        return "float32"  # GGUF weights are dequantized to float32 (see convert._source_dtype)
    try:
        raw = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return "float32"  # the converter reports the broken config properly
    name = str(raw.get("dtype") or raw.get("torch_dtype") or "").removeprefix("torch.")
    return name if name in ("bfloat16", "float16") else "float32"


def store_digest(content: str, dtype: str) -> str:
    """The 12-hex-digit cache key of a source fingerprint converted to ``dtype``."""
    key = f"{content}|{dtype}|converter-{CONVERTER_VERSION}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def find_store(stores: Path, stem: str, digest: str) -> Path:
    """The store of ``digest``: an existing one under any stem (a renamed source keeps its store),
    else ``<stores>/<stem>-<digest>``."""
    if stores.is_dir():
        for p in sorted(stores.glob(f"*-{digest}")):
            if not p.name.startswith(".") and is_store(p):
                return p
    return stores / f"{stem}-{digest}"


def _lock(store: Path):
    from filelock import FileLock

    return FileLock(str(store.parent / f".{store.name}.lock"))


def mark_used(store: Path) -> None:
    """Record now as the store's last use (its directory mtime; the store itself is immutable)."""
    try:
        os.utime(store)
    except OSError:
        pass  # a read-only shared cache still works, only its 'last used' stays old


def get_or_convert(store: Path, make: Callable[[Path], Path], progress: bool = True) -> Path:
    """``store`` if it exists, else ``make(store)`` under the store's file lock: of processes
    started together on one model, one converts and the others wait, then open its store."""
    if not is_store(store):
        store.parent.mkdir(parents=True, exist_ok=True)
        lock = _lock(store)
        from filelock import Timeout

        try:
            lock.acquire(timeout=0)
        except Timeout:
            with heartbeat(f"waiting for another process converting {store.name}", progress):
                lock.acquire()
        try:
            if not is_store(store):  # else the process we waited for made it
                make(store)
        finally:
            lock.release()
    mark_used(store)
    return store


def store_in_use(store: Path) -> bool:
    """True when some process has the store open (holds the shared lock of its manifest)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): cannot tell cheaply
        return False
    try:
        f = open(store / MANIFEST, "rb")
    except OSError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


@dataclass(frozen=True)
class StoreInfo:
    """One store of the cache, as ``ollm cache ls`` shows it."""

    name: str
    path: Path
    source: str
    dtype: str
    nbytes: int
    last_used: float
    in_use: bool
    stale: bool  # written by an older converter: resolve_store never picks it again


def disk_usage(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (blocks, not apparent sizes)."""
    total = 0
    for f in path.rglob("*"):
        st = f.lstat()
        total += getattr(st, "st_blocks", 0) * 512 or st.st_size
    return total


def list_stores(cache_dir: str | Path) -> list[StoreInfo]:
    """The stores of ``<cache_dir>/stores``, most recently used first."""
    stores = Path(cache_dir) / STORES
    out = []
    for p in sorted(stores.iterdir()) if stores.is_dir() else []:
        if p.name.startswith(".") or not is_store(p):
            continue
        try:
            meta = json.loads((p / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
        out.append(
            StoreInfo(
                name=p.name,
                path=p,
                source=str(meta.get("source", "?")),
                dtype=str(meta.get("dtype", "?")),
                nbytes=disk_usage(p),
                last_used=p.stat().st_mtime,
                in_use=store_in_use(p),
                stale=meta.get("converter", 1) != CONVERTER_VERSION,
            )
        )
    return sorted(out, key=lambda s: -s.last_used)


def remove_store(cache_dir: str | Path, name: str) -> Path:
    """Remove store ``name`` of the cache atomically (renamed away, then deleted), refusing one
    that a process has open. Returns its former path."""
    stores = Path(cache_dir) / STORES
    path = stores / name
    if "/" in name or name.startswith(".") or not is_store(path):
        raise OllmError(f"no store named {name!r} in {stores} (see: ollm cache ls)")
    with _lock(path):  # not while a process converts or checks it
        if store_in_use(path):
            raise OllmError(f"store {name} is in use by a running ollm process; not removed")
        trash = stores / f".{name}.rm-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(path, trash)  # readers see the whole store or none
        shutil.rmtree(trash, ignore_errors=True)
    return path
