"""Experts in the layer store: each expert of a mixture-of-experts layer is one contiguous,
4 KiB-aligned byte range of its layer file, so it can be read, copied and cached on its own.

At conversion (``order_layer``) fused expert tensors are split per expert and the layer's
tensors are ordered: the dense part first (attention, norms, router, shared experts), then
expert 0's tensors, expert 1's, ... The manifest's ``experts`` section gives, per layer file,
the dense part's size and CRC32 and each expert's (offset, size, CRC32), so a partial read is
still verified. A whole-layer read of the file is unchanged (the tensors keep their names).

| layer tensors | stored as (relative to ``model.layers.N.``) |
| --- | --- |
| per expert (Qwen3-MoE, Mixtral checkpoints) | unchanged: ``{prefix}.experts.{e}.{name}.weight`` |
| fused [E, ...] (transformers v5 modules, gpt-oss) | ``{prefix}.experts.{e}.{gate_up_proj,down_proj}{,_bias}`` |
| MXFP4 (gpt-oss checkpoints) | ``{prefix}.experts.{e}.{gate_up_proj,down_proj}{_blocks,_scales,_bias}`` |

MXFP4 experts stay MXFP4 in the store (``storage/expert_codec.py`` decodes them where they are
computed): ``expert_bytes`` is a stored range (what RAM holds and the link copies),
``decoded_bytes`` the decoded expert a device holds, ``slot_bytes`` one cache slot (both).

Names only: storage knows nothing of model families (no import of ``ollm.models``).
"""

from __future__ import annotations

import os
import re
import threading
import zlib
from dataclasses import dataclass

import torch

from ollm.errors import CorruptStoreError, WeightReadError
from ollm.storage.expert_codec import ExpertTensor, decode_expert, decoded_layout, is_coded
from ollm.storage.store import (
    DTYPES,
    READ_CHUNK,
    FileEntry,
    LayerStore,
    TensorEntry,
    align_up,
    layer_file,
)

EXPERT_RE = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<e>\d+)\.(?P<short>.+)$")
FUSED_RE = re.compile(
    r"^(?P<prefix>.+)\.experts\.(?P<short>gate_up_proj|down_proj)(?P<b>_bias|_blocks|_scales)?$"
)


def split_fused(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused expert tensors ([E, ...] weights, [E, n] biases) split into one tensor per expert
    under ``{prefix}.experts.{e}.{short}``; every other tensor is kept as it is."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        m = FUSED_RE.match(name)
        if m is None or t.dim() < 2:
            out[name] = t
            continue
        short = m["short"] + (m["b"] or "")
        for e in range(t.shape[0]):
            out[f"{m['prefix']}.experts.{e}.{short}"] = t[e].contiguous()
    return out


def order_layer(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layer's tensors in store order: dense ones (sorted by name), then each expert's
    (by expert index, each expert's names sorted), so an expert is one contiguous range."""
    dense = sorted(n for n in tensors if EXPERT_RE.match(n) is None)
    experts = sorted(
        (n for n in tensors if EXPERT_RE.match(n) is not None),
        key=lambda n: (int(EXPERT_RE.match(n)["e"]), n),  # type: ignore[index]
    )
    return {n: tensors[n] for n in dense + experts}


@dataclass(frozen=True)
class ExpertRegions:
    """Byte ranges of one layer file: the dense part [0, dense) and each expert's range."""

    dense: int  # bytes of the dense part (aligned; its tensors all lie below)
    dense_crc: int
    offsets: tuple[int, ...]  # start of expert e's range
    sizes: tuple[int, ...]  # bytes of expert e's range (aligned)
    crcs: tuple[int, ...]

    @property
    def num_experts(self) -> int:
        return len(self.offsets)

    @property
    def expert_bytes(self) -> int:
        """The largest expert's range (one cache slot)."""
        return max(self.sizes)

    def to_json(self) -> dict:
        return {
            "dense": [self.dense, self.dense_crc],
            "experts": [list(t) for t in zip(self.offsets, self.sizes, self.crcs, strict=True)],
        }

    @classmethod
    def from_json(cls, raw: dict) -> ExpertRegions:
        rows = raw["experts"]
        return cls(
            int(raw["dense"][0]),
            int(raw["dense"][1]),
            tuple(int(r[0]) for r in rows),
            tuple(int(r[1]) for r in rows),
            tuple(int(r[2]) for r in rows),
        )


def expert_regions(entry: FileEntry, buf: torch.Tensor) -> ExpertRegions | None:
    """The regions of a packed layer file (``buf``: its bytes) whose tensors ``order_layer``
    ordered; None for a layer without experts. Checks that each expert is contiguous."""
    spans: dict[int, list[int]] = {}
    dense_end = 0
    for name, t in entry.tensors.items():
        m = EXPERT_RE.match(name)
        if m is None:
            dense_end = max(dense_end, t.offset + t.nbytes)
            continue
        s = spans.setdefault(int(m["e"]), [t.offset, t.offset + t.nbytes])
        s[0], s[1] = min(s[0], t.offset), max(s[1], t.offset + t.nbytes)
    if not spans:
        return None
    if sorted(spans) != list(range(len(spans))):
        raise CorruptStoreError(f"expert indices are not 0..{len(spans) - 1}")
    ends = [align_up(spans[e][1]) for e in range(len(spans))]
    starts = [spans[e][0] for e in range(len(spans))]
    dense = align_up(dense_end)
    if starts[0] < dense or any(starts[e + 1] < ends[e] for e in range(len(spans) - 1)):
        raise CorruptStoreError("experts are not contiguous after the dense part")
    mv = memoryview(buf.numpy())

    def crc(a: int, b: int) -> int:
        return zlib.crc32(mv[a:b])

    return ExpertRegions(
        dense,
        crc(0, dense),
        tuple(starts),
        tuple(b - a for a, b in zip(starts, ends, strict=True)),
        tuple(crc(a, b) for a, b in zip(starts, ends, strict=True)),
    )


class StoreExperts:
    """The experts of a layer store: regions per layer and per-expert reads and views."""

    def __init__(self, store: LayerStore) -> None:
        self.store = store
        self.dtype = store.dtype  # what coded experts decode to (the store's float dtype)
        raw = store.meta.get("experts") or {}
        self.regions: dict[int, ExpertRegions] = {}
        self.tensors: dict[int, list[list[ExpertTensor]]] = {}
        self.decoded: dict[int, list[tuple[list[ExpertTensor], int]]] = {}  # coded layers only
        for i in range(store.num_layers):
            f = layer_file(i)
            if f in raw:
                self.regions[i] = ExpertRegions.from_json(raw[f])
                self.tensors[i] = self._expert_tensors(store.files[f], self.regions[i])
                if any(is_coded(ts) for ts in self.tensors[i]):
                    self.decoded[i] = [decoded_layout(ts, self.dtype) for ts in self.tensors[i]]
        self._verified: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        self.verify = True  # check each expert's CRC32 on its first read

    @staticmethod
    def _expert_tensors(entry: FileEntry, r: ExpertRegions) -> list[list[ExpertTensor]]:
        per: list[list[ExpertTensor]] = [[] for _ in range(r.num_experts)]
        for name, t in entry.tensors.items():
            m = EXPERT_RE.match(name)
            if m is not None:
                e = int(m["e"])
                per[e].append(
                    ExpertTensor(
                        m["short"], t.offset - r.offsets[e], t.nbytes, DTYPES[t.dtype], t.shape
                    )
                )
        return per

    @property
    def available(self) -> bool:
        """Whether the store holds per-expert regions (stores converted before them do not)."""
        return bool(self.regions)

    def num_experts(self, i: int) -> int:
        return self.regions[i].num_experts if i in self.regions else 0

    @property
    def expert_bytes(self) -> int:
        """The largest stored expert of any layer (RAM and copies; one slot unless coded)."""
        return max((r.expert_bytes for r in self.regions.values()), default=0)

    @property
    def coded(self) -> bool:
        """Whether experts are stored coded (MXFP4) and decoded where they are computed."""
        return bool(self.decoded)

    @property
    def decoded_bytes(self) -> int:
        """The largest decoded expert (what a device holds to compute one)."""
        if not self.coded:
            return self.expert_bytes
        return max(n for layer in self.decoded.values() for _, n in layer)

    @property
    def slot_bytes(self) -> int:
        """One device cache slot: the decoded expert, plus its stored bytes when coded (the
        copy lands there and is decoded into the slot)."""
        return self.decoded_bytes + (self.expert_bytes if self.coded else 0)

    def device_tensors(self, i: int, e: int) -> list[ExpertTensor]:
        """Expert ``e`` of layer ``i``'s tensors as a device holds them (decoded)."""
        return self.decoded[i][e][0] if i in self.decoded else self.tensors[i][e]

    def decode(self, i: int, e: int, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Expert ``e`` of layer ``i``'s tensors for compute from its stored range ``raw``:
        views when it is not coded, else decoded (new tensors on ``raw``'s device)."""
        if i not in self.decoded:
            return self.views(i, e, raw)
        return decode_expert(raw, self.tensors[i][e], self.dtype)

    def read_range(self, i: int, start: int, stop: int, buf: torch.Tensor) -> int:
        """Read experts ``start..stop-1`` of layer ``i`` (one contiguous range of its file) into
        the CPU uint8 ``buf`` (byte 0 = expert ``start``), verifying each expert's CRC32 on its
        first read in this process. Returns the bytes read."""
        r = self.regions[i]
        a, b = r.offsets[start], r.offsets[stop - 1] + r.sizes[stop - 1]
        if buf.device.type != "cpu" or buf.dtype != torch.uint8 or buf.numel() < b - a:
            raise ValueError(f"expert buffer must be a CPU uint8 tensor of >= {b - a} bytes")
        mv = memoryview(buf.numpy())[: b - a]
        path = self.store.path / layer_file(i)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise WeightReadError(f"cannot open {path}: {exc}") from exc
        try:
            # a long range (a layer's RAM experts at load) in chunks on the store's readers
            chunks = [(o, min(READ_CHUNK, b - a - o)) for o in range(0, b - a, READ_CHUNK)]
            if len(chunks) == 1:
                _pread_at(fd, mv, 0, b - a, a, path)
            else:
                pool = self.store._get_pool()
                jobs = [pool.submit(_pread_at, fd, mv, o, n, a, path) for o, n in chunks]
                for job in jobs:
                    job.result()
        finally:
            os.close(fd)
        if self.verify:
            for e in range(start, stop):
                if (i, e) in self._verified:
                    continue
                o = r.offsets[e] - a
                if zlib.crc32(mv[o : o + r.sizes[e]]) != r.crcs[e]:
                    raise CorruptStoreError(
                        f"layer store {self.store.path} is corrupt: checksum mismatch in "
                        f"expert {e} of {layer_file(i)}"
                    )
                with self._lock:
                    self._verified.add((i, e))
        return b - a

    def range_bytes(self, i: int, start: int, stop: int) -> int:
        """Bytes of experts ``start..stop-1`` of layer ``i`` (one contiguous range)."""
        r = self.regions[i]
        return r.offsets[stop - 1] + r.sizes[stop - 1] - r.offsets[start]

    def views(
        self, i: int, e: int, buf: torch.Tensor, decoded: bool = False
    ) -> dict[str, torch.Tensor]:
        """Expert ``e`` of layer ``i``'s tensors (short names) over ``buf`` (any device), a
        buffer whose byte 0 is the start of the expert's range (``decoded``: a decoded range,
        ``device_tensors``' layout)."""
        out = {}
        for t in self.device_tensors(i, e) if decoded else self.tensors[i][e]:
            out[t.short] = buf[t.offset : t.offset + t.nbytes].view(t.dtype).view(t.shape)
        return out


def _pread_at(fd: int, mv: memoryview, o: int, n: int, base: int, path) -> None:
    """``mv[o : o + n]`` from the file at ``base + o`` (a range's chunk)."""
    done = 0
    while done < n:
        try:
            got = os.preadv(fd, [mv[o + done : o + n]], base + o + done)
        except OSError as exc:
            raise WeightReadError(f"read error in {path}: {exc}") from exc
        if got == 0:
            raise WeightReadError(f"short read in {path}: file ended at {base + o + done}")
        done += got


class _DenseView(LayerStore):
    """``LayerStore`` whose layer files with experts are their dense part only."""

    base: LayerStore

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        self.base.close()


def dense_store(store: LayerStore, experts: StoreExperts) -> LayerStore:
    """A view of ``store`` in which every layer file with experts is its dense part only (its
    first ``dense`` bytes: attention, norms, router, shared experts), checked by the dense
    part's CRC32: what the prefetcher streams and the planner places when experts are placed
    and cached one by one. Closing the view closes ``store``."""
    view = _DenseView.__new__(_DenseView)
    view.__dict__.update(store.__dict__)
    files = dict(store.files)
    for i, r in experts.regions.items():
        f = layer_file(i)
        tensors: dict[str, TensorEntry] = {
            n: t for n, t in files[f].tensors.items() if EXPERT_RE.match(n) is None
        }
        files[f] = FileEntry(r.dense, r.dense_crc, tensors)
    view.files = files
    view._verified = set()
    view._pool = None
    view._lock = threading.Lock()
    view.base = store
    return view
