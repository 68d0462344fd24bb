"""What lorakit writes, written so that nothing the user had is lost and no failure is cryptic.

- `atomic_write` / `atomic_write_text` / `atomic_directory`: a file or a directory is built under a
  hidden temporary name beside its target (`.<name>.tmp-<pid>-<random>`), synced, then renamed into
  place: a crash, a kill or a full disk leaves the earlier file as it was, never a half-written or
  empty one. Leftovers of a killed process are removed by the next start (`clean_temporaries`).
- `write_error`: an `OSError` as one line that says what happened to what (the disk is full, the
  directory is read-only, ...) and what was kept.
- `check_file_target` / `check_directory_target`: an output path that cannot be written (a broken
  symbolic link, a directory where a file goes, a parent that is a file, a read-only place), refused
  before any slow work.
- `DirectoryLock`: one process at a time in a run directory (`flock`); a second one is told which
  process holds it.

At the foundation of lorakit's layers: this module imports nothing of lorakit but its errors.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import LorakitError

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
LOCK_NAME = ".lock"


def _stem(name: str) -> str:
    """`name`, cut to leave room for the marks of a temporary name within the usual 255-byte limit."""
    encoded = name.encode()
    return name if len(encoded) <= 200 else encoded[:200].decode(errors="ignore")


def temporary_name(target: Path, kind: str = "tmp") -> Path:
    """A hidden name beside `target`, marked with this process's id (`clean_temporaries` removes it
    once that process is gone)."""
    return target.with_name(f".{_stem(target.name)}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def is_temporary(path: Path) -> bool:
    """Whether `path` is named as `temporary_name` names temporaries."""
    return _TEMP.match(path.name) is not None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_temporaries(directory: Path, name: str | None = None) -> list[Path]:
    """Remove the temporary files and directories (`temporary_name`) a killed process left in
    `directory` (only those of `name` when given); those of a process still running stay."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for path in entries:
        found = _TEMP.match(path.name)
        if (
            found is None
            or (name is not None and found.group("name") != _stem(name))
            or _alive(int(found.group("pid")))
        ):
            continue
        target = path.with_name(found.group("name"))
        if found.group("kind") == "old" and not target.exists() and not target.is_symlink():
            os.rename(path, target)  # a kill between `_swap`'s two renames: the earlier directory comes back
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed.append(path)
    return removed


def write_error(err: OSError, path: str | os.PathLike, kept: bool = False) -> LorakitError:
    """One line for a failed write of `path`: what went wrong in words, and that the earlier file is
    kept (`kept`: there was one, and an atomic write leaves it as it was)."""
    code = err.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        reason = "the disk is full"
    elif code == errno.EROFS:
        reason = "the file system is read-only"
    elif code in (errno.EACCES, errno.EPERM):
        reason = "permission denied"
    elif code == errno.EFBIG:
        reason = "the file is larger than this system allows"
    else:
        reason = err.strerror[:1].lower() + err.strerror[1:] if err.strerror else str(err)
    tail = f"; the earlier {Path(path).name} is kept as it was" if kept else ""
    if code in (errno.ENOSPC, errno.EDQUOT):
        return LorakitError(
            f"the disk is full: {path} was not written{tail}; free some space and run the command again"
        )
    return LorakitError(f"cannot write {path}: {reason}{tail}")


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot sync a directory: the rename stands
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _give_mode(path: Path, replacing: Path) -> None:
    """The mode the file or directory at `replacing` has (a private file stays private), else an
    ordinary one (temporary files are made private)."""
    try:
        mode = replacing.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = (0o777 if path.is_dir() else 0o666) & ~umask
    os.chmod(path, mode)


def is_stream(path: Path) -> bool:
    """Whether `path` is a character device or a pipe (/dev/stdout, a FIFO): written into, never
    replaced (a rename over it would swap the device node for a file)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Write `path` through `write(temporary path)`: synced and renamed over `path` once complete.
    An OSError (full disk, read-only directory, ...) raises `write_error` with nothing left behind
    and the earlier file, if any, untouched. A stream (`is_stream`) is written straight into."""
    path = Path(path)
    if is_stream(path):
        try:
            write(path)
        except OSError as err:
            raise write_error(err, path) from None
        return
    existed = path.exists()
    tmp = temporary_name(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _give_mode(tmp, path)
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError):
            raise write_error(err, path, kept=existed) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`path.write_text(text)`, atomically (see `atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """A directory built in a temporary sibling (yielded) and renamed to `path` when the block ends
    without error; with `replace` an existing `path` is replaced as a whole (the old one is removed
    only after the new one is in place). A failure removes the temporary directory and leaves `path`
    as it was; an OSError becomes `write_error`."""
    path = Path(path)
    existed = path.exists()
    tmp = temporary_name(path)
    old = None
    try:
        tmp.mkdir()
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                fd = os.open(file, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _give_mode(tmp, path)
        if existed and replace and any(path.iterdir()):
            old = _swap(tmp, path)  # the new directory at `path`; the earlier one where `old` says
        else:
            os.replace(tmp, path)  # onto an empty directory, or none
        _fsync_directory(path.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise write_error(err, path, kept=existed) from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _swap(new: Path, path: Path) -> Path:
    """Put the directory `new` at `path`, whose earlier directory goes aside; returns where it went.
    Linux swaps the two in one step (renameat2's RENAME_EXCHANGE): a kill at any moment leaves `path`
    whole, old or new. Elsewhere two renames, with the earlier one named so that the next start puts
    it back should a kill fall between them (`clean_temporaries`)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        exchanged = libc.renameat2(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(path), _RENAME_EXCHANGE) == 0
        failure = ctypes.get_errno()
    except (OSError, AttributeError):  # no renameat2 in this C library
        exchanged, failure = False, errno.ENOSYS
    if exchanged:
        return new
    if failure not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        raise OSError(failure, os.strerror(failure), str(path))
    aside = temporary_name(path, "old")
    os.rename(path, aside)
    os.rename(new, path)
    return aside


def _writable_directory(directory: Path, flag: str) -> None:
    """The nearest existing directory at or above `directory` (where a missing one will be made)
    must be a directory this process can write into."""
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise LorakitError(f"{flag}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        read_only = False
        with contextlib.suppress(OSError):
            read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        raise LorakitError(
            f"{flag}: cannot write into {probe}: "
            + ("the file system is read-only" if read_only else "permission denied")
        )


def _no_broken_link(path: Path, flag: str) -> None:
    """Neither `path` nor a directory above it is a symbolic link to nothing."""
    for step in (path, *path.parents):
        if step.is_symlink() and not step.exists():
            where = f"{flag} {path}" if step == path else f"{flag} {path}: {step}"
            raise LorakitError(
                f"{where} is a broken symbolic link (to {os.readlink(step)}); remove it or give another path"
            )


def check_file_target(path: str | os.PathLike, flag: str) -> Path:
    """A file output (`flag` names it in messages) that can be written: not a directory, not a broken
    symbolic link, in a directory that exists or can be made and is writable. Returns the path to
    write: a symbolic link's target (the link stays)."""
    path = Path(path)
    _no_broken_link(path, flag)
    if path.exists() and not path.is_dir() and not path.is_file() and not is_stream(path):
        raise LorakitError(f"{flag} {path} is not a regular file (a block device or a socket); give a file name")
    if path.is_dir():
        raise LorakitError(f"{flag} {path} is a directory; give a file name (e.g. {path / 'out'})")
    resolved = Path(os.path.realpath(path))
    _writable_directory(resolved.parent, flag)
    return resolved if path.is_symlink() else path


def check_directory_target(path: str | os.PathLike, flag: str) -> Path:
    """A directory output that can be made and written: not a file, not a broken symbolic link, under
    a writable directory. Returns its resolved path."""
    path = Path(path)
    _no_broken_link(path, flag)
    if path.exists() and not path.is_dir():
        raise LorakitError(f"{flag} {path} is a file, not a directory")
    resolved = Path(os.path.realpath(path))
    _writable_directory(resolved if resolved.exists() else resolved.parent, flag)
    return resolved


def make_directory(path: Path, flag: str) -> None:
    """`mkdir -p`, with a failure as one line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise LorakitError(f"{flag}: {path} (or a directory above it) is a file, not a directory") from None
    except OSError as err:
        raise write_error(err, path) from None


def _held_message(directory: Path, holder: str, what: str) -> str:
    who = f"process {holder}" if holder.isdigit() else "another process"
    return (
        f"{directory} is being {what} by {who} (it holds {directory / LOCK_NAME}); wait for it to finish, "
        "or stop it first"
    )


class DirectoryLock:
    """An exclusive lock on a directory (a `.lock` file in it, `flock`ed) for as long as a process
    works in it; the file holds the holder's process id. Released by `release` or when the process
    ends, however it ends (the kernel drops the lock with the file descriptor)."""

    def __init__(self, directory: Path, fd: int | None) -> None:
        self.directory = directory
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: str | os.PathLike, what: str = "trained") -> DirectoryLock:
        """Lock `directory` (which must exist), or raise one line naming the process that holds it."""
        directory = Path(directory)
        path = directory / LOCK_NAME
        while True:
            try:  # never through a symbolic link: truncating its target would destroy another file
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise LorakitError(f"{path} is a symbolic link, not lorakit's lock file; remove it") from None
                raise write_error(err, path) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                os.close(fd)
                raise LorakitError(_held_message(directory, holder, what)) from None
            except OSError:  # a file system that cannot lock (some network ones): go on as before locks
                os.close(fd)
                return cls(directory, None)
            try:  # the file we locked must still be the one at `path` (a holder may have removed it)
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:  # a full disk: the lock holds without the note of who holds it
            pass
        return cls(directory, fd)

    @staticmethod
    def check(directory: str | os.PathLike, what: str = "trained") -> None:
        """Raise `acquire`'s error if a process holds `directory`'s lock now; change nothing."""
        path = Path(directory) / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return  # no lock file (or not one of lorakit's): nobody holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            raise LorakitError(_held_message(Path(directory), holder, what)) from None
        except OSError:  # cannot lock here: nobody can
            pass
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
