"""``ollm serve``: an OpenAI-compatible HTTP server over the continuous batch (FastAPI).

Needs the ``serve`` extra (``pip install 'ollm[serve]'``); importing this package does not
import FastAPI, so ``import ollm`` works without it. ``create_app(llm, ServeConfig(...))``
builds the application; ``serve(...)`` runs it with uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ollm.api import LLM
    from ollm.serve.app import ServeConfig

__all__ = ["create_app", "missing_dependencies"]

_NEEDED = ("fastapi", "uvicorn", "prometheus_client")


def missing_dependencies() -> list[str]:
    """The serve extra's modules that are not installed."""
    import importlib.util

    return [m for m in _NEEDED if importlib.util.find_spec(m) is None]


def create_app(llm: LLM, config: ServeConfig) -> FastAPI:
    """The FastAPI app (see `ollm.serve.app.create_app`)."""
    from ollm.serve.app import create_app as _create

    return _create(llm, config)
