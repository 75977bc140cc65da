"""Cost per generated token: device-seconds, bytes moved (disk, host->GPU), and energy where the
GPU reports a cumulative energy counter (NVML, through the optional ``pynvml`` module)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class EnergyMeter:
    """Joules the GPU used between ``start()`` and ``stop()``; None where NVML is unavailable
    (no GPU, no ``pynvml``, or a GPU without the energy counter)."""

    def __init__(self, device: str) -> None:
        self._handle = None
        self._start: int | None = None
        if not device.startswith("cuda"):
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = int(device.partition(":")[2] or 0)
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except Exception as exc:  # noqa: BLE001 - optional: energy is reported as unknown
            log.debug("no GPU energy counter: %s", exc)
            self._handle = None

    def _read(self) -> int:
        import pynvml

        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))  # millijoules

    def start(self) -> None:
        if self._handle is not None:
            self._start = self._read()

    def stop(self) -> float | None:
        if self._handle is None or self._start is None:
            return None
        return (self._read() - self._start) / 1e3


def cost_per_token(metrics, device: str, joules: float | None = None) -> dict[str, float | None]:
    """Cost of one generated token from a result's metrics."""
    n = max(1, metrics.generated_tokens)
    seconds = metrics.prefill_seconds + metrics.decode_seconds
    return {
        "device_seconds_per_token": seconds / n,
        "gpu_seconds_per_token": seconds / n if device.startswith("cuda") else 0.0,
        "disk_bytes_per_token": metrics.bytes_read_disk / n,
        "h2d_bytes_per_token": metrics.bytes_copied_h2d / n,
        "joules_per_token": None if joules is None else joules / n,
    }
