"""Registry: HF ``model_type`` -> the family module that turns its config into a ModelSpec."""

from __future__ import annotations

import importlib

from ollm.errors import UnsupportedModelError
from ollm.models.spec import ModelSpec

# model_type -> module under ollm.models defining ``build_spec(config) -> ModelSpec``.
FAMILIES: dict[str, str] = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "mixtral": "mixtral",
    "gpt_oss": "gpt_oss",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}


def supported_model_types() -> list[str]:
    """The HF model_type values ollm can run."""
    return sorted(FAMILIES)


def build_spec(config: object) -> ModelSpec:
    """Build the ModelSpec for an HF config, or raise UnsupportedModelError listing what works."""
    model_type = getattr(config, "model_type", None)
    module_name = FAMILIES.get(str(model_type))
    if module_name is None:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    module = importlib.import_module(f"ollm.models.{module_name}")
    return module.build_spec(config)
