"""What conversion needs to know of the model families, handed in by its caller: storage reads
files and imports no family. ``ollm.models.registry.STORE_FAMILIES`` is the one ollm passes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelFamilies:
    """``check(model_type)`` raises ``UnsupportedModelError`` (naming the supported types) for
    a model_type no family runs; ``spec(config)`` builds the spec of an HF config, read here by
    attribute only (``family``, ``num_layers``, ``vocab_size``, sizes); ``layer_tensors(spec,
    layer, names)`` lists the tensor names (relative to ``model.layers.N.``) a layer needs, given
    the names it has (``names`` picks the experts' layout of MoE families)."""

    check: Callable[[str], None]
    spec: Callable[[Any], Any]
    layer_tensors: Callable[[Any, int | None, set[str] | None], list[str]]

    def missing(self, spec: Any, names: set[str], layer: int | None = None) -> list[str]:
        """The required tensors of layer ``layer`` absent from ``names``."""
        return [n for n in self.layer_tensors(spec, layer, names) if n not in names]
