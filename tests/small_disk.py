"""A full disk and a read-only directory, for real: a small tmpfs mounted in a private mount namespace
(`unshare -m`, or `unshare -r -m` where unprivileged user namespaces are allowed), so that every
writer (Python, safetensors' Rust, torch's C++, numpy) meets the kernel's ENOSPC or EROFS. Nothing is
mounted outside the command: the mount ends with it, however it ends.

    result = run_on_small_disk(disk, [sys.executable, "-m", "lorakit", ...], seed=before, after=after,
                               leave_free=4096)

`seed`'s contents are copied onto the disk first, then the disk is filled up to `leave_free` bytes
(or made read-only), the command runs, the filler goes, and the disk's contents are copied to
`after` for the test to compare.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

SCRIPT = r"""
set -e
mount -t tmpfs -o size="$SIZE" tmpfs "$DISK"
if [ -n "$SEED" ]; then cp -a "$SEED"/. "$DISK"/; fi
python3 - "$DISK" "$LEAVE_FREE" <<'EOF'
import os, sys
disk, keep = sys.argv[1], int(sys.argv[2])
st = os.statvfs(disk)
left = st.f_bavail * st.f_frsize - keep
try:
    with open(os.path.join(disk, ".filler"), "wb") as f:
        while left > 0:
            left -= f.write(b"\0" * min(left, 1 << 20))
except OSError:
    pass
EOF
if [ "$READ_ONLY" = 1 ]; then rm -f "$DISK/.filler"; mount -o remount,ro "$DISK"; fi
set +e
"$@"
code=$?
if [ "$READ_ONLY" = 1 ]; then mount -o remount,rw "$DISK"; fi
rm -f "$DISK/.filler"
cp -a "$DISK"/. "$AFTER"/
exit $code
"""


@functools.cache
def namespace_prefix() -> tuple[str, ...] | None:
    """The `unshare` command that may mount a tmpfs here (None: none may)."""
    if shutil.which("unshare") is None:
        return None
    candidates = [("unshare", "-m")] if os.geteuid() == 0 else []
    candidates.append(("unshare", "-r", "-m"))
    with tempfile.TemporaryDirectory() as probe:
        for prefix in candidates:
            done = subprocess.run(
                [*prefix, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"], capture_output=True, timeout=30
            )
            if done.returncode == 0:
                return prefix
    return None


def require_small_disk() -> tuple[str, ...]:
    prefix = namespace_prefix()
    if prefix is None:
        pytest.skip("cannot mount a tmpfs in a private mount namespace here (unshare -m / -r -m refused)")
    return prefix


def run_on_small_disk(
    disk: Path,
    command: list[str],
    *,
    after: Path,
    seed: Path | None = None,
    size: str = "16m",
    leave_free: int = 0,
    read_only: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run `command` with a fresh tmpfs of `size` at `disk` (see the module docstring)."""
    prefix = require_small_disk()
    disk.mkdir(parents=True, exist_ok=True)
    after.mkdir(parents=True, exist_ok=True)
    variables = {
        **os.environ,
        **(env or {}),
        "DISK": str(disk),
        "SIZE": size,
        "SEED": str(seed or ""),
        "LEAVE_FREE": str(leave_free),
        "READ_ONLY": "1" if read_only else "0",
        "AFTER": str(after),
    }
    return subprocess.run(
        [*prefix, "sh", "-c", SCRIPT, "small-disk", *command],
        capture_output=True,
        text=True,
        env=variables,
        timeout=timeout,
    )


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` (relative path -> SHA-256), symbolic links as their target."""
    found = {}
    for path in sorted(directory.rglob("*")):
        name = str(path.relative_to(directory))
        if path.is_symlink():
            found[name] = "-> " + os.readlink(path)
        elif path.is_file():
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found
