"""``ollm convert`` and ``ollm info``."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from ollm.cli import common
from ollm.cli.common import (
    CacheDirOpt,
    CpuMemoryOpt,
    DeviceOpt,
    DtypeOpt,
    GpuMemoryOpt,
    HybridOpt,
    JsonOpt,
    KvCacheOpt,
    MaxContextOpt,
    OffloadOpt,
    ThreadsOpt,
    app,
)


@app.command()
def convert(
    src: Annotated[str, typer.Argument(metavar="SRC", help="HF model directory or .gguf file.")],
    dst: Annotated[
        str, typer.Argument(metavar="DST", help="Directory of the layer store to create.")
    ],
    dtype: DtypeOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace DST if it exists.")
    ] = False,
) -> None:
    """Convert a model into a layer store (one file per decoder layer)."""
    with common.cli_errors():
        torch_dtype = None
        if dtype is not None:
            from ollm.config import EngineConfig

            name = EngineConfig(dtype=dtype).dtype  # validates, one-line error otherwise
            import torch

            torch_dtype = getattr(torch, str(name))
        from ollm.models.registry import STORE_FAMILIES
        from ollm.sizes import format_size
        from ollm.storage.convert import convert as convert_model

        path = convert_model(
            src,
            dst,
            torch_dtype,
            overwrite,
            progress=common.show_progress(),
            families=STORE_FAMILIES,
        )
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        common.stdout_console().print(f"{path} ({format_size(size)})")


@app.command()
def info(
    model: Annotated[
        str | None,
        typer.Argument(
            metavar="MODEL",
            help="HF directory, .gguf file or layer store (default: Gemma 3 270M).",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = None,
    gpu_memory: GpuMemoryOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    offload: OffloadOpt = None,
    max_context: MaxContextOpt = None,
    kv_cache: KvCacheOpt = None,
    hybrid: HybridOpt = None,
    decode_resident: common.DecodeResidentOpt = None,
    mlp_cpu: common.MlpCpuOpt = None,
    threads: ThreadsOpt = common.physical_cores(),
    json_out: JsonOpt = False,
    cache_dir: CacheDirOpt = None,
    moe_offload: common.MoeOffloadOpt = None,
    expert_cache: common.ExpertCacheOpt = None,
    expert_lookahead: common.ExpertLookaheadOpt = None,
    attention: common.AttentionOpt = None,
    kv_codec: common.KvCodecOpt = None,
    kv_recent: common.KvRecentOpt = None,
) -> None:
    """Show the model's architecture, sizes and placement plan under the given budgets (with
    ``--kv-codec auto``: each KV tier's codec and why)."""
    with common.cli_errors():
        llm = common.build_llm(
            model,
            threads=threads,
            device=device,
            gpu_memory=gpu_memory,
            cpu_memory=cpu_memory,
            offload=offload,
            max_context=max_context,
            kv_cache=kv_cache,
            hybrid=hybrid,
            decode_resident=decode_resident,
            mlp_cpu=mlp_cpu,
            cache_dir=cache_dir,
            moe_offload=moe_offload,
            expert_cache=expert_cache,
            expert_lookahead=expert_lookahead,
            attention=attention,  # routed layers' KV may leave the device for weights
            kv_codec=kv_codec,  # compressed KV is planned at its stored size
            kv_recent=kv_recent,
        )
        with llm:
            data = llm.info()
        from ollm.sizes import format_size
        from ollm.storage.cache import disk_usage

        data["disk (store)"] = format_size(disk_usage(llm.store_path))
        import torch

        data["threads"] = torch.get_num_threads()  # what compute on the CPU will use
        if json_out:
            sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
            sys.stdout.flush()
            return
        plan = data.pop("plan", {})
        table = common.table([(k, str(v)) for k, v in data.items()], title="model")
        table.add_section()
        for label, value in dict(plan).items():  # type: ignore[call-overload]
            table.add_row(f"plan: {label}", str(value))
        common.stdout_console().print(table)
