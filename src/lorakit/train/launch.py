"""`lorakit train --nproc N`: N processes on this machine, one command.

    lorakit train --nproc 2 ...                            # what users type
    python -m lorakit.train.launch 2 script.py ARGS...     # any script that trains through lorakit.train

The processes meet through a file (torch.distributed's FileStore, `RENDEZVOUS_VARIABLE`) and talk over
the loopback interface (`GLOO_SOCKET_IFNAME` / `NCCL_SOCKET_IFNAME`): nothing is asked of the system
resolver. (torchrun's rendezvous goes through a TCP store, whose sockets name their peers with
`getnameinfo`: reverse-DNS queries for 127.0.0.1 on a machine whose hosts file lists only the IPv4
form.) Runs launched by torchrun itself still work, through torchrun's environment.

Each process writes a failure's one line (`error: ...`) into a file of the launch rather than to the
terminal (`ERRORS_VARIABLE`); the launcher prints it once, whichever process said it first, instead
of one copy per process. When a process fails or is killed, the others are stopped; when the
launcher is killed, they end with it (`lorakit.children`).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..children import child_environment

RENDEZVOUS_VARIABLE = "LORAKIT_RENDEZVOUS_FILE"
ERRORS_VARIABLE = "LORAKIT_ERROR_DIR"
GRACE_SECONDS = 5.0  # the others' time to end on their own after one failed (they may report the same problem)


def loopback_interface() -> str:
    """The loopback interface's name (`lo` on Linux, `lo0` on macOS)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    return next((name for name in names if name in ("lo", "lo0")), next((n for n in names if n.startswith("lo")), "lo"))


def process_environment(nproc: int, rank: int, rendezvous: Path, errors: Path) -> dict[str, str]:
    """What process `rank` of `nproc` is started with: torchrun's variables, a rendezvous file, the
    loopback interface (unless the caller chose another), and one thread each unless told otherwise
    (as torchrun does: N processes share the cores)."""
    env = child_environment()
    env.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            RENDEZVOUS_VARIABLE: str(rendezvous),
            ERRORS_VARIABLE: str(errors),
        }
    )
    env.pop("MASTER_PORT", None)  # nothing listens on a port: the rendezvous is the file
    interface = loopback_interface()
    env.setdefault("GLOO_SOCKET_IFNAME", interface)
    env.setdefault("NCCL_SOCKET_IFNAME", interface)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def report_error(line: str) -> bool:
    """In a launched process: hand `line` (a one-line message) to the launcher instead of printing
    it. False when this process was not started by `launch`."""
    directory = os.environ.get(ERRORS_VARIABLE)
    if not directory:
        return False
    rank = os.environ.get("RANK", "0")
    try:
        with open(Path(directory) / f"{time.time_ns()}-{rank}", "w") as f:
            f.write(line)
    except OSError:
        return False
    return True


def _stop(processes: list[subprocess.Popen], sig: int) -> None:
    for process in processes:
        if process.poll() is None:
            try:
                process.send_signal(sig)
            except ProcessLookupError:
                pass


def _wait_all(processes: list[subprocess.Popen]) -> int | None:
    """Wait for every process; once one fails, give the others GRACE_SECONDS, then SIGTERM, then
    SIGKILL. Returns the first failure's exit status (None: all succeeded)."""
    failed: int | None = None
    failed_at = 0.0
    terminated = False
    while any(p.poll() is None for p in processes):
        time.sleep(0.1)
        for p in processes:
            code = p.poll()
            if code not in (None, 0) and failed is None:
                failed, failed_at = code, time.monotonic()
        if failed is not None:
            waited = time.monotonic() - failed_at
            if waited > GRACE_SECONDS and not terminated:
                _stop(processes, signal.SIGTERM)
                terminated = True
            elif waited > 3 * GRACE_SECONDS:
                _stop(processes, signal.SIGKILL)
    if failed is None:
        failed = next((p.returncode for p in processes if p.returncode != 0), None)
    return failed


class _Stopped(Exception):
    """SIGTERM or SIGHUP reached the launcher: its processes are stopped with it."""


def _on_stop(signum, frame) -> None:
    raise _Stopped(signum)


SCRATCH_PREFIX = "lorakit-launch-"


def _clean_stale_scratch() -> None:
    """Remove the scratch directories of launchers that were killed (named by their process id)."""
    import shutil

    root = Path(tempfile.gettempdir())
    for path in root.glob(f"{SCRATCH_PREFIX}*-*"):
        pid = path.name[len(SCRATCH_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def launch(nproc: int, command: list[str]) -> int:
    """Run `command` as `nproc` processes of one torch.distributed group; returns the exit status
    (the first failure's: 2 for a reported error, 130 for Ctrl-C, 128 + N when stopped by signal N)."""
    if Path("/proc").is_dir():
        _clean_stale_scratch()
    previous = {sig: signal.signal(sig, _on_stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _launch(nproc, command)
    except _Stopped as stopped:
        return 128 + stopped.args[0]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _launch(nproc: int, command: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as scratch:
        errors = Path(scratch) / "errors"
        errors.mkdir()
        rendezvous = Path(scratch) / "rendezvous"
        processes: list[subprocess.Popen] = []
        try:
            for rank in range(nproc):
                processes.append(subprocess.Popen(command, env=process_environment(nproc, rank, rendezvous, errors)))
            interrupts = 0
            while True:
                try:
                    failed = _wait_all(processes)
                    break
                except KeyboardInterrupt:  # the processes got the same Ctrl-C: they save a checkpoint and stop
                    interrupts += 1
                    if interrupts > 1:  # a second one: stop now (the finally below kills what runs)
                        raise
        finally:
            _stop(processes, signal.SIGTERM)  # only what is still running: a second Ctrl-C, or SIGTERM here
            for process in processes:
                try:
                    process.wait(timeout=GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        reported = [(path.name.rsplit("-", 1)[1], path.read_text().rstrip("\n")) for path in sorted(errors.iterdir())]
        if reported:
            print(one_message(reported), file=sys.stderr)
    if failed is None:
        return 0
    return failed if failed > 0 else 128 - failed  # killed by signal N: 128 + N, as a shell reports it


def one_message(reported: list[tuple[str, str]]) -> str:
    """The line to print for the processes' messages ((rank, line), earliest first): the main process's
    (it names what only it knows, e.g. the checkpoint it saved), else the first one, without its
    `[process N]` mark when every process said the same."""
    main = [line for rank, line in reported if rank == "0"]
    if main:
        return main[0]
    unmarked = [re.sub(r"^error: \[process \d+\] ", "error: ", line) for _, line in reported]
    return unmarked[0] if len(set(unmarked)) == 1 else reported[0][1]


def main(argv: list[str] | None = None) -> int:
    """`python -m lorakit.train.launch N SCRIPT ARGS...`: SCRIPT on N processes (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or not argv[0].isdigit() or int(argv[0]) < 1:
        print("usage: python -m lorakit.train.launch N SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    return launch(int(argv[0]), [sys.executable, *argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
