"""``ollm chat``: a conversation in turns with the model's chat template.

Each line on stdin is a user turn; the reply streams to stdout. The whole history is sent
again each turn (the prompt grows; the engine re-plans when it outgrows the reserved context).
``/exit`` (or ``/quit``) or end of input ends the chat. A model without a chat template (a base
model such as the default Gemma 3 270M GGUF) is refused with a one-line reason.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from ollm.cli import common
from ollm.cli.common import (
    CacheDirOpt,
    CliError,
    CpuMemoryOpt,
    DeviceOpt,
    DtypeOpt,
    GpuMemoryOpt,
    HybridOpt,
    KvCacheOpt,
    KvCodecOpt,
    KvDirOpt,
    KvEvictOpt,
    KvKeepOpt,
    KvRecentOpt,
    MaxContextOpt,
    MaxNewTokensOpt,
    OffloadOpt,
    SeedOpt,
    TemperatureOpt,
    ThreadsOpt,
    TopKOpt,
    TopPOpt,
    app,
)
from ollm.cli.generate import stream_reply

if TYPE_CHECKING:
    from ollm.api import LLM
    from ollm.engine.sampling import SamplingParams

EXIT_WORDS = ("/exit", "/quit")


@app.command()
def chat(
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="HF directory, .gguf file or layer store with a chat template."
        ),
    ] = None,
    system: Annotated[
        str | None,
        typer.Option("--system", help="A system message to start the conversation with."),
    ] = None,
    device: DeviceOpt = None,
    gpu_memory: GpuMemoryOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    offload: OffloadOpt = None,
    dtype: DtypeOpt = None,
    max_new_tokens: MaxNewTokensOpt = 512,
    temperature: TemperatureOpt = 1.0,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    max_context: MaxContextOpt = None,
    kv_cache: KvCacheOpt = None,
    kv_dir: KvDirOpt = None,
    kv_codec: KvCodecOpt = None,
    kv_recent: KvRecentOpt = None,
    kv_evict: KvEvictOpt = None,
    kv_keep: KvKeepOpt = None,
    hybrid: HybridOpt = None,
    decode_resident: common.DecodeResidentOpt = None,
    mlp_cpu: common.MlpCpuOpt = None,
    threads: ThreadsOpt = common.physical_cores(),
    cache_dir: CacheDirOpt = None,
    attention: common.AttentionOpt = None,
) -> None:
    """Chat with the model: one line per turn, /exit or end of input (Ctrl-D) ends."""
    with common.cli_errors():
        params = common.sampling_params(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
        llm = common.build_llm(
            model,
            threads=threads,
            device=device,
            gpu_memory=gpu_memory,
            cpu_memory=cpu_memory,
            offload=offload,
            dtype=dtype,
            max_context=max_context,
            kv_cache=kv_cache,
            kv_dir=kv_dir,
            kv_codec=kv_codec,
            kv_recent=kv_recent,
            kv_evict=kv_evict,
            kv_keep=kv_keep,
            hybrid=hybrid,
            decode_resident=decode_resident,
            mlp_cpu=mlp_cpu,
            cache_dir=cache_dir,
            attention=attention,
        )
        with llm:
            if llm.tokenizer is None or not getattr(llm.tokenizer, "chat_template", None):
                name = "the default model" if model is None else model
                raise CliError(
                    f"{name} has no chat template (a base model?), so it cannot chat; "
                    "use `ollm run --raw` to continue text, or pick an instruction-tuned model"
                )
            converse(llm, params, system)


def converse(llm: LLM, params: SamplingParams, system: str | None = None) -> list[dict[str, str]]:
    """Read user turns from stdin until /exit or EOF; stream each reply; return the history."""
    history = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:  # the prompt marker goes to stderr: stdout holds only the replies
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        text = line.strip()
        if text in EXIT_WORDS:
            break
        if not text:
            continue
        history.append({"role": "user", "content": text})
        result = stream_reply(llm.stream(history, params, chat=True), sys.stdout)
        history.append({"role": "assistant", "content": result.text})
    return history
