"""Child processes that end with their parent.

`lorakit compare` trains each method in a `lorakit train` child, and `lorakit train --nproc N`
starts N of them. Killed parents (kill -9, a closed terminal, an out-of-memory kill) must not leave
a child training on: it would keep writing a run directory that the next command then resumes.
A child started with `child_environment()` calls `follow_parent()` first thing: the kernel sends it
SIGTERM when its parent ends (Linux `PR_SET_PDEATHSIG`; elsewhere a thread watches the parent), and
a parent that ended before the child got that far is noticed at once.

At the foundation of lorakit's layers: this module imports nothing of lorakit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import threading
import time

PARENT_VARIABLE = "LORAKIT_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def child_environment(environment: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child that must end with this process (see `follow_parent`)."""
    return {**(os.environ if environment is None else environment), PARENT_VARIABLE: str(os.getpid())}


def _ask_kernel(sig: int) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def follow_parent() -> None:
    """In a child started with `child_environment`: end (SIGTERM) when the parent that started it
    ends. The variable is removed, so that this process's own children follow it, not its parent.
    Does nothing in a process started otherwise."""
    expected = os.environ.pop(PARENT_VARIABLE, None)
    if expected is None or not expected.isdigit():
        return
    if not _ask_kernel(signal.SIGTERM):
        threading.Thread(target=_watch, args=(int(expected),), daemon=True, name="lorakit-follow-parent").start()
    if os.getppid() != int(expected):  # the parent ended before the kernel was asked
        os.kill(os.getpid(), signal.SIGTERM)
