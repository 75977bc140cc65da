"""The ``ollm`` command line, run in-process through typer's CliRunner on tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import char_tokenizer, make_hf_model
from ollm.cli import app

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _char_tokenizer():
    """The tests' character-level tokenizer with a simple chat template."""
    return char_tokenizer(CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny llama with a chat-template tokenizer, an unsupported model and a shared cache."""
    root = tmp_path_factory.mktemp("cli")
    model = root / "llama"
    make_hf_model("llama", model)
    _char_tokenizer().save_pretrained(str(model))
    gpt2 = root / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(gpt2 / "model.safetensors"))
    return {"root": root, "model": str(model), "gpt2": str(gpt2), "cache": str(root / "cache")}


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def run_json(env, *args: str) -> dict:
    res = invoke(
        "run", *args, "--model", env["model"], "--cache-dir", env["cache"], "--device", "cpu"
    )
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def stderr_lines(text: str) -> list[str]:
    """Non-empty stderr lines other than the ``ollm: ...`` progress lines of long waits."""
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("ollm: ")]


def assert_one_line_error(res, *fragments: str) -> None:
    assert res.exit_code == 2, res.output
    lines = stderr_lines(res.stderr)
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), lines
    for f in fragments:
        assert f in lines[0], lines[0]
    assert "Traceback" not in res.output


def test_run_json(env):
    out = run_json(env, "hello", "--json", "--temperature", "0", "--max-new-tokens", "5")
    assert set(out) == {"text", "token_ids", "finish_reason", "metrics"}
    assert len(out["token_ids"]) == 5
    assert out["finish_reason"] == "length"
    m = out["metrics"]
    for key in ("prompt_tokens", "generated_tokens", "prefill_seconds", "decode_tokens_per_second"):
        assert key in m
    assert m["generated_tokens"] == 5
    again = run_json(env, "hello", "--json", "--temperature", "0", "--max-new-tokens", "5")
    assert again["token_ids"] == out["token_ids"]


def test_run_streams_text_then_table(env):
    greedy = run_json(env, "hello", "--json", "--temp", "0", "-n", "6")
    res = invoke(
        "run", "hello", "-m", env["model"], "--cache-dir", env["cache"], "--temp", "0", "-n", "6"
    )
    assert res.exit_code == 0, res.output
    text, _, table = res.stdout.partition("\n\n")
    assert text.rstrip("\n") == greedy["text"]
    assert "generated tokens" in table and "finish reason" in table
    assert "length" in table


def test_chat_template_and_raw(env):
    chat = run_json(env, "hi", "--json", "--temp", "0", "-n", "3")
    raw = run_json(env, "hi", "--json", "--temp", "0", "-n", "3", "--raw")
    assert raw["metrics"]["prompt_tokens"] == 2  # "h", "i": no BOS in this tokenizer
    assert chat["metrics"]["prompt_tokens"] == len("<user>hi\n<assistant>")
    assert len(chat["token_ids"]) == len(raw["token_ids"]) == 3


def test_sampling_flags(env):
    a = run_json(env, "abc", "--json", "--temp", "1.0", "--seed", "7", "--top-k", "20", "-n", "8")
    b = run_json(env, "abc", "--json", "--temp", "1.0", "--seed", "7", "--top-k", "20", "-n", "8")
    assert a["token_ids"] == b["token_ids"]
    greedy = run_json(env, "abc", "--json", "--temp", "0", "-n", "8")
    text = greedy["text"]
    cut = next(i for i in range(1, len(text)) if text[i] not in text[:i])
    stopped = run_json(
        env, "abc", "--json", "--temp", "0", "-n", "8", "--stop", text[cut], "--stop", "@@"
    )
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == text[:cut]


def test_prompt_file(env, tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("hello", encoding="utf-8")
    from_file = run_json(env, "--prompt-file", str(f), "--json", "--temp", "0", "-n", "4")
    from_arg = run_json(env, "hello", "--json", "--temp", "0", "-n", "4")
    assert from_file["token_ids"] == from_arg["token_ids"]


def test_convert(env):
    dst = env["root"] / "store"
    res = invoke("convert", env["model"], str(dst), "--dtype", "bfloat16")
    assert res.exit_code == 0, res.output
    assert str(dst) in res.stdout and "KiB" in res.stdout
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16"
    again = invoke("convert", env["model"], str(dst))
    assert_one_line_error(again, "already exists")
    over = invoke("convert", env["model"], str(dst), "--overwrite")
    assert over.exit_code == 0, over.output
    assert json.loads((dst / "manifest.json").read_text())["dtype"] == "float32"
    # a store runs directly, without another conversion
    out = run_json(env, "hi", "--json", "--temp", "0", "-n", "2", "--raw")
    direct = invoke("run", "hi", "--json", "--temp", "0", "-n", "2", "--raw", "-m", str(dst))
    assert direct.exit_code == 0, direct.output
    assert json.loads(direct.stdout)["token_ids"] == out["token_ids"]


def test_info(env):
    res = invoke("info", env["model"], "--cache-dir", env["cache"], "--json", "--offload", "disk")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["model_type"] == "llama" and data["layers"] == 4
    assert data["plan"]["device"] == "cpu"
    assert data["plan"]["layers"] == "0 on GPU, 0 in RAM, 4 on disk"
    table = invoke("info", env["model"], "--cache-dir", env["cache"], "--max-context", "128")
    assert table.exit_code == 0, table.output
    assert "llama" in table.stdout and "plan: layers" in table.stdout


@pytest.mark.parametrize(
    "case",
    [
        "missing model",
        "malformed size",
        "cuda absent",
        "unsupported type",
        "no prompt",
        "empty prompt",
        "empty prompt file",
        "two prompts",
        "missing prompt file",
        "bad sampling",
        "bad offload",
        "bad dtype",
        "info missing model",
    ],
)
def test_errors_are_one_line(env, case, tmp_path):
    m, c = env["model"], env["cache"]
    empty = tmp_path / "e.txt"
    empty.write_text("", encoding="utf-8")
    args, fragments = {
        "missing model": (["run", "hi", "-m", str(tmp_path / "nope")], ["not found"]),
        "malformed size": (["run", "hi", "-m", m, "--gpu-memory", "8XB"], ["8XB"]),
        "cuda absent": (["run", "hi", "-m", m, "--device", "cuda:0"], ["cuda:0", "--device cpu"]),
        "unsupported type": (
            ["run", "hi", "-m", env["gpt2"], "--cache-dir", c],
            ["gpt2", "llama", "qwen3"],
        ),
        "no prompt": (["run", "-m", m], ["prompt"]),
        "empty prompt": (["run", "", "-m", m], ["prompt is empty", "at least one token"]),
        "empty prompt file": (["run", "-f", str(empty), "-m", m], ["prompt is empty", "e.txt"]),
        "two prompts": (["run", "hi", "-f", str(tmp_path / "p.txt"), "-m", m], ["not both"]),
        "missing prompt file": (["run", "-f", str(tmp_path / "p.txt"), "-m", m], ["p.txt"]),
        "bad sampling": (["run", "hi", "-m", m, "--cache-dir", c, "--top-p", "0"], ["top_p"]),
        "bad offload": (["run", "hi", "-m", m, "--offload", "gpu"], ["offload"]),
        "bad dtype": (["convert", m, str(tmp_path / "s"), "--dtype", "int8"], ["dtype"]),
        "info missing model": (["info", str(tmp_path / "nope")], ["not found"]),
    }[case]
    if case == "cuda absent" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert_one_line_error(invoke(*args), *fragments)


def test_keyboard_interrupt(env, monkeypatch):
    import ollm.cli.common

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ollm.cli.common, "build_llm", interrupted)
    res = invoke("run", "hi", "-m", env["model"])
    assert res.exit_code == 130
    assert res.stderr.strip() == "interrupted"


def test_console_script_and_light_import():
    script = Path(sys.executable).with_name("ollm")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert "run" in res.stdout and "convert" in res.stdout and "info" in res.stdout
    code = "import sys, ollm.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_run_with_kv_on_disk(env, tmp_path):
    mem = run_json(env, "hello there", "--json", "--temp", "0", "-n", "6")
    disk = run_json(
        env,
        "hello there",
        "--json",
        "--temp",
        "0",
        "-n",
        "6",
        "--kv-cache",
        "disk",
        "--kv-dir",
        str(tmp_path),
    )
    assert disk["token_ids"] == mem["token_ids"]
    assert list(tmp_path.iterdir()) == []  # the run's KV directory is gone


def test_help_habits():
    from ollm.engine.sampling import SamplingParams

    for args in (["run", "--help"], ["run", "-h"], ["chat", "-h"], ["info", "-h"], ["--help"]):
        res = invoke(*args)
        assert res.exit_code == 0, res.output
        for tag in ("<str>", "<bool>", "<int>", "<float>", "<path>"):
            assert tag not in res.stdout, (args, tag)
    wide = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "240"})
    text = " ".join(wide.stdout.split())
    defaults = SamplingParams()
    assert f"[default: {defaults.max_new_tokens}]" in text
    assert f"Sampling temperature; 0 = greedy. [default: {defaults.temperature}]" in text
    assert "--temperature,--temp" in text and "--threads -t" in text
    bare = invoke()
    assert bare.exit_code == 0 and "Usage" in bare.stdout and "chat" in bare.stdout
    from importlib.metadata import version

    assert invoke("--version").stdout.strip() == f"ollm {version('ollm')}"


def test_threads_default_and_flag(env):
    from ollm.cli.common import physical_cores

    base = ["info", env["model"], "--cache-dir", env["cache"], "--json", "--device", "cpu"]
    before = torch.get_num_threads()
    try:
        res = invoke(*base, "-t", "1")
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["threads"] == 1
        res = invoke(*base)
        assert json.loads(res.stdout)["threads"] == physical_cores()
    finally:
        torch.set_num_threads(before)
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)


def test_gpu_budget_needs_a_gpu(env):
    res = invoke("run", "hi", "-m", env["model"], "--device", "cpu", "--gpu-memory", "4GiB")
    assert_one_line_error(res, "--gpu-memory", "--device cpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    res = invoke("run", "hi", "-m", env["model"], "--gpu-memory", "4GiB")
    assert_one_line_error(res, "--gpu-memory", "CUDA")


def test_cpu_metrics_show_cpu_rows_only(env):
    res = invoke("run", "hi", "-m", env["model"], "--cache-dir", env["cache"], "--device", "cpu")
    assert res.exit_code == 0, res.output
    table = res.stdout.rpartition("\n\n")[2]
    assert "decode" in table and "read from disk" in table
    assert "GPU" not in table  # no peak GPU memory, copies to or stalls of the GPU


def test_slow_waits_log_lines_quick_ones_stay_silent(capsys):
    import logging
    import time

    from ollm.cli.status import configure_logging, waiting

    configure_logging(verbose=False)  # stderr is not a terminal under pytest: INFO lines shown
    log = logging.getLogger("ollm.test")
    with waiting("quick step", delay=5.0):
        log.info("detail of a quick step")
    assert capsys.readouterr().err == ""
    with waiting("slow step", delay=0.05):
        log.info("detail held until the wait proves long")
        time.sleep(1.0)  # 20 x the delay: the timer fires even on a loaded machine
        log.info("detail after")
    lines = capsys.readouterr().err.splitlines()
    assert lines[:3] == [
        "ollm: slow step ...",
        "ollm: detail held until the wait proves long",
        "ollm: detail after",
    ]
    assert lines[3].startswith("ollm: slow step: done in ") and len(lines) == 4


def test_sigterm_cleans_up_and_exits_143(env, tmp_path):
    """SIGTERM in the middle of decoding: the per-run KV directory is removed, one line, 143."""
    import signal

    kv = tmp_path / "kv"
    kv.mkdir()
    script = Path(sys.executable).with_name("ollm")
    args = [str(script), "run", "hello", "-m", env["model"], "--cache-dir", env["cache"]]
    args += ["--device", "cpu", "--raw", "-n", "20000", "--kv-cache", "disk", "--kv-dir", str(kv)]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        first = proc.stdout.read(1)  # decoding has started (text streams)
        assert first, proc.stderr.read().decode()
        assert any(kv.iterdir())  # the run's KV directory exists while it decodes
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err.decode()
    assert stderr_lines(err.decode()) == ["terminated"]
    assert list(kv.iterdir()) == []


def _engine_kwargs(env, monkeypatch, flags: tuple) -> list[dict]:
    """The keyword arguments the CLI builds the engine with for ``run`` with ``flags[0]``,
    ``info`` with ``flags[1]`` and ``info`` with ``flags[2]`` (None: no flag)."""
    seen: list[dict] = []

    class Built(Exception):
        pass

    def fake_llm(model, **kwargs):
        seen.append(kwargs)
        raise Built

    monkeypatch.setattr("ollm.api.LLM", fake_llm)
    base = ("--cache-dir", env["cache"], "--device", "cpu")
    heads = (("run", "hi", "--model", env["model"]), ("info", env["model"]), ("info", env["model"]))
    for head, flag in zip(heads, flags, strict=True):
        res = invoke(*head, *base, *(() if flag is None else (flag,)))
        assert isinstance(res.exception, Built), res.output
    return seen


def test_expert_lookahead_flag_reaches_the_engine(env, monkeypatch):
    """``--expert-lookahead`` (issue 19) is passed to the engine as ``expert_lookahead=True``
    by run and info, left to the default when not given, and listed by bench."""
    seen = _engine_kwargs(env, monkeypatch, ("--expert-lookahead", "--expert-lookahead", None))
    assert [kw.get("expert_lookahead") for kw in seen] == [True, True, None]
    assert "--expert-lookahead" in invoke("bench", "--help").stdout


def test_decode_resident_flag_reaches_the_engine(env, monkeypatch):
    """``--decode-resident`` (opt-in: off by default until a device budget check passes) is
    passed as ``decode_resident=True`` by run and info, ``--no-decode-resident`` as False, left
    to the default (``EngineConfig.decode_resident`` False) when not given; listed by bench."""
    from ollm.config import EngineConfig

    seen = _engine_kwargs(env, monkeypatch, ("--decode-resident", "--no-decode-resident", None))
    assert [kw.get("decode_resident") for kw in seen] == [True, False, None]
    assert EngineConfig().decode_resident is False
    assert "--decode-resident" in invoke("bench", "--help").stdout


def test_mlp_cpu_flag_reaches_the_engine(env, monkeypatch):
    """``--mlp-cpu`` (``planning/mlp_cpu.py``) is passed as ``mlp_cpu=True`` by run and
    info, ``--no-mlp-cpu`` as False, left to the default (True) when not given; listed by
    bench and chat."""
    from ollm.config import EngineConfig

    seen = _engine_kwargs(env, monkeypatch, ("--mlp-cpu", "--no-mlp-cpu", None))
    assert [kw.get("mlp_cpu") for kw in seen] == [True, False, None]
    assert EngineConfig().mlp_cpu is True
    assert "--mlp-cpu" in invoke("bench", "--help").stdout
    assert "--mlp-cpu" in invoke("chat", "--help").stdout
