"""Real text that every Python install carries: the standard library's own documentation
(module, class and function docstrings), in a fixed order, or a user's file. Read by the quality
harness (``ollm.eval``) and by attention-routing calibration (``engine/routing_calibration.py``),
so it sits below both."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

# English prose in docstrings; a fixed list so the text depends only on the Python version.
_MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email.message", "enum", "fractions", "functools", "gettext", "heapq",
    "http.client", "inspect", "ipaddress", "itertools", "json", "logging", "mailbox", "pathlib",
    "pickle", "queue", "random", "re", "shutil", "smtplib", "socket", "statistics", "string",
    "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
    "uuid", "zipfile",
)  # fmt: skip


def stdlib_text(min_chars: int = 0) -> str:
    """Docstrings of a fixed list of standard-library modules and their public members, joined
    by blank lines; stops once ``min_chars`` characters are collected (0: everything)."""
    parts: list[str] = []
    total = 0
    for name in _MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # a trimmed Python build: skip what is missing
            continue
        for doc in _docstrings(mod):
            parts.append(doc)
            total += len(doc) + 2
            if min_chars and total >= min_chars:
                return "\n\n".join(parts)
    return "\n\n".join(parts)


def _docstrings(mod) -> list[str]:
    docs = [inspect.getdoc(mod) or ""]
    for attr in sorted(vars(mod)):
        if attr.startswith("_"):
            continue
        obj = getattr(mod, attr)
        if getattr(obj, "__module__", None) != mod.__name__:
            continue  # re-exports would repeat other modules' text
        if inspect.isclass(obj) or inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj) or "")
    return [d.strip() for d in docs if len(d.strip()) > 40]


def load_text(path: str | Path | None, min_chars: int) -> str:
    """The user's text file, or the standard library's documentation when ``path`` is None."""
    if path is None:
        return stdlib_text(min_chars)
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        from ollm.errors import OllmError

        raise OllmError(f"{path}: the text file is empty")
    return text
