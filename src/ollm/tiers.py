"""Where bytes live and which pass runs: the tiers of weights and KV, and the forward phases.

String enums: each member equals its value (``Tier.DISK == "disk"``), prints as it
(``f"{Tier.DISK}"`` is ``disk``) and is written to JSON as it, so plans, ``ollm info``, JSON
reports and tests read the same strings as before the enums.

Weights and KV name their resident tier differently, as they always have: a layer's weights are
``gpu`` when they stay in accelerator memory (a CPU-only plan has no such layer: its resident
layers are ``cpu``), a layer's KV is ``device`` when it stays on the device that decodes the
layer, whichever that is.
"""

from __future__ import annotations

from enum import Enum


class _StrEnum(str, Enum):
    """``enum.StrEnum`` (Python 3.11) for 3.10 too: str() and format() give the value; so does
    repr() (``'disk'``), so messages with ``{tier!r}`` and dataclass reprs read as before."""

    def __repr__(self) -> str:
        return repr(self.value)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Tier(_StrEnum):
    """Where a layer's weights live (``LayerPlacement.tier``)."""

    GPU = "gpu"  # resident in accelerator memory
    CPU = "cpu"  # resident in RAM (pinned when a GPU streams from it)
    DISK = "disk"  # read from the layer store on every pass


class KvTier(_StrEnum):
    """Where a layer's KV lives (``LayerPlacement.kv_tier``) and the homes of KV block pools."""

    DEVICE = "device"  # on the layer's KV device (the one that decodes it)
    CPU = "cpu"  # pinned RAM
    DISK = "disk"  # KV files


class Home(_StrEnum):
    """The memory a paged KV pool lives in (``engine/kvpools.py``), from its layers' KvTier."""

    DEVICE = "device"  # the plan's KV device (GPU memory, or RAM on a CPU machine)
    RAM = "ram"  # pinned host RAM
    DISK = "disk"  # memory-mapped KV files

    @classmethod
    def of(cls, kv_tier: KvTier) -> Home:
        return {KvTier.DEVICE: cls.DEVICE, KvTier.CPU: cls.RAM, KvTier.DISK: cls.DISK}[kv_tier]


class Phase(_StrEnum):
    """Which kind of forward runs: ``PlacementPlan.phase`` picks decode (hybrid devices) for
    forwards of few tokens, prefill (everything on the accelerator) for the rest."""

    PREFILL = "prefill"
    DECODE = "decode"
