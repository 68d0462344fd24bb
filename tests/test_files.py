"""How lorakit writes files (`lorakit.files`): atomic, the earlier file kept on failure, a killed
writer's leftovers cleaned by the next start, one-line errors, one process per locked directory;
children that end with their parent (`lorakit.children`); the launcher's one message."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from lorakit import files
from lorakit.errors import LorakitError
from lorakit.train.launch import one_message


def test_atomic_write_replaces_whole_and_keeps_the_mode(tmp_path):
    target = tmp_path / "secret.json"
    target.write_text("old")
    target.chmod(0o600)
    files.atomic_write_text(target, "new")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.json"]


def test_a_failed_write_keeps_the_earlier_file_and_says_so_in_one_line(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("earlier")

    def full(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(
        LorakitError, match=r"^the disk is full: .*out.json was not written; the earlier out.json is kept"
    ):
        files.atomic_write(target, full)
    assert target.read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_killed_writers_leftovers_go_at_the_next_start_and_a_live_ones_stay(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f".a.gguf.tmp-{dead_pid}-0123abcd").write_text("half")
    (tmp_path / f".merged.tmp-{dead_pid}-0123abcd").mkdir()
    mine = tmp_path / f".a.gguf.tmp-{os.getpid()}-0123abcd"
    mine.write_text("being written")
    # a kill between the two renames of a replaced directory (where renameat2 is missing): it comes back
    (tmp_path / f".model.old-{dead_pid}-0123abcd").mkdir()
    (tmp_path / f".model.old-{dead_pid}-0123abcd" / "config.json").write_text("{}")
    files.clean_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, "model"])
    assert (tmp_path / "model" / "config.json").is_file()


@pytest.mark.parametrize("exchange", [True, False])
def test_a_directory_is_replaced_whole(exchange, tmp_path, monkeypatch):
    if not exchange:  # no renameat2: two renames
        monkeypatch.setattr(files.ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("no libc")))
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_directory(target, replace=True) as building:
            (building / "new.bin").write_text("half")
            raise RuntimeError("the save failed")
    assert sorted(p.name for p in target.iterdir()) == ["old.bin"]
    with files.atomic_directory(target, replace=True) as building:
        (building / "new.bin").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_one_process_holds_a_directory(tmp_path):
    lock = files.DirectoryLock.acquire(tmp_path)
    with pytest.raises(LorakitError, match=rf"is being trained by process {os.getpid()} "):
        files.DirectoryLock.acquire(tmp_path)
    with pytest.raises(LorakitError, match="is being compared by"):
        files.DirectoryLock.check(tmp_path, "compared")
    lock.release()
    files.DirectoryLock.check(tmp_path)
    files.DirectoryLock.acquire(tmp_path).release()


def test_unwritable_targets_are_named(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(LorakitError, match="is a broken symbolic link"):
        files.check_file_target(tmp_path / "link", "--out")
    with pytest.raises(LorakitError, match="link is a broken symbolic link"):
        files.check_directory_target(tmp_path / "link" / "deeper", "--out")
    with pytest.raises(LorakitError, match="is a file, not a directory"):
        files.check_file_target(tmp_path / "file" / "x.json", "--json")
    with pytest.raises(LorakitError, match="is a directory; give a file name"):
        files.check_file_target(tmp_path, "--html")
    assert files.check_file_target(tmp_path / "new" / "x.json", "--json") == tmp_path / "new" / "x.json"


def test_a_child_ends_with_its_parent(tmp_path):
    """parent -> child (follow_parent); the parent is killed: the child ends too."""
    child = textwrap.dedent("""
        import time
        from lorakit.children import follow_parent
        follow_parent()
        time.sleep(120)
    """)
    parent = textwrap.dedent(f"""
        import subprocess, sys, time
        from lorakit.children import child_environment
        p = subprocess.Popen([sys.executable, "-c", {child!r}], env=child_environment())
        print(p.pid, flush=True)
        time.sleep(120)
    """)
    started = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    pid = int(started.stdout.readline())
    time.sleep(1.0)  # the child has asked the kernel by now
    started.kill()
    started.wait()
    deadline = time.monotonic() + 15
    while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.1)


def test_the_launcher_prints_one_message():
    same = [("1", "error: [process 1] data file x does not exist"), ("0", "error: data file x does not exist")]
    assert one_message(same) == "error: data file x does not exist"
    assert one_message(
        [
            ("1", "interrupted at step 3; checkpoint saved to runs/a/checkpoints"),
            ("0", "interrupted at step 3; checkpoint saved to runs/a/checkpoints/step-000003"),
        ]
    ).endswith("step-000003")
    assert one_message([("1", "error: [process 1] no CUDA GPU")]) == "error: no CUDA GPU"


def test_a_planted_link_in_place_of_the_lock_is_never_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / files.LOCK_NAME).symlink_to(victim)
    with pytest.raises(LorakitError, match="is a symbolic link, not lorakit's lock file"):
        files.DirectoryLock.acquire(tmp_path / "run")
    files.DirectoryLock.check(tmp_path / "run")
    assert victim.read_text() == "precious"


def test_a_long_name_still_has_a_temporary_name(tmp_path):
    target = tmp_path / ("x" * 250 + ".json")
    files.atomic_write_text(target, "{}")
    assert target.read_text() == "{}" and len(list(tmp_path.iterdir())) == 1
