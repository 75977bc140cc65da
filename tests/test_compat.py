"""The upstream oLLM API (``ollm.compat``): README flow on a tiny llama, placement, errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import conftest
from conftest import make_hf_model
from ollm import Inference
from ollm.compat import DiskCache, TextStreamer, _cpu_budget, file_get_contents
from ollm.engine.sampling import SamplingParams
from ollm.errors import DeviceError, ModelNotFoundError
from ollm.planning.placement import plan_placement
from test_cli import _char_tokenizer

LAYERS = 6  # enough layers that 2 in RAM + 2 stream buffers is less than all of them


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``models_dir`` holding ``tiny-llama`` (6 layers, chat-template tokenizer) and a cache."""
    root = tmp_path_factory.mktemp("compat")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conftest, "TINY", {**conftest.TINY, "num_hidden_layers": LAYERS})
        make_hf_model("llama", root / "models" / "tiny-llama")
    _char_tokenizer().save_pretrained(str(root / "models" / "tiny-llama"))
    return SimpleNamespace(dir=root / "models", cache=str(root / "cache"))


@pytest.fixture(scope="module")
def o(models):
    inf = Inference("tiny-llama", device="cpu", cache_dir=models.cache, progress=False)
    inf.ini_model(models_dir=models.dir, force_download=False)
    yield inf
    inf.llm.close()


class Recorder(TextStreamer):
    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.puts, self.text, self.ended = [], "", 0

    def put(self, value):
        self.puts.append(value.clone())
        super().put(value)

    def on_finalized_text(self, text, stream_end=False):
        self.text += text

    def end(self):
        self.ended += 1
        super().end()


def test_readme_flow(o, tmp_path):
    assert o.device == torch.device("cpu")
    assert o.llm.plan.count("disk") == LAYERS  # upstream streams every layer by default
    o.offload_layers_to_cpu(layers_num=2)
    assert o.llm.plan.count("cpu") == 2 and o.llm.plan.count("disk") == LAYERS - 2
    past_key_values = o.DiskCache(cache_dir=tmp_path / "kv_cache")
    assert isinstance(past_key_values, DiskCache)
    streamer = Recorder(o.tokenizer, skip_prompt=True, skip_special_tokens=False)
    messages = [
        {"role": "system", "content": "You are helpful AI assistant"},
        {"role": "user", "content": "List planets"},
    ]
    input_ids = o.tokenizer.apply_chat_template(
        messages, reset=True, add_generation_prompt=True, return_tensors="pt"
    ).to(o.device)
    outputs = o.model.generate(
        input_ids=input_ids, past_key_values=past_key_values, max_new_tokens=7, streamer=streamer
    ).cpu()
    t = input_ids.shape[-1]
    assert (tmp_path / "kv_cache").is_dir() and not list((tmp_path / "kv_cache").iterdir())
    assert outputs.shape == (1, t + 7) and outputs.dtype == torch.long
    assert torch.equal(outputs[0, :t], input_ids[0])
    new = outputs[0][t:].tolist()
    ref = o.llm.generate(input_ids[0].tolist(), SamplingParams(max_new_tokens=7, temperature=0))
    assert new == ref.token_ids
    assert torch.equal(streamer.puts[0], input_ids)  # the prompt once, then one token per put
    assert [p.tolist() for p in streamer.puts[1:]] == [[tok] for tok in new]
    assert streamer.ended == 1
    answer = o.tokenizer.decode(outputs[0][t:], skip_special_tokens=False)
    assert streamer.text == answer == ref.text


@pytest.mark.parametrize("layers_num", [0, 1, 3])
def test_offload_layers_to_cpu_counts(o, layers_num):
    o.offload_layers_to_cpu(layers_num=layers_num)
    assert o.llm.plan.count("cpu") == layers_num
    assert o.llm.plan.count("disk") == LAYERS - layers_num
    o.offload_layers_to_cpu(layers_num=LAYERS)
    assert o.llm.plan.count("cpu") == LAYERS


def test_cuda_budget_plan(o):
    """On a GPU device layers the GPU budget leaves over go to (pinned) RAM, N of them."""
    llm = o.llm
    elem = torch.finfo(llm.dtype).bits // 8
    base = plan_placement(llm.spec, llm.store, "cuda:0", None, None, "disk", llm.workload, elem)
    fixed = sum(
        v for k, v in base.reserved.items() if k not in ("resident layers", "stream buffers")
    )
    layer = llm.store.max_layer_nbytes
    for gpu_layers, gpu in [(0, fixed + 2 * layer), (1, fixed + 3 * layer)]:
        fake = SimpleNamespace(
            spec=llm.spec, store=llm.store, device="cuda:0", dtype=llm.dtype,
            workload=llm.workload, plan=SimpleNamespace(budget=gpu),
        )  # fmt: skip
        cpu = _cpu_budget(fake, 2)
        plan = plan_placement(llm.spec, llm.store, "cuda:0", gpu, cpu, "auto", llm.workload, elem)
        assert (plan.count("gpu"), plan.count("cpu")) == (gpu_layers, 2)


def test_batch_with_attention_mask(o):
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    ids = torch.tensor([prompts[0], [0, 0, *prompts[1]]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    out = o.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4)
    assert out.shape == (2, 9)
    assert torch.equal(out[:, :5], ids)
    for row, p in zip(out, prompts, strict=True):
        ref = o.llm.generate(p, SamplingParams(max_new_tokens=4, temperature=0))
        assert row[5:].tolist() == ref.token_ids
    sampled = o.model.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=True, top_k=5)
    assert sampled.shape == (1, 8)


def test_missing_model_and_download(models, tmp_path):
    o = Inference("llama3-1B-chat", device="cpu", cache_dir=models.cache)
    with pytest.raises(ModelNotFoundError, match="does not download") as err:
        o.ini_model(models_dir=tmp_path)
    assert str(tmp_path / "llama3-1B-chat") in str(err.value)
    with pytest.raises(ModelNotFoundError, match="not support downloading"):
        Inference("tiny-llama", device="cpu").ini_model(models.dir, force_download=True)


def test_cuda_absent(models):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    o = Inference("tiny-llama", cache_dir=models.cache)  # upstream's default device "cuda:0"
    assert o.device == torch.device("cuda:0")
    with pytest.raises(DeviceError) as err:
        o.ini_model(models_dir=models.dir)
    assert "cuda:0" in str(err.value) and "\n" not in str(err.value)
    assert 'device="cpu"' in str(err.value) and "--device" not in str(err.value)  # Python words


def test_file_get_contents(tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("héllo\nworld", encoding="utf-8")
    assert file_get_contents(f) == file_get_contents(str(f)) == "héllo\nworld"


def test_logging_prints_timing_lines(o, capsys):
    o.model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3)
    err = capsys.readouterr().err.splitlines()
    (line,) = [ln for ln in err if ln.startswith("ollm stats: ")]
    assert "prompt tokens: 3" in line and "generated tokens: 3" in line and "decode" in line
    assert "GPU" not in line  # a CPU run: no GPU memory, copy or stall rows
    o.logging = False
    try:
        o.model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3)
        assert "ollm stats" not in capsys.readouterr().err
    finally:
        o.logging = True


def test_offload_message_says_why(o, capsys):
    o.offload_layers_to_cpu(layers_num=LAYERS - 1)  # + 2 stream buffers > keeping all of them
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"ollm: offload_layers_to_cpu({LAYERS - 1}): ")
    assert "stay in RAM" in line and "layers_num=" not in line
    assert o.llm.plan.count("cpu") == LAYERS
    o.offload_layers_to_cpu(layers_num=2)
    assert capsys.readouterr().err == ""
