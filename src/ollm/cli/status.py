"""What the CLI says on stderr: log lines, and what a long wait is doing.

The ``ollm`` logger always runs at INFO inside the CLI. Its records reach stderr through one
``StderrHandler``: warnings always; INFO lines (conversion progress, measured rates, re-plans)
when stderr is not a terminal or with ``-v``. ``waiting(desc)`` wraps calls that may take
seconds (loading, converting, planning, calibrating, prefill):

* on a terminal, a rich spinner on stderr names the phase and shows the latest INFO line; it
  disappears when the wait ends;
* elsewhere (pipes, CI logs), nothing is written for a wait shorter than ``DELAY_S``: its INFO
  lines are held and dropped, so quick commands and one-line errors stay one line. Once the
  wait passes ``DELAY_S``, ``ollm: <desc> ...`` and the held lines are written, later lines as
  they come, and ``done in N s`` at the end.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["DELAY_S", "StderrHandler", "configure_logging", "is_terminal", "waiting"]

DELAY_S = 2.0
logger = logging.getLogger("ollm")


def is_terminal() -> bool:
    """True when stderr is a terminal (spinners and bars), False for pipes and files."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class _Formatter(logging.Formatter):
    """``ollm: message`` for INFO, ``warning: message`` (level in lower case) above it."""

    def format(self, record: logging.LogRecord) -> str:
        label = "ollm" if record.levelno <= logging.INFO else record.levelname.lower()
        return f"{label}: {record.getMessage()}"


class StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at emit time (so test runners can capture it);
    can hold INFO lines back while a wait has not yet proved long."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(_Formatter())
        self.show_info = True
        self._held: list[str] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            info = record.levelno < logging.WARNING
            if info and not self.show_info:
                return
            line = self.format(record)
            if info and self._held is not None:  # called under self.lock (Handler.handle)
                self._held.append(line)
                return
            sys.stderr.write(line + "\n")
        except Exception:
            self.handleError(record)

    def hold_info(self) -> None:
        """Keep INFO lines back until ``release_info`` or ``drop_info``."""
        with self.lock:
            self._held = []

    def release_info(self, first: str) -> None:
        """Write ``first`` and the held lines; stop holding."""
        with self.lock:
            lines, self._held = self._held or [], None
            if self.show_info:
                sys.stderr.write("".join(f"{ln}\n" for ln in [first, *lines]))

    def drop_info(self) -> None:
        """Forget the held lines; stop holding."""
        with self.lock:
            self._held = None


def _handler() -> StderrHandler | None:
    return next((h for h in logger.handlers if isinstance(h, StderrHandler)), None)


def configure_logging(verbose: bool) -> None:
    """Send the ``ollm`` logger to stderr: INFO lines with ``-v`` or when not on a terminal."""
    handler = _handler()
    if handler is None:
        handler = StderrHandler()
        logger.addHandler(handler)
    handler.show_info = verbose or not is_terminal()
    logger.setLevel(logging.INFO)
    # transformers' own deprecation chatter is not the user's business unless asked for.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "error")


class _SpinnerHandler(logging.Handler):
    """Shows each INFO record of the ``ollm`` logger as the spinner's text."""

    def __init__(self, status: Any, desc: str) -> None:
        super().__init__(logging.INFO)
        self.status, self.desc = status, desc

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.INFO:
            self.status.update(f"{self.desc}: {record.getMessage()}")


@contextmanager
def waiting(desc: str, delay: float = DELAY_S) -> Iterator[None]:
    """Around a call that may take seconds: a spinner on a terminal, else delayed log lines."""
    if is_terminal():
        from rich.console import Console

        with Console(stderr=True).status(desc) as status:
            spinner = _SpinnerHandler(status, desc)
            logger.addHandler(spinner)
            try:
                yield
            finally:
                logger.removeHandler(spinner)
        return
    handler = _handler()
    start, said = time.monotonic(), threading.Event()
    if handler is not None:
        handler.hold_info()

    def say() -> None:
        said.set()
        if handler is not None:
            handler.release_info(f"ollm: {desc} ...")
        else:
            logger.info("%s ...", desc)

    timer = threading.Timer(delay, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()  # a say() already running finishes before the last line
        if said.is_set():
            logger.info("%s: done in %.1f s", desc, time.monotonic() - start)
        elif handler is not None:
            handler.drop_info()
