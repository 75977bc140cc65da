"""The upstream oLLM API (``Inference``, ``file_get_contents``, ``TextStreamer``) over ``LLM``.

Models load only from ``models_dir/model_id`` (HF directory or .gguf); ollm never downloads.
``DiskCache(dir)`` keeps a call's KV on disk; ``model.generate`` feeds the streamer token by
token and leaves stop tokens out; ``apply_chat_template`` returns ids by default (as before
transformers 5) so upstream's README works unchanged."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from transformers import TextStreamer

from ollm.api import LLM
from ollm.engine.sampling import SamplingParams
from ollm.errors import ModelNotFoundError, OllmError
from ollm.telemetry.metrics import GenerationMetrics
from ollm.tiers import Tier

log = logging.getLogger(__name__)
__all__ = ["Inference", "CompatModel", "TextStreamer", "file_get_contents"]
_LAYER_KEYS = ("resident layers", "stream buffers")


def file_get_contents(path: str | Path) -> str:
    """The text of a UTF-8 file (upstream's helper for reading long prompts)."""
    return Path(path).read_text(encoding="utf-8")


class CompatModel:
    """``o.model``: an HF-style ``generate`` returning prompt + new tokens as a LongTensor."""

    def __init__(self, owner: Inference) -> None:
        self._owner = owner

    def generate(
        self,
        input_ids=None,
        attention_mask=None,
        past_key_values=None,
        max_new_tokens: int = 128,
        streamer=None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        **ignored: object,
    ) -> torch.Tensor:
        """Greedy unless ``do_sample``; ``[B, T + longest]`` on ``input_ids``' device.

        Shorter outputs are right-padded with the pad (else EOS, else 0) id; a stop token ends a
        sequence without being included. ``attention_mask`` zeros (left padding) are dropped from
        the prompts. ``past_key_values``: None, or ``Inference.DiskCache(dir)`` to keep the KV on disk.
        """
        llm = self._owner.llm
        if input_ids is not None and not torch.is_tensor(input_ids) and "input_ids" in input_ids:
            attention_mask = input_ids.get("attention_mask", attention_mask)  # a BatchEncoding
            input_ids = input_ids["input_ids"]
        if input_ids is None:
            raise OllmError("generate() needs input_ids (a LongTensor [batch, tokens])")
        kv_dir = None
        if isinstance(past_key_values, DiskCache):
            kv_dir = str(past_key_values.cache_dir)
        elif past_key_values is not None:
            log.warning("past_key_values is ignored: ollm keeps its own KV cache")
        ids = torch.as_tensor(input_ids).long()
        host = ids[None].cpu() if ids.dim() == 1 else ids.cpu()
        mask = torch.ones_like(host) if attention_mask is None else torch.as_tensor(attention_mask)
        rows = [r[m.bool()].tolist() for r, m in zip(host, mask.cpu().view_as(host), strict=True)]
        sampled = {"temperature": float(temperature), "top_k": top_k, "top_p": top_p}
        choice = sampled if do_sample else {"temperature": 0.0}
        params = SamplingParams(max_new_tokens=max_new_tokens, **choice)
        on_token = None
        if streamer is not None:
            streamer.put(host)
            if len(rows) == 1:  # HF streamers take one sequence: feed tokens as they come

                def on_token(_r: int, tok: int) -> None:
                    streamer.put(torch.tensor([tok]))

        results = llm.generate(rows, params, _on_token=on_token, _kv_dir=kv_dir)
        width, pad = max(len(r.token_ids) for r in results), self._pad_id(llm)
        new = [r.token_ids + [pad] * (width - len(r.token_ids)) for r in results]
        out = torch.tensor(new, dtype=torch.long).view(len(new), width)
        if streamer is not None:
            if on_token is None:  # a batch: the streamer gets each step's tokens at the end
                for step in range(width):
                    streamer.put(out[:, step])
            streamer.end()
        if self._owner.logging:  # upstream prints timings after each call; so do we, on stderr
            _print_stats(results[0].metrics, llm.device)
        return torch.cat([host, out], dim=1).to(ids.device)

    @staticmethod
    def _pad_id(llm: LLM) -> int:
        tok = llm.tokenizer
        ids = (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None))
        return next((int(i) for i in ids if i is not None), min(llm._eos_ids(), default=0))


class Inference:
    """Upstream oLLM's entry point: ``Inference(model_id, device)`` then ``ini_model()``.

    Extra keyword arguments go to ``LLM`` (e.g. ``cache_dir``, ``max_context``, ``gpu_memory``).
    """

    def __init__(
        self,
        model_id: str,
        device: str = "cuda:0",
        logging: bool = True,
        multimodality: bool = False,
        **llm_options: object,
    ) -> None:
        self.model_id, self.logging, self.multimodality = model_id, logging, multimodality
        self.device = torch.device(device)
        self._device_arg, self._options = device, llm_options
        self.path: Path | None = None
        self.llm: LLM | None = None
        self.model: CompatModel | None = None
        self.tokenizer = None

    def ini_model(self, models_dir: str | Path = "./models/", force_download: bool = False) -> None:
        """Load ``models_dir/model_id`` (an HF directory or a .gguf file); nothing is downloaded."""
        path = Path(models_dir).expanduser() / self.model_id
        if not path.exists() and path.with_name(path.name + ".gguf").is_file():
            path = path.with_name(path.name + ".gguf")
        where = f"put the Hugging Face model directory (or a .gguf file) at {path}"
        if force_download:
            raise ModelNotFoundError(f"ollm does not support downloading models; {where}")
        if not path.exists():
            raise ModelNotFoundError(f"{path} not found: ollm does not download models; {where}")
        if self.multimodality:
            raise OllmError("multimodality is not supported by ollm yet")
        self.path = path
        self._build(offload="disk")  # upstream streams every layer from disk by default

    def _build(self, **placement: object) -> None:
        if self.llm is not None:
            self.llm, old = None, self.llm
            old.close()
        self.llm = LLM(self.path, device=self._device_arg, **{**self._options, **placement})
        self.tokenizer = self.llm.tokenizer
        if self.tokenizer is not None:
            _v4_chat_template(self.tokenizer)
        self.model = CompatModel(self)

    def offload_layers_to_cpu(self, layers_num: int = 2) -> None:
        """Keep ``layers_num`` layers in RAM (pinned on a GPU machine); the rest stream from disk.

        On a CPU device, when streaming the remaining layers would need as much RAM (two stream
        buffers) as keeping them, every layer stays in RAM.
        """
        if (llm := self.llm) is None:
            raise OllmError("call ini_model() first")
        layers_num = max(0, min(int(layers_num), llm.spec.num_layers))
        budget = _cpu_budget(llm, layers_num)
        gpu = {"gpu_memory": llm.plan.budget} if llm.device.startswith("cuda") else {}
        self._build(offload="auto", cpu_memory=budget, **gpu)  # the GPU budget _cpu_budget used
        plan = self.llm.plan
        kept = plan.count(Tier.CPU)
        wanted = min(layers_num, llm.spec.num_layers - plan.count(Tier.GPU))
        if kept != wanted:
            where = dict(plan.describe())["layers"]
            if kept > wanted and not llm.device.startswith("cuda"):
                why = (
                    "streaming the others from disk would need two layer buffers in RAM, "
                    "as much as keeping them, so they stay in RAM"
                )
            else:
                why = "that is what the memory budgets allow"
            self._say(f"offload_layers_to_cpu({layers_num}): {where} ({why})")

    def _say(self, message: str) -> None:
        """A line for the user: on stderr with ``logging=True`` (as upstream prints), else INFO."""
        if self.logging:
            sys.stderr.write(f"ollm: {message}\n")
            sys.stderr.flush()
        else:
            log.info("%s", message)

    def DiskCache(self, cache_dir: str | Path = "./kv_cache/") -> DiskCache:
        """A disk KV cache in ``cache_dir``: pass it as ``past_key_values`` to
        ``model.generate`` and every layer's KV of that call lives in preallocated files of a
        per-run subdirectory (removed when the call ends)."""
        return DiskCache(Path(cache_dir))


class DiskCache:
    """Marks a generate call to keep its KV on disk (ollm's disk tier) under ``cache_dir``."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir


def _print_stats(metrics: GenerationMetrics, device: str) -> None:
    """Upstream's ``logging=True`` prints timings after each generate call; one line here."""
    rows = metrics.rows()
    if not device.startswith("cuda"):
        rows = [(k, v) for k, v in rows if "GPU" not in k]  # always zero on a CPU run
    sys.stderr.write("ollm stats: " + "; ".join(f"{k}: {v}" for k, v in rows) + "\n")
    sys.stderr.flush()


def _cpu_budget(llm: LLM, layers_num: int) -> int | None:
    """A ``cpu_memory`` under which the planner keeps ``layers_num`` layers in tier CPU."""
    from ollm.planning.placement import plan_placement

    n, layer = llm.spec.num_layers, llm.store.max_layer_nbytes
    on_gpu = llm.device.startswith("cuda")
    if layers_num >= n and not on_gpu:
        return None  # no limit: everything resident
    elem = torch.finfo(llm.dtype).bits // 8
    gpu = llm.plan.budget if on_gpu else None

    def trial(b: int):
        return plan_placement(llm.spec, llm.store, llm.device, gpu, b, "auto", llm.workload, elem)

    # On a GPU, layers the GPU budget takes need no RAM; the rest go to RAM, then to disk.
    plan, budget = llm.plan, layers_num * layer
    for _ in range(4):
        if not on_gpu:  # RAM also holds globals, KV, activations (sized by the budget), 2 buffers
            fixed = sum(v for k, v in plan.reserved.items() if k not in _LAYER_KEYS)
            budget = fixed + (layers_num + 2) * layer
        plan = trial(budget)
        missing = min(layers_num, n - plan.count(Tier.GPU)) - plan.count(Tier.CPU)
        if missing == 0:
            break
        budget += missing * layer if on_gpu else 0
    return budget


def _v4_chat_template(tok) -> None:
    """Make ``apply_chat_template`` return ids, not a BatchEncoding, by default (transformers 4)."""
    original = tok.apply_chat_template

    def apply_chat_template(conversation, *args, **kwargs):
        if not kwargs.get("return_assistant_tokens_mask"):
            kwargs.setdefault("return_dict", False)
        return original(conversation, *args, **kwargs)

    tok.apply_chat_template = apply_chat_template
