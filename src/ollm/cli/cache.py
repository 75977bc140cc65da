"""``ollm cache ls`` and ``ollm cache rm``: the converted layer stores under the cache directory
(logic in ``ollm.storage.cache``)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from ollm.cli import common
from ollm.cli.common import CacheDirOpt, JsonOpt, app

cache_app = typer.Typer(
    help="List or remove converted layer stores.", no_args_is_help=True, add_completion=False
)
app.add_typer(cache_app, name="cache")


def _cache_root(cache_dir: str | None) -> Path:
    from ollm.storage.convert import default_cache_dir

    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def _ago(t: float) -> str:
    s = max(time.time() - t, 0)
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{s / n:.0f} {unit} ago"
    return "just now"


@cache_app.command("ls")
def cache_ls(cache_dir: CacheDirOpt = None, json_out: JsonOpt = False) -> None:
    """List the cached layer stores: source, dtype, size on disk, last use and path."""
    with common.cli_errors():
        from ollm.sizes import format_size
        from ollm.storage.cache import list_stores

        stores = list_stores(_cache_root(cache_dir))
        if json_out:
            rows = [
                {
                    "name": s.name,
                    "source": s.source,
                    "dtype": s.dtype,
                    "nbytes": s.nbytes,
                    "last_used": s.last_used,
                    "in_use": s.in_use,
                    "stale": s.stale,
                    "path": str(s.path),
                }
                for s in stores
            ]
            sys.stdout.write(json.dumps(rows, ensure_ascii=False) + "\n")
            return
        from rich.table import Table

        table = Table(title=f"layer stores in {_cache_root(cache_dir)}", title_justify="left")
        for col in ("name", "source", "dtype", "size", "last used", "path"):
            table.add_column(col, overflow="fold")
        for s in stores:
            used = _ago(s.last_used) + (" (in use)" if s.in_use else "")
            used += " (stale: older converter, not reused)" if s.stale else ""
            table.add_row(s.name, s.source, s.dtype, format_size(s.nbytes), used, str(s.path))
        total = sum(s.nbytes for s in stores)
        table.caption = f"{len(stores)} store(s), {format_size(total)}"
        legacy = _cache_root(cache_dir) / "gguf"
        if legacy.is_dir():  # joined default GGUFs of older versions: stores no longer need them
            from ollm.storage.cache import disk_usage

            table.caption += f"; {legacy} holds {format_size(disk_usage(legacy))} (safe to delete)"
        common.stdout_console().print(table)


@cache_app.command("rm")
def cache_rm(
    names: Annotated[
        list[str] | None, typer.Argument(metavar="NAME...", help="Store names (see ollm cache ls).")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Remove every store.")] = False,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Remove layer stores (atomically; a store open in a running ollm process is refused)."""
    with common.cli_errors():
        from ollm.storage.cache import list_stores, remove_store

        root = _cache_root(cache_dir)
        if all_ == bool(names):
            raise common.CliError("name the stores to remove (see ollm cache ls), or pass --all")
        targets = [s.name for s in list_stores(root)] if all_ else list(names or [])
        for name in targets:
            path = remove_store(root, name)
            sys.stderr.write(f"removed {path}\n")
