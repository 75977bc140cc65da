"""Progress of long conversion steps: a tqdm bar when progress is enabled and stderr is a
terminal, else plain INFO lines of the ``ollm`` logger every few seconds (CI logs and
``ollm -v ... 2> log`` stay readable; with the logger above INFO nothing is shown or started).

Two shapes: ``progress_iter`` for loops with a known length (layers being converted) and
``heartbeat`` for opaque calls that report nothing themselves (parsing a GGUF header takes tens of
seconds for a 262k-token vocabulary and used to leave the terminal silent).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

logger = logging.getLogger("ollm")
T = TypeVar("T")
LOG_EVERY_S = 5.0


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def progress_iter(
    items: Iterable[T], desc: str, unit: str = "it", enabled: bool = True, total: int | None = None
) -> Iterator[T]:
    """Yield ``items`` while showing progress: a bar if ``enabled`` on a terminal, else log lines."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)  # type: ignore[arg-type]
    if enabled and _is_terminal():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, unit=unit, total=total)
        return
    if not logger.isEnabledFor(logging.INFO):
        yield from items
        return
    start = last = time.monotonic()
    logger.info("%s: started", desc)
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= LOG_EVERY_S:
            last = now
            of = f"/{total}" if total is not None else ""
            logger.info("%s: %d%s %s(s), %.0f s", desc, done, of, unit, now - start)
    logger.info("%s: done, %d %s(s) in %.1f s", desc, done, unit, time.monotonic() - start)


@contextmanager
def heartbeat(desc: str, enabled: bool = True, every: float = LOG_EVERY_S) -> Iterator[None]:
    """Show that an opaque step is alive: a tqdm counter of elapsed seconds if ``enabled`` on a
    terminal, else an INFO line every ``every`` seconds, from a daemon thread stopped on exit."""
    terminal = enabled and _is_terminal()
    if not terminal and not logger.isEnabledFor(logging.INFO):
        yield
        return
    stop = threading.Event()
    start = time.monotonic()
    if terminal:
        from tqdm.auto import tqdm

        bar = tqdm(desc=desc, unit="s", bar_format="{desc}: {elapsed}")

        def tick() -> None:
            while not stop.wait(0.5):
                bar.refresh()

    else:
        bar = None
        logger.info("%s ...", desc)

        def tick() -> None:
            while not stop.wait(every):
                logger.info("%s: still working, %.0f s", desc, time.monotonic() - start)

    thread = threading.Thread(target=tick, name="ollm-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if bar is not None:
            bar.close()
        else:
            logger.info("%s: done in %.1f s", desc, time.monotonic() - start)
