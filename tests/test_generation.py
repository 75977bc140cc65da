"""Generation behaviour through the public API: batching with left padding, sampling seeds, stop
conditions, text streaming, disk offload, weight read errors and metrics."""

from __future__ import annotations

import queue
import shutil
import threading

import pytest
import torch

from conftest import char_tokenizer
from ollm import LLM, SamplingParams
from ollm.errors import CorruptStoreError, WeightReadError
from ollm.storage.store import layer_file

GREEDY = SamplingParams(temperature=0, max_new_tokens=16)
PROMPTS = [
    [7, 3],
    [5, 17, 99, 3, 42, 7, 250, 11, 64],
    [9, 1, 200, 33, 4, 18, 77, 120, 6, 45, 2, 199, 8, 31, 90, 15],
]


def call_with_timeout(fn, timeout: float = 30.0):
    """Run ``fn`` on a daemon thread; fail (not hang) if it does not return within ``timeout``.

    A daemon thread rather than concurrent.futures: the interpreter would join an executor's
    stuck worker at exit, so a hang would still hang the test run.
    """
    out: queue.Queue = queue.Queue()

    def work():
        try:
            out.put(("ok", fn()))
        except BaseException as exc:
            out.put(("err", exc))

    threading.Thread(target=work, daemon=True).start()
    try:
        kind, value = out.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"call did not return within {timeout} s (hang)")
    if kind == "err":
        raise value
    return value


def hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def llms(hf_models, tmp_path_factory):
    """family -> resident LLM (all layers in RAM) built once for this module."""
    cache = tmp_path_factory.mktemp("gen-cache")
    made: dict[str, LLM] = {}

    def get(family: str) -> LLM:
        if family not in made:
            _, path = hf_models(family)
            made[family] = LLM(path, device="cpu", max_batch=4, cache_dir=cache, progress=False)
        return made[family]

    yield get
    for llm in made.values():
        llm.close()


# -- batching -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_batch_matches_single_and_transformers(family, llms, hf_models):
    model, _ = hf_models(family)
    llm = llms(family)
    assert [p.tier for p in llm.plan.layers] == ["cpu"] * len(llm.plan.layers)
    singles = [llm.generate(p, GREEDY) for p in PROMPTS]
    batch = llm.generate(PROMPTS, GREEDY)
    assert isinstance(batch, list) and len(batch) == len(PROMPTS)
    for prompt, one, many in zip(PROMPTS, singles, batch, strict=True):
        assert many.prompt_token_ids == prompt
        assert many.token_ids == one.token_ids, f"prompt of length {len(prompt)}"
        assert len(one.token_ids) == GREEDY.max_new_tokens
        assert many.finish_reason == "length"
    # the longest prompt passes gemma3's sliding window (10) while padded in the batch
    for i in (0, 2):
        assert singles[i].token_ids == hf_greedy(model, PROMPTS[i], GREEDY.max_new_tokens)
    assert batch[0].metrics.prompt_tokens == sum(len(p) for p in PROMPTS)
    assert batch[0].metrics.generated_tokens == len(PROMPTS) * GREEDY.max_new_tokens


def test_batch_logits_match_single_step(llms):
    """Prefill logits of a padded row equal those of the same prompt alone (masks, positions)."""
    llm = llms("llama")
    runner = llm.runner
    single = []
    for p in PROMPTS:
        kv = runner.new_kv(1, len(p))
        single.append(runner.forward(torch.tensor([p]), torch.arange(len(p))[None], kv))
    width = max(len(p) for p in PROMPTS)
    ids = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    pos = torch.ones(len(PROMPTS), width, dtype=torch.long)
    keep = torch.ones(len(PROMPTS), width, dtype=torch.bool)
    for r, p in enumerate(PROMPTS):
        ids[r, width - len(p) :] = torch.tensor(p)
        pos[r, width - len(p) :] = torch.arange(len(p))
        keep[r, : width - len(p)] = False
    kv = runner.new_kv(len(PROMPTS), width)
    batched = runner.forward(ids, pos, kv, keep)
    torch.testing.assert_close(batched, torch.cat(single), atol=1e-4, rtol=1e-4)


# -- sampling and stopping ------------------------------------------------------------------------


def test_seeded_sampling(llms):
    llm = llms("llama")
    prompt = PROMPTS[1]

    def sample(seed, **kw):
        params = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=20, **kw)
        return llm.generate(prompt, params).token_ids

    a = sample(1)
    assert len(a) == 20
    assert sample(1) == a
    assert sample(2) != a
    assert sample(3) != a
    assert sample(1, top_k=5) == sample(1, top_k=5)
    # top_k=1 is greedy whatever the seed
    topk1 = SamplingParams(temperature=1.0, top_k=1, seed=5, max_new_tokens=16)
    assert llm.generate(prompt, topk1).token_ids == llm.generate(prompt, GREEDY).token_ids


def test_seeded_sampling_in_a_batch(llms):
    llm = llms("llama")
    params = SamplingParams(temperature=1.0, seed=11, max_new_tokens=12)
    first = [r.token_ids for r in llm.generate(PROMPTS, params)]
    again = [r.token_ids for r in llm.generate(PROMPTS, params)]
    assert first == again


def test_stop_token_ids_and_length(llms):
    llm = llms("llama")
    prompt = PROMPTS[1]
    full = llm.generate(prompt, SamplingParams(temperature=0, max_new_tokens=20)).token_ids
    cut = next(i for i in range(1, len(full)) if full[i] not in full[:i])
    stopped = llm.generate(
        prompt, SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=[full[cut]])
    )
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == full[:cut]
    assert stopped.metrics.generated_tokens == cut
    first = llm.generate(
        prompt, SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=full[0])
    )
    assert first.finish_reason == "stop" and first.token_ids == []
    short = llm.generate(prompt, SamplingParams(temperature=0, max_new_tokens=5))
    assert short.finish_reason == "length"
    assert short.token_ids == full[:5]
    one = llm.generate(prompt, SamplingParams(temperature=0, max_new_tokens=1))
    assert one.finish_reason == "length" and one.token_ids == full[:1]


def test_mixed_finish_reasons_in_batch(llms):
    llm = llms("llama")
    alone = [llm.generate(p, GREEDY).token_ids for p in PROMPTS]
    stop_tok = alone[0][3]
    cut = alone[0].index(stop_tok)
    params = SamplingParams(temperature=0, max_new_tokens=16, stop_token_ids=stop_tok)
    res = llm.generate(PROMPTS, params)
    assert res[0].finish_reason == "stop" and res[0].token_ids == alone[0][:cut]
    for r, ref in zip(res[1:], alone[1:], strict=True):
        expected = ref[: ref.index(stop_tok)] if stop_tok in ref else ref
        assert r.token_ids == expected  # a finished row does not disturb the others
    reasons = {r.finish_reason for r in res}
    assert res[0].metrics.finish_reason == (reasons.pop() if len(reasons) == 1 else "mixed")


# -- text streaming ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_llm(hf_models, tmp_path_factory):
    _, path = hf_models("llama")
    root = tmp_path_factory.mktemp("text")
    model_dir = root / "llama-tok"
    shutil.copytree(path, model_dir)
    char_tokenizer().save_pretrained(str(model_dir))
    llm = LLM(model_dir, device="cpu", cache_dir=root / "cache", progress=False)
    yield llm
    llm.close()


def test_stream_equals_generate(text_llm):
    llm = text_llm
    assert llm.tokenizer is not None
    assert (llm.store_path / "tokenizer.json").is_file()  # the store carries the tokenizer
    params = SamplingParams(temperature=0, max_new_tokens=24)
    res = llm.generate("hello world", params)
    assert res.prompt_token_ids == llm.tokenizer("hello world")["input_ids"]
    assert res.text == llm.tokenizer.decode(res.token_ids, skip_special_tokens=True)
    stream = llm.stream("hello world", params)
    pieces = list(call_with_timeout(lambda: list(stream)))
    assert "".join(pieces) == res.text
    assert stream.result is not None
    assert stream.result.token_ids == res.token_ids
    assert stream.result.finish_reason == "length"


def test_stop_strings_cut_text(text_llm):
    llm = text_llm
    params = SamplingParams(temperature=0, max_new_tokens=24)
    text = llm.generate("hello world", params).text
    assert len(text) >= 6
    cut = next(i for i in range(2, len(text) - 1) if text[i : i + 2] not in text[: i + 1])
    stop = text[cut : cut + 2]
    stopped_params = SamplingParams(temperature=0, max_new_tokens=24, stop=[stop, "@@@"])
    res = llm.generate("hello world", stopped_params)
    assert res.finish_reason == "stop"
    assert res.text == text[:cut]
    assert stop not in res.text
    stream = llm.stream("hello world", stopped_params)
    assert "".join(call_with_timeout(lambda: list(stream))) == text[:cut]
    assert stream.result.finish_reason == "stop"
    # a stop string that never appears changes nothing
    res = llm.generate("hello world", SamplingParams(temperature=0, max_new_tokens=24, stop="@@@"))
    assert res.text == text and res.finish_reason == "length"


def test_stream_abandoned_early(text_llm):
    """Breaking out of a stream cancels generation and leaves the LLM usable."""
    llm = text_llm
    params = SamplingParams(temperature=0, max_new_tokens=24)
    expected = llm.generate("abc", params).text

    def take_two():
        stream = llm.stream("abc", params)
        it = iter(stream)
        got = [next(it), next(it)]
        it.close()
        return got

    got = "".join(call_with_timeout(take_two))
    assert len(got) >= 2 and expected.startswith(got)
    assert call_with_timeout(lambda: llm.generate("abc", params)).text == expected


# -- disk offload ---------------------------------------------------------------------------------


def test_score_disk_equals_resident(llms, hf_models, tmp_path):
    resident = llms("llama")
    _, path = hf_models("llama")
    with LLM(path, device="cpu", offload="disk", cache_dir=tmp_path, progress=False) as disk:
        assert [p.tier for p in disk.plan.layers] == ["disk"] * 4
        seq = PROMPTS[2] + PROMPTS[1]
        torch.testing.assert_close(disk.score(seq), resident.score(seq), atol=1e-6, rtol=0)
        assert (
            disk.generate(PROMPTS[1], GREEDY).token_ids
            == resident.generate(PROMPTS[1], GREEDY).token_ids
        )
        # a second score after generation: the streamed-layer order restarts correctly
        torch.testing.assert_close(disk.score(seq), resident.score(seq), atol=1e-6, rtol=0)


def test_weight_read_error_raises_then_recovers(hf_models, tmp_path):
    _, path = hf_models("llama")
    llm = LLM(path, device="cpu", offload="disk", cache_dir=tmp_path, progress=False)
    try:
        expected = call_with_timeout(lambda: llm.generate(PROMPTS[1], GREEDY)).token_ids
        # the last layer: the reader cannot have read it ahead (the ring holds fewer slots)
        target = llm.store_path / layer_file(3)
        backup = tmp_path / "backup.bin"
        shutil.copy2(target, backup)
        target.unlink()
        with pytest.raises((WeightReadError, CorruptStoreError), match="layer_0003"):
            call_with_timeout(lambda: llm.generate(PROMPTS[1], GREEDY))
        with pytest.raises((WeightReadError, CorruptStoreError)):  # still missing: fails again
            call_with_timeout(lambda: llm.score(PROMPTS[2]))
        shutil.copy2(backup, target)
        again = call_with_timeout(lambda: llm.generate(PROMPTS[1], GREEDY))
        assert again.token_ids == expected

        # a truncated file (short read) surfaces the same way
        with open(target, "r+b") as fh:
            fh.truncate(4096)
        with pytest.raises((WeightReadError, CorruptStoreError), match="layer_0003"):
            call_with_timeout(lambda: llm.generate(PROMPTS[0], GREEDY))
        shutil.copy2(backup, target)
        again = call_with_timeout(lambda: llm.generate(PROMPTS[1], GREEDY))
        assert again.token_ids == expected
    finally:
        llm.close()


# -- metrics --------------------------------------------------------------------------------------


def test_metrics(llms, hf_models, tmp_path):
    resident = llms("llama")
    params = SamplingParams(temperature=0, max_new_tokens=6)
    res = resident.generate(PROMPTS[1], params)
    m = res.metrics
    assert m.prompt_tokens == len(PROMPTS[1])
    assert m.generated_tokens == 6 == len(res.token_ids)
    assert m.prefill_seconds > 0 and m.decode_seconds > 0
    assert m.time_to_first_token == m.prefill_seconds
    assert m.decode_tokens_per_second > 0 and m.prefill_tokens_per_second > 0
    assert m.bytes_read_disk == 0  # everything was read at construction
    assert m.bytes_copied_h2d == 0 and m.peak_gpu_memory == 0
    assert m.finish_reason == "length"
    assert set(m.to_dict()) >= {"prompt_tokens", "bytes_read_disk", "decode_tokens_per_second"}

    _, path = hf_models("llama")
    with LLM(path, device="cpu", offload="disk", cache_dir=tmp_path, progress=False) as disk:
        res = disk.generate(PROMPTS[1], params)
        m = res.metrics
        assert m.prompt_tokens == len(PROMPTS[1]) and m.generated_tokens == 6
        assert m.prefill_seconds > 0 and m.decode_seconds > 0
        layers = sum(disk.store.layer_nbytes(i) for i in range(4))
        # every layer is read once per forward pass (1 prefill + 5 decode steps); the reader may
        # run at most one ring's worth of layers ahead into the next pass
        assert m.bytes_read_disk > 0
        assert 5 * layers <= m.bytes_read_disk <= 6 * layers + 3 * disk.store.max_layer_nbytes
        assert m.read_seconds > 0


@pytest.mark.parametrize("background", [False, True])
def test_offloaded_kv_cache_matches_device_cache(background):
    """Three layers' OffloadedKVCaches sharing one scratch (prefill chunks through the scratch,
    decode where the KV lives) attend exactly like plain caches; with ``background`` their
    buffers are allocated by another thread, as the runner does for pinned RAM."""
    from concurrent.futures import ThreadPoolExecutor

    from ollm.kv.cache import LayerKVCache
    from ollm.kv.offload import KVScratch, OffloadedKVCache
    from ollm.layers.attention import AttentionMask

    torch.manual_seed(0)
    scratch = KVScratch(2, 2, 16, 60, torch.float32, "cpu")
    pool = ThreadPoolExecutor(1) if background else None
    off = [
        OffloadedKVCache(2, 2, 16, 60, torch.float32, scratch, decode_tokens=2, allocator=pool)
        for _ in range(3)
    ]
    if pool is not None:
        pool.shutdown(wait=False)
    assert off[0].nbytes == 2 * 2 * 2 * 60 * 16 * 4
    ref = [LayerKVCache(2, 2, 16, 60, torch.float32, "cpu") for _ in range(3)]
    for step, t in enumerate([20, 7, 1, 1, 5, 1]):  # prefill chunks, decode, a later chunk
        for layer in range(3):
            q, k, v = torch.randn(2, 8, t, 16), torch.randn(2, 2, t, 16), torch.randn(2, 2, t, 16)
            start = ref[layer].length
            mask = AttentionMask(start, t, start + t)
            a = off[layer].attend(q, k, v, mask, 0.25, None)
            b = ref[layer].attend(q, k, v, mask, 0.25, None)
            torch.testing.assert_close(a, b, msg=f"step {step} layer {layer}")
    for o, r in zip(off, ref, strict=True):
        o.flush()
        torch.testing.assert_close(o.k[:, :, : r.length], r.k[:, :, : r.length])
        o.close()


def test_plan_grows_for_a_longer_request_and_says_what_fits(hf_models, tmp_path):
    from ollm.errors import BudgetError

    _, path = hf_models("llama")
    llm = LLM(
        path, device="cpu", max_context=16, cpu_memory="200MiB", cache_dir=tmp_path, progress=False
    )
    try:
        res = llm.generate(list(range(1, 40)), SamplingParams(max_new_tokens=4, temperature=0))
        assert len(res.token_ids) == 4 and llm.workload.context >= 43
    finally:
        llm.close()
    with pytest.raises(BudgetError, match="fits at most"):
        LLM(
            path,
            device="cpu",
            max_context=10**6,
            cpu_memory="120MiB",
            cache_dir=tmp_path,
            progress=False,
        )


def test_close_gives_cuda_memory_back(hf_models, tmp_path, monkeypatch):
    """An engine on a CUDA device empties the allocator's cache when it closes (an LLM made next
    in the process gets segments sized for its own plan); one on the CPU leaves CUDA alone."""
    _, path = hf_models("llama")
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    llm = LLM(path, device="cpu", cache_dir=tmp_path / "c", progress=False)
    llm.close()
    assert calls == []
    llm = LLM(path, device="cpu", cache_dir=tmp_path / "c", progress=False)
    llm.engine.device = "cuda:0"  # as an engine planned for the GPU records it
    llm.close()
    assert calls == [1]
