"""ollm: large-context LLM inference on memory-constrained machines.

Heavy modules (torch, transformers) load on first use, so ``import ollm`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "SamplingParams",
    "GenerationResult",
    "Inference",
    "TextStreamer",
    "file_get_contents",
    "__version__",
]

if TYPE_CHECKING:
    from ollm.api import LLM, GenerationResult
    from ollm.compat import Inference, TextStreamer, file_get_contents
    from ollm.engine.sampling import SamplingParams

_LAZY = {
    "LLM": "ollm.api",
    "GenerationResult": "ollm.api",
    "SamplingParams": "ollm.engine.sampling",
    "Inference": "ollm.compat",
    "TextStreamer": "ollm.compat",
    "file_get_contents": "ollm.compat",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ollm' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
