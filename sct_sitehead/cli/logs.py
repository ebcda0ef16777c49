"""The library only logs; the command-line tools decide where it goes."""

from __future__ import annotations

import logging
import sys


def configure_logging(verbosity: int) -> None:
    """Send the package's log to stderr: 0 warnings only, 1 info (one line per message), 2 debug with names."""
    level = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}[verbosity]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if verbosity < 2 else "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("sct_sitehead")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
