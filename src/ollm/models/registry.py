"""Registry: HF ``model_type`` -> the family module that turns its config into a ModelSpec."""

from __future__ import annotations

import importlib

from ollm.errors import UnsupportedModelError
from ollm.models.decoder import required_layer_tensors
from ollm.models.spec import ModelSpec
from ollm.storage.families import ModelFamilies

# model_type -> module under ollm.models defining ``build_spec(config) -> ModelSpec``.
FAMILIES: dict[str, str] = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "mixtral": "mixtral",
    "gpt_oss": "gpt_oss",
    "qwen3_next": "qwen3_next",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}


def supported_model_types() -> list[str]:
    """The HF model_type values ollm can run."""
    return sorted(FAMILIES)


def check_model_type(model_type: object) -> None:
    """Raise UnsupportedModelError, listing what works, for a model_type no family runs."""
    if str(model_type) not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        )


def build_spec(config: object) -> ModelSpec:
    """Build the ModelSpec for an HF config, or raise UnsupportedModelError listing what works."""
    model_type = getattr(config, "model_type", None)
    check_model_type(model_type)
    module = importlib.import_module(f"ollm.models.{FAMILIES[str(model_type)]}")
    return module.build_spec(config)


# What conversion (ollm.storage, which imports no family) is handed to check and name tensors.
STORE_FAMILIES = ModelFamilies(check_model_type, build_spec, required_layer_tensors)
