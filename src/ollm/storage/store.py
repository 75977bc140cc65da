"""The layer store: one file per decoder layer plus ``globals.bin`` (embeddings, final norm, head),
tensors at 4 KiB-aligned offsets so a layer is one large read straight into a staging buffer, and a
manifest of names, shapes, dtypes, offsets and CRC32 checksums.

A store is written to a temporary directory and renamed into place (see ollm.storage.convert);
opening one checks the manifest and every file's size, and each file's checksum is verified the
first time it is read in a process.
"""

from __future__ import annotations

import json
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ollm.errors import CorruptStoreError, ModelNotFoundError, WeightReadError

FORMAT = "ollm-layer-store"
VERSION = 1
# 2: experts kept coded (MXFP4 ``_blocks`` / ``_scales`` per expert); ollm before it refuses
# such a store by its version instead of failing on the tensors
CODED_VERSION = 2
READ_VERSIONS = (VERSION, CODED_VERSION)
ALIGN = 4096
MANIFEST = "manifest.json"
GLOBALS = "globals.bin"
READ_CHUNK = 64 << 20  # split large reads so several threads keep the disk / page cache busy

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def layer_file(i: int) -> str:
    return f"layers/layer_{i:04d}.bin"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies inside its file."""

    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class FileEntry:
    """One store file: padded size, checksum over all its bytes, and its tensors."""

    nbytes: int
    crc32: int
    tensors: dict[str, TensorEntry]


def layout(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, TensorEntry], int]:
    """Aligned offsets for tensors in insertion order; returns entries and the padded file size."""
    entries, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        entries[name] = TensorEntry(dtype_name(t.dtype), tuple(t.shape), offset, nbytes)
        offset = align_up(offset + nbytes)
    return entries, max(offset, ALIGN)


def pack(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, FileEntry]:
    """Pack tensors into one aligned uint8 buffer and describe it."""
    entries, size = layout(tensors)
    buf = torch.zeros(size, dtype=torch.uint8)
    for name, t in tensors.items():
        e = entries[name]
        buf[e.offset : e.offset + e.nbytes] = t.contiguous().view(-1).view(torch.uint8)
    crc = zlib.crc32(memoryview(buf.numpy()))
    return buf, FileEntry(size, crc, entries)


class LayerStore:
    """Read access to a converted model: manifest, config, and per-file reads into given buffers."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise ModelNotFoundError(f"{self.path}: not an ollm layer store (no {MANIFEST})")
        try:
            raw = json.loads(manifest.read_text())
            if raw.get("format") != FORMAT:
                raise ValueError(f"format is {raw.get('format')!r}")
            if raw.get("version") not in READ_VERSIONS:
                reads = ", ".join(map(str, READ_VERSIONS))
                raise ValueError(f"version {raw.get('version')} (this ollm reads {reads})")
            self.files: dict[str, FileEntry] = {
                name: FileEntry(
                    int(f["nbytes"]),
                    int(f["crc32"]),
                    {
                        t: TensorEntry(
                            e["dtype"], tuple(e["shape"]), int(e["offset"]), int(e["nbytes"])
                        )
                        for t, e in f["tensors"].items()
                    },
                )
                for name, f in raw["files"].items()
            }
            self.num_layers = int(raw["num_layers"])
            self.model_type = str(raw["model_type"])
            self.dtype = DTYPES[raw["dtype"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CorruptStoreError(f"{manifest}: corrupt manifest ({exc})") from exc
        self.meta = raw
        for name, entry in self.files.items():
            f = self.path / name
            size = f.stat().st_size if f.is_file() else -1
            if size != entry.nbytes:
                what = (
                    "missing"
                    if size < 0
                    else f"truncated or wrong size ({size} of {entry.nbytes} bytes)"
                )
                raise CorruptStoreError(f"layer store {self.path} is corrupt: {name} is {what}")
        self._in_use = _hold_shared(manifest)
        self._verified: set[str] = set()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._config = None

    # -- metadata ---------------------------------------------------------------------------
    def hf_config(self) -> object:
        if self._config is None:
            from transformers import AutoConfig

            self._config = AutoConfig.from_pretrained(str(self.path))
        return self._config

    def layer_nbytes(self, i: int) -> int:
        return self.files[layer_file(i)].nbytes

    @property
    def max_layer_nbytes(self) -> int:
        return max(self.layer_nbytes(i) for i in range(self.num_layers))

    @property
    def total_nbytes(self) -> int:
        return sum(f.nbytes for f in self.files.values())

    # -- reads ------------------------------------------------------------------------------
    def read_into(self, file: str, buf: torch.Tensor, verify: bool = True) -> int:
        """Read a whole store file into the CPU uint8 tensor ``buf`` (pinned or not).

        Large files are read in chunks on a few threads (page-cache reads scale with threads);
        the checksum is verified on the first read of each file in this process. Returns bytes read.
        """
        entry = self.files[file]
        if buf.device.type != "cpu" or buf.dtype != torch.uint8 or buf.numel() < entry.nbytes:
            raise ValueError(
                f"buffer for {file} must be a CPU uint8 tensor of >= {entry.nbytes} bytes"
            )
        mv = memoryview(buf.numpy())[: entry.nbytes]
        path = self.path / file
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise WeightReadError(f"cannot open {path}: {exc}") from exc
        try:
            chunks = [
                (o, min(READ_CHUNK, entry.nbytes - o)) for o in range(0, entry.nbytes, READ_CHUNK)
            ]
            if len(chunks) == 1:
                self._pread(fd, mv, 0, entry.nbytes, path)
            else:
                pool = self._get_pool()
                futures = [pool.submit(self._pread, fd, mv, o, n, path) for o, n in chunks]
                for fut in futures:
                    fut.result()
        finally:
            os.close(fd)
        if verify and file not in self._verified:
            if zlib.crc32(mv) != entry.crc32:
                raise CorruptStoreError(
                    f"layer store {self.path} is corrupt: checksum mismatch in {file}"
                )
            with self._lock:
                self._verified.add(file)
        return entry.nbytes

    @staticmethod
    def _pread(fd: int, mv: memoryview, offset: int, n: int, path: Path) -> None:
        done = 0
        while done < n:
            try:
                got = os.preadv(fd, [mv[offset + done : offset + n]], offset + done)
            except OSError as exc:
                raise WeightReadError(f"read error in {path}: {exc}") from exc
            if got == 0:
                raise WeightReadError(f"short read in {path}: file ended at {offset + done}")
            done += got

    def _get_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(4, thread_name_prefix="ollm-read")
            return self._pool

    def views(self, file: str, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed tensor views over a buffer (any device) holding ``file``'s bytes."""
        out = {}
        for name, e in self.files[file].tensors.items():
            raw = buf[e.offset : e.offset + e.nbytes]
            out[name] = raw.view(DTYPES[e.dtype]).view(e.shape)
        return out

    def load(
        self, file: str, device: torch.device | str = "cpu", pin: bool = False
    ) -> dict[str, torch.Tensor]:
        """Read a file and return its tensors on ``device`` (a one-off load, not the streaming path)."""
        buf = torch.empty(self.files[file].nbytes, dtype=torch.uint8, pin_memory=pin)
        self.read_into(file, buf)
        if torch.device(device).type != "cpu":
            buf = buf.to(device)
        return self.views(file, buf)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        if self._in_use is not None:
            self._in_use.close()  # drops the shared lock
            self._in_use = None


def _hold_shared(path: Path):
    """``path`` opened with a shared ``flock`` held until it is closed (or the process ends): the
    mark of a store in use that ``ollm cache rm`` checks. None where flock is unavailable."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    f = open(path, "rb")
    try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # being removed right now, or a filesystem without flock: read on
        f.close()
        return None
    return f


def is_store(path: str | Path) -> bool:
    """True when ``path`` is a directory holding an ollm layer store manifest."""
    return (Path(path) / MANIFEST).is_file()
