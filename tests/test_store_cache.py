"""The conversion cache: content keys, one conversion among racing processes, the default model
without a second GGUF copy, ``ollm cache ls / rm``, size estimates, progress output and
deterministic synthetic weights."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import ollm.storage.convert as convert_mod
from ollm.errors import OllmError
from ollm.models.registry import STORE_FAMILIES
from ollm.storage import cache
from ollm.storage.convert import convert, estimate_store_nbytes, resolve_store
from ollm.storage.progress import heartbeat, progress_iter
from ollm.storage.store import MANIFEST, LayerStore, is_store

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def _stores(cache_dir: Path) -> list[str]:
    d = cache_dir / "stores"
    return sorted(p.name for p in d.iterdir() if is_store(p)) if d.is_dir() else []


@pytest.fixture
def llama_dir(hf_models, tmp_path) -> Path:
    """A private copy of the tiny HF llama (tests modify it)."""
    _, src = hf_models("llama")
    return Path(shutil.copytree(src, tmp_path / "llama"))


# -- content keys -------------------------------------------------------------------------------


def test_touch_and_move_keep_the_store(llama_dir, tmp_path):
    c = tmp_path / "cache"
    first = resolve_store(llama_dir, c, progress=False, families=STORE_FAMILIES)
    later = time.time() + 100
    for f in llama_dir.iterdir():
        os.utime(f, (later, later))  # `touch` everything: same content, new mtimes
    assert resolve_store(llama_dir, c, progress=False, families=STORE_FAMILIES) == first
    moved = Path(shutil.move(llama_dir, tmp_path / "renamed-model"))
    assert (
        resolve_store(moved, c, progress=False, families=STORE_FAMILIES) == first
    )  # found by digest, any stem
    assert _stores(c) == [first.name]


def test_changed_weights_and_dtype_make_new_stores(llama_dir, tmp_path):
    c = tmp_path / "cache"
    first = resolve_store(llama_dir, c, progress=False, families=STORE_FAMILIES)
    # the tiny model is float32: asking for its own dtype is the same store
    assert (
        resolve_store(llama_dir, c, dtype=torch.float32, progress=False, families=STORE_FAMILIES)
        == first
    )
    bf16 = resolve_store(
        llama_dir, c, dtype=torch.bfloat16, progress=False, families=STORE_FAMILIES
    )
    assert bf16 != first and LayerStore(bf16).dtype == torch.bfloat16
    weights = llama_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one byte of the last tensor, same size: a rewritten weight
    weights.write_bytes(bytes(data))
    changed = resolve_store(llama_dir, c, progress=False, families=STORE_FAMILIES)
    assert changed not in (first, bf16)
    assert len(_stores(c)) == 3


def test_parts_digest_equals_joined_file(tmp_path):
    blob = os.urandom(3 << 20)
    parts = []
    for k, lo in enumerate(range(0, len(blob), 700_001)):
        p = tmp_path / f"part{k}"
        p.write_bytes(blob[lo : lo + 700_001])
        parts.append(p)
    joined = tmp_path / "model.gguf"
    joined.write_bytes(blob)
    assert cache.content_digest(parts, cache.GGUF_HEAD) == cache.source_digest(joined)
    blob2 = bytearray(blob)
    blob2[len(blob) // 2] ^= 1  # a change deep inside is seen only if sampled; the tail is
    blob2[-1] ^= 1
    joined.write_bytes(bytes(blob2))
    assert cache.content_digest(parts, cache.GGUF_HEAD) != cache.source_digest(joined)


def test_default_model_keeps_no_gguf_copy(tmp_path, monkeypatch):
    """The default model's parts are joined into a temp file for conversion only; the key is
    the one the joined file itself would have."""
    parts_dir = tmp_path / "pkg"
    parts_dir.mkdir()
    parts = []
    for k in range(3):
        p = parts_dir / f"m.gguf.part{k}"
        p.write_bytes(os.urandom(100_000))
        parts.append(p)

    def assemble(out, overwrite=False):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(b"".join(p.read_bytes() for p in parts))
        return Path(out)

    pkg = SimpleNamespace(
        MODEL_NAME="m.gguf",
        chunk_paths=lambda: parts,
        verify_chunks=lambda: None,
        assemble=assemble,
    )
    seen = {}

    def fake_convert(src, dst, dtype=None, progress=True, source_name=None, families=None):
        seen["digest"] = cache.source_digest(Path(src))
        seen["label"] = source_name
        Path(dst).mkdir(parents=True)
        (Path(dst) / MANIFEST).write_text("{}")
        return Path(dst)

    monkeypatch.setattr(convert_mod, "_default_package", lambda: pkg)
    monkeypatch.setattr(convert_mod, "convert", fake_convert)
    c = tmp_path / "cache"
    store = resolve_store(None, c, progress=False, families=STORE_FAMILIES)
    assert seen["digest"] == cache.content_digest(parts, cache.GGUF_HEAD)
    assert "m.gguf" in seen["label"]
    assert store.name.startswith("m-") and is_store(store)
    leftovers = [p for p in (c / "stores").rglob("*") if p.suffix == ".gguf"]
    assert leftovers == []  # the joined GGUF is gone
    assert (
        resolve_store(None, c, progress=False, families=STORE_FAMILIES) == store
    )  # cached: parts are not joined again


# -- processes racing on one conversion -----------------------------------------------------------

_RACER = """
import os, sys, time
from pathlib import Path
import ollm.storage.convert as cm
real = cm.convert
def counted(*args, **kwargs):  # a line per conversion this process starts
    with open(sys.argv[3] + ".log", "a") as f:
        f.write(f"{os.getpid()}\\n")
    return real(*args, **kwargs)
cm.convert = counted
go = Path(sys.argv[3])
while not go.exists():
    time.sleep(0.01)
from ollm.models.registry import STORE_FAMILIES
print(cm.resolve_store(sys.argv[1], sys.argv[2], progress=False, families=STORE_FAMILIES))
"""


def test_three_processes_convert_once(llama_dir, tmp_path):
    c, go = tmp_path / "cache", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(llama_dir), str(c), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for _ in range(3)
    ]
    time.sleep(1.0)  # let them import; then all start converting together
    go.touch()
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    # without the lock all three convert (and rename over each other's store)
    assert len((tmp_path / "go.log").read_text().split()) == 1
    assert _stores(c) == [Path(paths.pop()).name]
    assert [p.name for p in (c / "stores").iterdir() if ".tmp-" in p.name] == []


# -- ls / rm --------------------------------------------------------------------------------------


def test_list_and_remove(llama_dir, tmp_path):
    c = tmp_path / "cache"
    a = resolve_store(llama_dir, c, progress=False, families=STORE_FAMILIES)
    b = resolve_store(llama_dir, c, dtype=torch.bfloat16, progress=False, families=STORE_FAMILIES)
    os.utime(a, (1, 1))  # a was used long ago
    infos = cache.list_stores(c)
    assert [i.name for i in infos] == [b.name, a.name]  # most recently used first
    assert {i.dtype for i in infos} == {"float32", "bfloat16"}
    assert all(i.source == str(llama_dir.resolve()) for i in infos)
    assert infos[1].nbytes >= LayerStore(a).total_nbytes
    assert not any(i.stale for i in infos)
    manifest = json.loads((a / MANIFEST).read_text())
    del manifest["converter"]  # as stores of the first converter were written
    (a / MANIFEST).write_text(json.dumps(manifest))
    assert [i.stale for i in cache.list_stores(c)] == [False, True]
    resolve_store(
        llama_dir, c, progress=False, families=STORE_FAMILIES
    )  # a use refreshes 'last used'
    assert cache.list_stores(c)[0].name == a.name

    opened = LayerStore(a)
    assert cache.store_in_use(a)
    with pytest.raises(OllmError, match="in use"):
        cache.remove_store(c, a.name)
    assert is_store(a)
    opened.close()
    assert not cache.store_in_use(a)
    cache.remove_store(c, a.name)
    assert not a.exists() and _stores(c) == [b.name]
    assert [p for p in (c / "stores").iterdir() if ".rm-" in p.name] == []
    with pytest.raises(OllmError, match="no store"):
        cache.remove_store(c, a.name)
    with pytest.raises(OllmError, match="no store"):
        cache.remove_store(c, "../stores")


def test_cli_cache_ls_and_rm(llama_dir, tmp_path):
    from typer.testing import CliRunner

    from ollm.cli import app

    c = tmp_path / "cache"
    store = resolve_store(llama_dir, c, progress=False, families=STORE_FAMILIES)
    runner = CliRunner()
    out = runner.invoke(app, ["cache", "ls", "--cache-dir", str(c), "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert [r["name"] for r in rows] == [store.name] and rows[0]["dtype"] == "float32"
    (c / "gguf").mkdir()
    (c / "gguf" / "old.gguf").write_bytes(b"x" * 5000)  # a GGUF joined by an older version
    out = runner.invoke(app, ["cache", "ls", "--cache-dir", str(c)], env={"COLUMNS": "300"})
    assert out.exit_code == 0 and store.name in out.stdout and "1 store(s)" in out.stdout
    assert "safe to delete" in out.stdout
    out = runner.invoke(app, ["cache", "rm", "--cache-dir", str(c), "--all"])
    assert out.exit_code == 0, out.output
    assert _stores(c) == []
    out = runner.invoke(app, ["cache", "rm", "--cache-dir", str(c), "nope"])
    assert out.exit_code != 0


# -- size estimate ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_estimate_matches_the_store(llama_dir, tmp_path, dtype):
    estimate = estimate_store_nbytes(llama_dir, dtype, families=STORE_FAMILIES)
    store = convert(llama_dir, tmp_path / "s", dtype=dtype, progress=False, families=STORE_FAMILIES)
    weights = LayerStore(store).total_nbytes
    side = sum(f.stat().st_size for f in llama_dir.iterdir() if not f.name.endswith(".safetensors"))
    assert estimate == weights + side  # weight files exactly, side files as in the source
    on_disk = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    assert abs(on_disk - estimate) < 0.05 * on_disk + 16_384


# -- progress ------------------------------------------------------------------------------------


def test_progress_logs_when_not_a_terminal(caplog, monkeypatch):
    import ollm.storage.progress as progress_mod

    monkeypatch.setattr(progress_mod, "_is_terminal", lambda: False)
    monkeypatch.setattr(progress_mod, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="ollm"):
        with heartbeat("parsing", every=0.05):
            time.sleep(0.3)
        assert list(progress_iter(range(3), "converting", "layer")) == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records]
    assert sum("parsing: still working" in m for m in lines) >= 2
    assert any(m.startswith("parsing: done") for m in lines)
    assert "converting: 3/3 layer(s), 0 s" in lines
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ollm"):  # the CLI's level without -v
        with heartbeat("quiet", every=0.01):
            time.sleep(0.05)
        assert list(progress_iter(range(3), "quiet")) == [0, 1, 2]
    assert caplog.records == []


# -- synthetic weights ----------------------------------------------------------------------------

_SYNTH = """
import hashlib
from ollm.models.registry import STORE_FAMILIES
from ollm.storage.synthetic import SyntheticSource
s = SyntheticSource("llama3-1b", families=STORE_FAMILIES, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256)
s.device = "cpu"
h = hashlib.sha256()
for n in s.names():
    h.update(s.get(n).view(-1).view(__import__("torch").uint8).numpy().tobytes())
print(h.hexdigest())
"""


def test_synthetic_weights_identical_across_processes(capsys):
    # this process and a child with another str-hash salt (hash() differs, crc32 does not)
    salt = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    r = subprocess.run(
        [sys.executable, "-c", _SYNTH],
        capture_output=True,
        text=True,
        env={**ENV, "PYTHONHASHSEED": salt},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    exec(_SYNTH, {})
    here = capsys.readouterr().out.strip()
    assert r.stdout.strip() == here and len(here) == 64
