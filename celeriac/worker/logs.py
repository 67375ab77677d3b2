"""Worker logging in Celery's format: `[time: LEVEL/ProcessName] message`."""

from __future__ import annotations

import logging
import sys

FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"


def setup_logging(level: str | int) -> None:
    """Send celeriac's and the tasks' logs to stderr at `level`."""
    if isinstance(level, str):
        name, level = level, logging.getLevelName(level.upper())
        if not isinstance(level, int):
            raise ValueError(f"unknown log level {name!r}; use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
