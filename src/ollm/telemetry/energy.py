"""GPU energy over an interval, from NVML's cumulative energy counter (through the optional
``pynvml`` module, package ``nvidia-ml-py``); unknown (None) where it is unavailable."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class EnergyMeter:
    """Joules the GPU used between ``start()`` and ``stop()``; None off CUDA, without ``pynvml``,
    or on a GPU without the energy counter (it needs Volta or newer)."""

    def __init__(self, device: str) -> None:
        self._handle = None
        self._start: int | None = None
        if not str(device).startswith("cuda"):
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = int(str(device).partition(":")[2] or 0)
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except Exception as exc:  # noqa: BLE001 - optional: energy is reported as unknown
            log.debug("no GPU energy counter: %s", exc)
            self._handle = None

    def _read(self) -> int:
        import pynvml

        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))  # millijoules

    def start(self) -> EnergyMeter:
        if self._handle is not None:
            self._start = self._read()
        return self

    def stop(self) -> float | None:
        if self._handle is None or self._start is None:
            return None
        return (self._read() - self._start) / 1e3
