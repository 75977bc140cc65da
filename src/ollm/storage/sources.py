"""Model sources: an HF directory (config.json + safetensors shards) or a GGUF file, seen as
HF-named tensors. Both implement the small TensorSource protocol used by the converter."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Protocol

import torch

from ollm.errors import CorruptStoreError, ModelNotFoundError

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
_SKIP_PARTS = ("vision_tower", "vision_model", "multi_modal_projector", "audio_tower")
# Multi-token-prediction heads (Qwen3-Next's ``mtp.*``: its own layers.0 and norm), which
# transformers does not load either: they must not land on the model's layer 0 or final norm.
_SKIP_RE = re.compile(r"(?:^|\.)mtp\.")
# Files of an HF directory that are not weights but belong with the model (tokenizer, templates).
SIDE_FILES_SKIP = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".gguf",
    ".index.json",
    ".msgpack",
    ".h5",
)


class TensorSource(Protocol):
    """Where conversion reads tensors from."""

    path: Path
    model_type: str

    def hf_config(self) -> object: ...
    def save_tokenizer(self, out_dir: str | Path) -> None: ...
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> torch.Tensor: ...
    def close(self) -> None: ...


def classify_name(name: str) -> tuple[str, int | None, str] | None:
    """Map an HF tensor name to ('layer', i, relative name) or ('global', None, short name).

    Handles plain causal-LM names and multimodal wrappers (``model.language_model.layers...``);
    returns None for tensors ollm does not use (vision towers, rotary buffers, MTP heads).
    """
    if any(part in name for part in _SKIP_PARTS) or name.endswith("rotary_emb.inv_freq"):
        return None
    if _SKIP_RE.search(name):
        return None
    m = _LAYER_RE.search(name)
    if m:
        return ("layer", int(m.group(1)), m.group(2))
    if name.endswith("embed_tokens.weight"):
        return ("global", None, "embed_tokens.weight")
    if name.endswith("lm_head.weight"):
        return ("global", None, "lm_head.weight")
    if name.endswith("norm.weight"):
        return ("global", None, "norm.weight")
    return None


class HFDirSource:
    """A Hugging Face model directory: config.json, safetensors (single file or sharded + index)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{self.path}: no config.json (not a Hugging Face model directory)"
            )
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelNotFoundError(f"{self.path}: no .safetensors weight files found")
        from safetensors import safe_open

        self._handles = {}
        self._where: dict[str, str] = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise CorruptStoreError(f"{f}: unreadable safetensors file ({exc})") from exc
            self._handles[f.name] = handle
            for key in handle.keys():
                self._where[key] = f.name
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                wanted = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CorruptStoreError(f"{index}: malformed index ({exc})") from exc
            missing = sorted(set(wanted) - set(self._where))
            if missing:
                raise CorruptStoreError(
                    f"{self.path}: {len(missing)} tensors listed in the index are missing "
                    f"(first: {missing[0]} in {wanted[missing[0]]})"
                )
        self._config = None
        try:
            raw = json.loads((self.path / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise CorruptStoreError(f"{self.path / 'config.json'}: malformed JSON ({exc})") from exc
        self.model_type = str(raw.get("model_type"))  # checked by the caller (``convert``)

    def hf_config(self) -> object:
        if self._config is None:
            from transformers import AutoConfig

            self._config = AutoConfig.from_pretrained(str(self.path))
        return self._config

    def save_tokenizer(self, out_dir: str | Path) -> None:
        """Copy the tokenizer, generation config and chat template files as they are."""
        for f in self.path.iterdir():
            if f.is_file() and f.name != "config.json" and not f.name.endswith(SIDE_FILES_SKIP):
                shutil.copy2(f, Path(out_dir) / f.name)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` from the safetensors header (no data read)."""
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except Exception as exc:
            raise CorruptStoreError(
                f"{self.path / self._where[name]}: cannot read {name} ({exc})"
            ) from exc

    def close(self) -> None:
        self._handles.clear()


def open_source(path: str | Path, progress: bool = False) -> TensorSource:
    """Open an HF directory or a GGUF file as a TensorSource (``progress``: show the slow steps
    of reading a GGUF)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"model path not found: {p}")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{p}: not a model (expected a directory or a .gguf file)")
        from ollm.storage.gguf import GGUFSource

        return GGUFSource(p, progress)
    ggufs = sorted(p.glob("*.gguf"))
    if not (p / "config.json").is_file() and len(ggufs) == 1:
        from ollm.storage.gguf import GGUFSource

        return GGUFSource(ggufs[0], progress)
    from ollm.storage.mxfp4 import Mxfp4Source, is_mxfp4

    return Mxfp4Source(HFDirSource(p)) if is_mxfp4(p) else HFDirSource(p)
