"""A fast reader of GGUF metadata and tensor descriptions.

``gguf.GGUFReader`` builds numpy views for every element of every metadata array: Gemma 3's
262k-token vocabulary (tokens, scores, types) costs it 25-40 s. This reader parses the same
layout (GGUF v2/v3, little-endian) with ``struct`` over a memory map and decodes numeric arrays in
one ``np.frombuffer`` each (about a second), and exposes what ollm uses of GGUFReader's API:
``fields[key].contents()``, ``tensors`` (name, tensor_type, shape, n_bytes, data_offset, data)
and ``data`` (the whole file as uint8). Tensor data are views of the memory map, typed exactly as
GGUFReader types them, so ``gguf.quants.dequantize`` gives the same arrays.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF value types -> (struct format, numpy dtype) of the fixed-size ones.
_SCALARS = {
    0: ("<B", np.uint8),
    1: ("<b", np.int8),
    2: ("<H", np.uint16),
    3: ("<h", np.int16),
    4: ("<I", np.uint32),
    5: ("<i", np.int32),
    6: ("<f", np.float32),
    7: ("<?", np.bool_),
    10: ("<Q", np.uint64),
    11: ("<q", np.int64),
    12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class Field:
    """One metadata value (a Python scalar, str, or list of them; arrays of arrays stay nested,
    where GGUFReader flattens them)."""

    name: str
    value: Any
    types: tuple[int, ...]  # GGUF value type, then the item type of an array

    def contents(self) -> Any:
        """The value, as ``gguf.ReaderField.contents()`` returns it."""
        return self.value


@dataclass(frozen=True)
class Tensor:
    """One tensor's description; ``data`` is a view of the file typed like GGUFReader's."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
    n_bytes: int
    data_offset: int
    data: np.ndarray


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("string runs past the end of the file")
        s = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item == _STRING:
                return [self.string() for _ in range(count)]
            if item == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            fmt, dtype = _SCALARS[item]
            n = count * struct.calcsize(fmt)
            if self.pos + n > len(self.buf):
                raise ValueError("array runs past the end of the file")
            arr = np.frombuffer(
                self.buf, dtype=np.dtype(dtype).newbyteorder("<"), count=count, offset=self.pos
            )
            self.pos += n
            return arr.tolist()
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.unpack(_SCALARS[vtype][0])


class GGUFMetadata:
    """The metadata and tensor descriptions of a GGUF file, the file memory-mapped read-only."""

    def __init__(self, path: str | Path) -> None:
        import gguf

        with open(path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.data = np.frombuffer(self._mmap, dtype=np.uint8)
        c = _Cursor(self._mmap)
        if self._mmap[:4] != GGUF_MAGIC:
            raise ValueError("GGUF magic invalid")
        c.pos = 4
        version = c.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (big-endian or v1 file?)")
        n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            key = c.string()
            vtype = c.unpack("<I")
            item = struct.unpack_from("<I", self._mmap, c.pos)[0] if vtype == _ARRAY else None
            types = (vtype,) if item is None else (vtype, item)
            self.fields[key] = Field(key, c.value(vtype), types)
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            dims = tuple(c.unpack("<Q") for _ in range(c.unpack("<I")))
            infos.append((name, dims, c.unpack("<I"), c.unpack("<Q")))
        align = self.fields.get("general.alignment")
        alignment = int(align.value) if align is not None else DEFAULT_ALIGNMENT
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError("invalid alignment: must be a non-zero power of two")
        start = -(-c.pos // alignment) * alignment
        self.tensors = [self._tensor(gguf, start, *info) for info in infos]

    def _tensor(self, gguf: Any, start: int, name: str, dims: tuple, raw: int, off: int) -> Tensor:
        qtype = gguf.GGMLQuantizationType(raw)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        n_elems = int(np.prod(dims)) if dims else 1
        n_bytes = n_elems * size // block
        offset = start + off
        if offset + n_bytes > self.data.shape[0]:
            raise ValueError(f"tensor {name} runs past the end of the file")
        np_dims = tuple(reversed(dims))
        plain = _PLAIN_TYPES.get(qtype.name)
        if plain is not None:  # typed like GGUFReader: float16/32/64 and int8..64 elements
            data = self.data[offset : offset + n_bytes].view(plain).reshape(np_dims)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(np_dims, qtype)
            data = self.data[offset : offset + n_bytes].reshape(byte_shape)
        return Tensor(name, qtype, dims, n_bytes, offset, data)

    def close(self) -> None:
        """Drop this reader's references to the map (views handed out keep it alive)."""
        self.tensors, self.data = [], np.empty(0, np.uint8)


_PLAIN_TYPES = {
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
}


def write_config_gguf(meta: GGUFMetadata, arch: str, out: str | Path) -> bool:
    """Write at ``out`` a GGUF with ``meta``'s metadata minus the tokenizer's arrays and with
    one-element tensors of the same names, for ``AutoConfig``: transformers derives a config from
    the metadata scalars, the tensor names (tied embeddings) and the vocabulary's length (written
    here as ``<arch>.vocab_size`` when absent), and parses a 262k-entry vocabulary element by
    element (20-40 s). Returns False (nothing written) for metadata it cannot copy (nested
    arrays); then the original file must be used."""
    import gguf

    if any(f.types[1:] == (_ARRAY,) for f in meta.fields.values()):
        return False
    w = gguf.GGUFWriter(str(out), arch)
    tokens = meta.fields.get("tokenizer.ggml.tokens")
    for key, f in meta.fields.items():
        if key == "general.architecture" or (key.startswith("tokenizer.") and len(f.types) > 1):
            continue
        sub = gguf.GGUFValueType(f.types[1]) if len(f.types) > 1 else None
        w.add_key_value(key, f.value, gguf.GGUFValueType(f.types[0]), sub)
    if tokens is not None and f"{arch}.vocab_size" not in meta.fields:
        w.add_uint32(f"{arch}.vocab_size", len(tokens.value))
    for t in meta.tensors:
        w.add_tensor(t.name, np.zeros(1, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return True
