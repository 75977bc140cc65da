"""Cost per generated token (device-seconds, bytes moved, energy): see
``GenerationMetrics.cost_per_token``; the energy meter lives in ``ollm.telemetry.energy``."""

from __future__ import annotations

from ollm.telemetry.energy import EnergyMeter

__all__ = ["EnergyMeter", "cost_per_token"]


def cost_per_token(metrics) -> dict[str, float | None]:
    """Cost of one generated token from a result's metrics."""
    return metrics.cost_per_token
