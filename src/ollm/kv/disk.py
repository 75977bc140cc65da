"""The KV disk tier: per-run directories of memory-mapped, preallocated files.

Each request that keeps KV on disk gets ``<kv_dir>/ollm-kv-<pid>-<n>/``; its files are
preallocated (``posix_fallocate``) before the prefill starts, so a full disk is a clear error up
front rather than a crash mid-run, and written through the page cache (the kernel writes back
asynchronously; the step never waits on the disk). The directory is removed when the request
ends, normally, on Ctrl-C or on an exception; directories left by killed processes are removed
the next time a run starts in the same ``kv_dir``.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import torch

from ollm.errors import OllmError
from ollm.procs import pid_alive
from ollm.sizes import format_size

PREFIX = "ollm-kv-"
_counter = itertools.count()


class KVDirectory:
    """One run's directory of KV files; use as a context manager or call ``close``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OllmError(
                f"KV cache directory {self.root} cannot be created: {exc.strerror}"
            ) from exc
        if not os.access(self.root, os.W_OK):
            raise OllmError(f"KV cache directory {self.root} is not writable")
        self.clean_stale(self.root)
        self.path = self.root / f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.path.mkdir()
        self._files = itertools.count()
        self.nbytes = 0

    @staticmethod
    def clean_stale(root: Path) -> list[Path]:
        """Remove run directories whose process is gone; returns what was removed."""
        removed = []
        for d in root.glob(f"{PREFIX}*"):
            pid = d.name[len(PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        return removed

    def check(self, nbytes: int) -> None:
        """Refuse before the prefill when the disk cannot hold ``nbytes`` more."""
        free = shutil.disk_usage(self.root).free
        if free < nbytes:
            raise OllmError(
                f"KV cache directory {self.root} has {format_size(free)} free; this request needs "
                f"{format_size(nbytes)} of KV on disk (use a larger disk, a shorter context or less "
                "batch)"
            )

    def storage(self, nbytes: int) -> torch.Tensor:
        """A preallocated file of ``nbytes`` mapped as a uint8 tensor."""
        f = self.path / f"kv-{next(self._files):05d}.bin"
        try:
            fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, nbytes)
            finally:
                os.close(fd)
        except OSError as exc:
            f.unlink(missing_ok=True)
            raise OllmError(
                f"cannot allocate {format_size(nbytes)} of KV cache in {self.root}: {exc.strerror}"
            ) from exc
        self.nbytes += nbytes
        return torch.from_file(str(f), shared=True, size=nbytes, dtype=torch.uint8)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> KVDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
