"""Human-readable byte sizes: ``parse_size("8GiB")`` and ``format_size(n)``."""

from __future__ import annotations

import re

from ollm.errors import SizeParseError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int | float | None) -> int | None:
    """Parse ``"8GiB"``, ``"512MB"``, ``"1.5G"`` or a byte count; ``None`` passes through.

    Decimal units (KB, MB, GB) are powers of 1000, binary units (KiB, MiB, GiB) powers of 1024;
    a bare ``G``/``M``/``K`` is decimal, as in most tools.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise SizeParseError(
            f"invalid size {value!r}: expected a byte count or a string like '8GiB'"
        )
    if isinstance(value, (int, float)):
        if value < 0:
            raise SizeParseError(f"invalid size {value!r}: must not be negative")
        return int(value)
    match = _SIZE_RE.match(str(value))
    if not match:
        raise SizeParseError(
            f"invalid size {value!r}: expected a number with an optional unit, like '8GiB', '512MB' or '1.5G'"
        )
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise SizeParseError(
            f"invalid size {value!r}: unknown unit {unit!r} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
        )
    return int(float(number) * factor)


def format_size(nbytes: float) -> str:
    """Format a byte count with binary units, e.g. ``format_size(3 * 2**30) == '3.00 GiB'``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"
