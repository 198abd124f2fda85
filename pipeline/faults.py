"""Fault injection for the crash/resume tests: a real SIGKILL or a stage failure at a named point.

Production never sets these variables; the points cost one dict lookup each.
"""

from __future__ import annotations

import errno
import os
import signal

from pipeline.errors import StageError


def maybe_die(point: str) -> None:
    """SIGKILL this process when HLWQ_KILL_AT names `point` (no cleanup runs, as in a real crash)."""
    if os.environ.get("HLWQ_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_fail(point: str) -> None:
    """Raise a StageError when HLWQ_FAIL_AT names `point`."""
    if os.environ.get("HLWQ_FAIL_AT") == point:
        raise StageError(f"injected failure at {point} (HLWQ_FAIL_AT)")


def maybe_enospc(point: str) -> None:
    """Raise the OSError of a full disk when HLWQ_ENOSPC_AT names `point`."""
    if os.environ.get("HLWQ_ENOSPC_AT") == point:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), point)
