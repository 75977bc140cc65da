"""``ollm chat``: turns read from piped stdin, replies streamed with the model's chat template."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import char_tokenizer, make_hf_model
from ollm.cli import app

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
GREEDY = ["--temp", "0", "-n", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny llama twice: with a chat template and without one; a shared cache."""
    root = tmp_path_factory.mktemp("chat")
    make_hf_model("llama", root / "chat")
    char_tokenizer(TEMPLATE).save_pretrained(str(root / "chat"))
    make_hf_model("llama", root / "base")
    char_tokenizer().save_pretrained(str(root / "base"))
    return {"chat": str(root / "chat"), "base": str(root / "base"), "cache": str(root / "cache")}


def chat(models, stdin: str, model: str = "chat", *extra: str):
    args = ["chat", "-m", models[model], "--cache-dir", models["cache"], *GREEDY, *extra]
    return CliRunner().invoke(app, args, input=stdin)


def expected_replies(models, turns: list[str], system: str | None = None) -> list[str]:
    """What the library's own chat gives for the same turns, each seeing the history."""
    from ollm.api import LLM, SamplingParams

    params = SamplingParams(max_new_tokens=4, temperature=0)
    history = [{"role": "system", "content": system}] if system else []
    replies = []
    with LLM(models["chat"], device="cpu", cache_dir=models["cache"], progress=False) as llm:
        for turn in turns:
            history.append({"role": "user", "content": turn})
            replies.append(llm.chat(history, params).text)
            history.append({"role": "assistant", "content": replies[-1]})
    return replies


def joined(replies: list[str]) -> str:
    """The CLI ends every reply on a new line."""
    return "".join(r if r.endswith("\n") else r + "\n" for r in replies)


def test_turns_see_the_history_and_exit_ends(models):
    res = chat(models, "hi\n\nhow are you\n/exit\nnever read\n")
    assert res.exit_code == 0, res.output
    assert res.stdout == joined(expected_replies(models, ["hi", "how are you"]))


def test_end_of_input_ends_and_system_message(models):
    res = chat(models, "hello", "chat", "--system", "be brief")
    assert res.exit_code == 0, res.output
    assert res.stdout == joined(expected_replies(models, ["hello"], system="be brief"))


def test_model_without_template_is_refused_in_one_line(models):
    res = chat(models, "hi\n", "base")
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("ollm: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "chat template" in lines[0]
    assert res.stdout == ""
