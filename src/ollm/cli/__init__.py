"""Command line: ``ollm run``, ``ollm chat``, ``ollm convert``, ``ollm info`` and ``ollm bench``.

Importing this package stays light (typer, rich and ``ollm.errors`` only): torch, transformers
and the engine load inside the command functions. Generated text and tables go to stdout;
logging, progress bars and errors go to stderr. Errors ollm raises on purpose print as one
``error: <message>`` line on stderr and exit with code 2; Ctrl-C exits with code 130.

Layout: ``common.py`` holds the typer app, shared options and helpers; each other module
registers its commands on that app when imported here.
"""

from __future__ import annotations

import sys

from ollm.cli import (  # noqa: F401  (commands)
    bench,
    cache,
    calibrate,
    chat,
    evaluate,
    generate,
    models,
    serve,
)
from ollm.cli.common import EXIT_INTERRUPTED, app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point (``ollm``)."""
    try:
        app()
    except KeyboardInterrupt:  # raised outside a command (e.g. while parsing or importing)
        sys.stderr.write("interrupted\n")
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
