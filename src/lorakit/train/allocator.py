"""Giving freed memory back to the system on a CPU run, where the C allocator is glibc's malloc.

glibc serves a large block from its heap once its adaptive mmap threshold has risen past the
block's size (it rises to the largest block freed so far, up to 32 MiB), and a freed block in the
middle of the heap, between live activations, stays resident. A training step allocates and frees
many such blocks (backward's temporaries, a dropped-out input formed again, a dequantized weight),
so the process's peak resident set grows hundreds of MiB past the bytes it uses
(docs/benchmarks/memory.md). A fixed threshold of 1 MiB makes every block of 1 MiB or more an
mmap of its own, unmapped when it is freed; the trim threshold bounds what the top of the heap
keeps. `lorakit train` sets both at start-up on the CPU.

Not set: on a GPU run (the caching allocator keeps its own blocks; the host side is small), where
the C library is not glibc (musl, macOS, Windows: nothing is called), when the environment already
sets glibc's own `MALLOC_MMAP_THRESHOLD_` or a `glibc.malloc.mmap_threshold` tunable, or when
`LORAKIT_MALLOC=default` asks for the allocator as it comes.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

from ..errors import LorakitError

OPT_OUT_VARIABLE = "LORAKIT_MALLOC"  # "default": leave malloc's settings as they are; "lorakit" (or unset): set them
MMAP_THRESHOLD_BYTES = 1 << 20
TRIM_THRESHOLD_BYTES = 2 << 20  # glibc's own ratio (twice the mmap threshold) once it adapts it

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def glibc_version() -> str | None:
    """'2.36' where this process runs on glibc, else None (musl, macOS, Windows)."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"; an error or None elsewhere
    except (AttributeError, ValueError, OSError):
        return None
    if not name or not name.startswith("glibc "):
        return None
    return name.split(" ", 1)[1]


def set_by_environment(environ: Mapping[str, str]) -> bool:
    """Whether the environment already chose malloc's thresholds, or opted out of lorakit's. An
    unknown LORAKIT_MALLOC is an error (a misspelt opt-out must not pass for one)."""
    choice = environ.get(OPT_OUT_VARIABLE, "").strip().lower()
    if choice not in ("", "default", "lorakit"):
        raise LorakitError(
            f"{OPT_OUT_VARIABLE}={environ[OPT_OUT_VARIABLE]!r}: expected 'default' (glibc's malloc as it "
            "comes) or 'lorakit' (lorakit's setting, also when unset)"
        )
    if choice == "default":
        return True
    return "MALLOC_MMAP_THRESHOLD_" in environ or "malloc.mmap_threshold" in environ.get("GLIBC_TUNABLES", "")


def return_freed_memory_to_system(
    device: str = "cpu", environ: Mapping[str, str] | None = None, libc: object | None = None
) -> bool:
    """Make glibc's malloc give every freed block of 1 MiB or more back to the system at once, for
    the rest of this process. True when it was set; False, and nothing changed, on a `device` other
    than the CPU, on another C library, when the environment chose (`MALLOC_MMAP_THRESHOLD_`,
    `GLIBC_TUNABLES`) or opted out (`LORAKIT_MALLOC=default`), or when `mallopt` refuses. Raises
    LorakitError for an unknown LORAKIT_MALLOC only.

    `lorakit train` calls it on a CPU run; call it yourself before training on the CPU from Python
    to get the same peak resident memory. What it costs a step is measured in
    docs/benchmarks/memory.md. `libc` is for tests (an object with a `mallopt`)."""
    if str(device).split(":")[0] != "cpu" or set_by_environment(os.environ if environ is None else environ):
        return False
    if libc is None:
        if glibc_version() is None:
            return False
        try:
            libc = ctypes.CDLL(None)
        except OSError:
            return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    try:  # mallopt returns 1 when it took the value, 0 when not
        return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
            mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        )
    except (OSError, TypeError, ValueError, ctypes.ArgumentError):
        return False
