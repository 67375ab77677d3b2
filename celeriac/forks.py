"""This process's id, known without a system call: objects that hold sockets check it often.

`os.getpid()` is a system call each time. `pid()` reads a number that a fork hook keeps up to
date, so a connection holder can ask on every call whether it was inherited through a fork.
"""

from __future__ import annotations

import os

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def pid() -> int:
    """The id of the calling process, as `os.getpid()` would return it."""
    return _pid
