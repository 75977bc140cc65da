"""The layer store: conversion from an HF directory, on-disk layout, integrity checks, atomic
writes and the conversion cache of ``resolve_store``."""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import ollm.storage.convert as convert_mod
import ollm.storage.store as store_mod
from ollm.errors import (
    CorruptStoreError,
    ModelNotFoundError,
    OllmError,
    UnsupportedModelError,
)
from ollm.models.registry import STORE_FAMILIES
from ollm.storage.convert import convert, resolve_store
from ollm.storage.sources import open_source
from ollm.storage.store import ALIGN, GLOBALS, MANIFEST, LayerStore, layer_file


@pytest.fixture
def llama_store(hf_models, tmp_path) -> tuple[torch.nn.Module, Path, Path]:
    """(HF llama model, its HF directory, a fresh store converted from it under tmp_path)."""
    model, src = hf_models("llama")
    dst = convert(src, tmp_path / "store", progress=False, families=STORE_FAMILIES)
    return model, src, dst


def _store_name(hf_name: str) -> tuple[str, str]:
    """HF state_dict name -> (store file, tensor name inside it)."""
    if hf_name.startswith("model.layers."):
        i, rel = hf_name.removeprefix("model.layers.").split(".", 1)
        return layer_file(int(i)), rel
    return GLOBALS, hf_name.removeprefix("model.")


def _hf_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- layout and contents ----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_convert_layout_and_tensors(family, hf_models, tmp_path):
    model, src = hf_models(family)
    dst = convert(src, tmp_path / "store", progress=False, families=STORE_FAMILIES)
    n = model.config.num_hidden_layers
    manifest = json.loads((dst / MANIFEST).read_text())
    assert manifest["format"] == "ollm-layer-store"
    assert manifest["num_layers"] == n
    assert manifest["dtype"] == "float32"
    assert set(manifest["files"]) == {GLOBALS} | {layer_file(i) for i in range(n)}
    for name, f in manifest["files"].items():
        assert f["nbytes"] % ALIGN == 0, name
        assert (dst / name).stat().st_size == f["nbytes"], name
        spans = sorted((t["offset"], t["offset"] + t["nbytes"]) for t in f["tensors"].values())
        for start, end in spans:
            assert start % ALIGN == 0, name
            assert end <= f["nbytes"], name
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end <= start, f"overlapping tensors in {name}"
    assert (dst / "config.json").is_file()

    store = LayerStore(dst)
    try:
        loaded = {name: store.load(name) for name in store.files}
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight")  # tied: only the embedding table is stored
        seen = set()
        for hf_name, ref in state.items():
            file, rel = _store_name(hf_name)
            assert rel in loaded[file], f"{hf_name} missing from {file}"
            got = loaded[file][rel]
            assert got.dtype == ref.dtype and got.shape == ref.shape, hf_name
            assert torch.equal(got, ref), hf_name
            seen.add((file, rel))
        stored = {(f, t) for f, ts in loaded.items() for t in ts}
        assert stored == seen  # nothing extra in the store
    finally:
        store.close()


def test_convert_dtype_bfloat16(hf_models, tmp_path):
    model, src = hf_models("llama")
    dst = convert(
        src, tmp_path / "bf16", dtype=torch.bfloat16, progress=False, families=STORE_FAMILIES
    )
    store = LayerStore(dst)
    assert store.dtype == torch.bfloat16
    w = store.load(layer_file(1))["mlp.up_proj.weight"]
    ref = model.state_dict()["model.layers.1.mlp.up_proj.weight"].to(torch.bfloat16)
    assert torch.equal(w, ref)


# -- integrity ----------------------------------------------------------------------------------


def test_truncated_layer_file(llama_store):
    _, _, dst = llama_store
    f = dst / layer_file(2)
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - ALIGN)
    with pytest.raises(CorruptStoreError, match="layer_0002.bin"):
        LayerStore(dst)


def test_missing_layer_file(llama_store):
    _, _, dst = llama_store
    (dst / layer_file(3)).unlink()
    with pytest.raises(CorruptStoreError, match=r"layer_0003\.bin is missing"):
        LayerStore(dst)


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def test_flipped_byte_fails_checksum_on_first_read(llama_store):
    _, _, dst = llama_store
    name = layer_file(1)
    store = LayerStore(dst)
    entry = store.files[name].tensors["mlp.down_proj.weight"]
    _flip_byte(dst / name, entry.offset + 7)
    fresh = LayerStore(dst)  # same size: opening succeeds, the read must catch it
    buf = torch.empty(fresh.files[name].nbytes, dtype=torch.uint8)
    with pytest.raises(CorruptStoreError, match="checksum") as exc:
        fresh.read_into(name, buf)
    assert "layer_0001.bin" in str(exc.value)
    # an intact file of the same store still reads fine
    assert fresh.read_into(layer_file(0), buf) == fresh.files[layer_file(0)].nbytes
    # verify=False skips the check (the caller asked for it)
    fresh.read_into(name, buf, verify=False)


def test_flipped_byte_fails_llm_construction(llama_store):
    from ollm import LLM

    _, _, dst = llama_store
    _flip_byte(dst / layer_file(0), 100)
    with pytest.raises(CorruptStoreError, match="checksum"):
        LLM(dst, device="cpu", progress=False)


def test_flipped_byte_in_streamed_layer_fails_generation(llama_store):
    from ollm import LLM, SamplingParams

    _, _, dst = llama_store
    _flip_byte(dst / layer_file(2), 4096 + 3)
    params = SamplingParams(temperature=0, max_new_tokens=3)
    # offload="disk": construction reads only globals.bin; the first pass reads layer 2
    with LLM(dst, device="cpu", offload="disk", progress=False) as llm:
        with pytest.raises(CorruptStoreError, match=r"checksum mismatch in layers/layer_0002"):
            _with_timeout(lambda: llm.generate([1, 2, 3], params))
    with LLM(dst, device="cpu", offload="disk", verify_checksums=False, progress=False) as llm:
        assert len(_with_timeout(lambda: llm.generate([1, 2, 3], params)).token_ids) == 3


def _with_timeout(fn, timeout: float = 30.0):
    """Run ``fn`` on a daemon thread so that a hang fails the test instead of the whole run."""
    out: queue.Queue = queue.Queue()

    def work():
        try:
            out.put((True, fn()))
        except BaseException as exc:
            out.put((False, exc))

    threading.Thread(target=work, daemon=True).start()
    try:
        ok, value = out.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"no result within {timeout} s")
    if not ok:
        raise value
    return value


def test_corrupt_manifest(llama_store):
    _, _, dst = llama_store
    (dst / MANIFEST).write_text("{this is not json")
    with pytest.raises(CorruptStoreError, match="manifest"):
        LayerStore(dst)


def test_manifest_wrong_version(llama_store):
    _, _, dst = llama_store
    raw = json.loads((dst / MANIFEST).read_text())
    raw["version"] = 999
    (dst / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(CorruptStoreError, match="version"):
        LayerStore(dst)


def test_missing_manifest(llama_store, tmp_path):
    _, _, dst = llama_store
    (dst / MANIFEST).unlink()
    with pytest.raises(ModelNotFoundError):
        LayerStore(dst)
    with pytest.raises(ModelNotFoundError):
        LayerStore(tmp_path / "nowhere")


# -- atomic conversion --------------------------------------------------------------------------


def _temps(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.tmp-*"))


def test_interrupted_conversion_leaves_nothing(hf_models, tmp_path):
    _, src = hf_models("llama")
    source = open_source(src)
    real_get = source.get
    calls = []

    def get(name):
        calls.append(name)
        if len(calls) == 12:  # globals and the first layer are written by now
            raise KeyboardInterrupt
        return real_get(name)

    source.get = get
    dst = tmp_path / "out" / "store"
    with pytest.raises(KeyboardInterrupt):
        convert(source, dst, progress=False, families=STORE_FAMILIES)
    assert len(calls) == 12
    assert not dst.exists()
    assert _temps(dst.parent, dst.name) == []
    assert list(dst.parent.iterdir()) == []


def test_interrupted_pack_leaves_nothing(hf_models, tmp_path, monkeypatch):
    _, src = hf_models("llama")
    real_pack = convert_mod.pack
    calls = []

    def pack(tensors):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_pack(tensors)

    monkeypatch.setattr(convert_mod, "pack", pack)
    dst = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, progress=False, families=STORE_FAMILIES)
    assert not dst.exists()
    assert _temps(tmp_path, "store") == []


def test_stale_temp_of_dead_process_is_removed(hf_models, tmp_path):
    _, src = hf_models("llama")
    dead = 999999
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    stale = tmp_path / f".store.tmp-{dead}"
    (stale / "layers").mkdir(parents=True)
    (stale / "layers" / "layer_0000.bin").write_bytes(b"half written")
    live = tmp_path / f".store.tmp-{os.getppid()}"  # another process still converting
    live.mkdir()
    other = tmp_path / f".other.tmp-{dead}"  # a different target: not ours to clean
    other.mkdir()
    dst = convert(src, tmp_path / "store", progress=False, families=STORE_FAMILIES)
    assert not stale.exists()
    assert live.is_dir()
    assert other.is_dir()
    assert LayerStore(dst).num_layers == 4
    assert _temps(tmp_path, "store") == [live]


def test_existing_destination_needs_overwrite(llama_store):
    _, src, dst = llama_store
    before = (dst / MANIFEST).stat().st_mtime_ns
    with pytest.raises(OllmError, match="already exists"):
        convert(src, dst, progress=False, families=STORE_FAMILIES)
    assert (dst / MANIFEST).stat().st_mtime_ns == before
    again = convert(
        src, dst, overwrite=True, dtype=torch.bfloat16, progress=False, families=STORE_FAMILIES
    )
    assert again == dst
    assert LayerStore(dst).dtype == torch.bfloat16
    assert _temps(dst.parent, dst.name) == []


def test_not_enough_disk_space(hf_models, tmp_path, monkeypatch):
    _, src = hf_models("llama")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(convert_mod.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 1000))
    dst = tmp_path / "store"
    with pytest.raises(OllmError, match="free") as exc:
        convert(src, dst, progress=False, families=STORE_FAMILIES)
    assert "disk space" in str(exc.value)
    assert not dst.exists()
    assert _temps(tmp_path, "store") == []


# -- bad sources ----------------------------------------------------------------------------------


def test_missing_source_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        convert(tmp_path / "nope", tmp_path / "store", progress=False, families=STORE_FAMILIES)
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_store(
            tmp_path / "nope", tmp_path / "cache", progress=False, families=STORE_FAMILIES
        )


def test_directory_without_config(hf_models, tmp_path):
    _, src = hf_models("llama")
    d = _hf_copy(src, tmp_path / "noconfig")
    (d / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        convert(d, tmp_path / "store", progress=False, families=STORE_FAMILIES)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError):
        resolve_store(empty, tmp_path / "cache", progress=False, families=STORE_FAMILIES)


def test_unsupported_model_type(hf_models, tmp_path):
    _, src = hf_models("llama")
    d = _hf_copy(src, tmp_path / "foobar")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "foobar"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="foobar") as exc:
        convert(d, tmp_path / "store", progress=False, families=STORE_FAMILIES)
    assert "llama" in str(exc.value) and "qwen3" in str(exc.value)
    assert not (tmp_path / "store").exists()


def test_index_lists_missing_tensor(hf_models, tmp_path):
    from safetensors import safe_open

    _, src = hf_models("llama")
    d = _hf_copy(src, tmp_path / "sharded")
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    weight_map = {n: "model.safetensors" for n in names}
    weight_map["model.layers.2.mlp.extra_proj.weight"] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CorruptStoreError, match="missing") as exc:
        convert(d, tmp_path / "store", progress=False, families=STORE_FAMILIES)
    assert "model.layers.2.mlp.extra_proj.weight" in str(exc.value)
    assert not (tmp_path / "store").exists()


def test_missing_layer_tensor_in_source(hf_models, tmp_path):
    from safetensors.torch import load_file, save_file

    _, src = hf_models("llama")
    d = _hf_copy(src, tmp_path / "broken")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CorruptStoreError, match="layer 1"):
        convert(d, tmp_path / "store", progress=False, families=STORE_FAMILIES)
    assert not (tmp_path / "store").exists()
    assert _temps(tmp_path, "store") == []


# -- conversion cache -----------------------------------------------------------------------------


def test_resolve_store_caches(hf_models, tmp_path, monkeypatch):
    _, src = hf_models("llama")
    cache = tmp_path / "cache"
    first = resolve_store(src, cache, progress=False, families=STORE_FAMILIES)
    assert first.parent == cache / "stores"
    assert store_mod.is_store(first)
    mtime = (first / MANIFEST).stat().st_mtime_ns

    def no_convert(*args, **kwargs):
        raise AssertionError("resolve_store converted again")

    monkeypatch.setattr(convert_mod, "convert", no_convert)
    second = resolve_store(src, cache, progress=False, families=STORE_FAMILIES)
    assert second == first
    assert (first / MANIFEST).stat().st_mtime_ns == mtime
    assert (
        resolve_store(first, cache, progress=False, families=STORE_FAMILIES) == first
    )  # a store is used as it is
    monkeypatch.undo()
    other = resolve_store(src, cache, dtype=torch.bfloat16, progress=False, families=STORE_FAMILIES)
    assert other != first  # another dtype is another store
    assert LayerStore(other).dtype == torch.bfloat16
