"""lorakit/train/allocator.py: glibc's malloc gives freed large blocks back on a CPU run, and nothing
is touched where the environment chose, the user opted out, the device is not the CPU or the C
library is not glibc."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from lorakit.errors import LorakitError
from lorakit.train import allocator


class FakeLibc:
    def __init__(self, answer: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer


def test_sets_the_mmap_and_trim_thresholds_on_a_cpu_run():
    libc = FakeLibc()
    assert allocator.return_freed_memory_to_system("cpu", environ={}, libc=libc) is True
    assert libc.calls == [(allocator.M_MMAP_THRESHOLD, 1 << 20), (allocator.M_TRIM_THRESHOLD, 2 << 20)]
    assert allocator.M_MMAP_THRESHOLD == -3 and allocator.M_TRIM_THRESHOLD == -1  # glibc's malloc.h


@pytest.mark.parametrize(
    "environ",
    [
        {"LORAKIT_MALLOC": "default"},
        {"LORAKIT_MALLOC": " Default "},
        {"MALLOC_MMAP_THRESHOLD_": "4194304"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536:glibc.malloc.arena_max=2"},
    ],
)
def test_the_environment_wins(environ):
    libc = FakeLibc()
    assert allocator.return_freed_memory_to_system("cpu", environ=environ, libc=libc) is False
    assert libc.calls == []


@pytest.mark.parametrize("choice", ["", "lorakit", " LoRAkit"])
def test_other_settings_of_the_variables_do_not_opt_out(choice):
    libc = FakeLibc()
    environ = {"LORAKIT_MALLOC": choice, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert allocator.return_freed_memory_to_system("cpu", environ=environ, libc=libc) is True
    assert len(libc.calls) == 2


@pytest.mark.parametrize("choice", ["off", "defualt", "0"])
def test_an_unknown_choice_is_an_error_not_a_silent_default(choice):
    libc = FakeLibc()
    with pytest.raises(LorakitError, match=f"LORAKIT_MALLOC='{choice}': expected 'default'"):
        allocator.return_freed_memory_to_system("cpu", environ={"LORAKIT_MALLOC": choice}, libc=libc)
    assert libc.calls == []


def test_lorakit_train_reports_an_unknown_choice_as_one_error_line(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env["LORAKIT_MALLOC"] = "off"
    done = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", "--out-dir", str(tmp_path), "--steps", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: LORAKIT_MALLOC='off': expected 'default'")
    assert list(tmp_path.iterdir()) == []  # refused before any run directory


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps", "meta"])
def test_not_on_other_devices(device):
    libc = FakeLibc()
    assert allocator.return_freed_memory_to_system(device, environ={}, libc=libc) is False
    assert libc.calls == []


class NoMallopt:
    pass


class RaisingMallopt:
    def mallopt(self, param, value):
        raise OSError("not here")


@pytest.mark.parametrize("libc", [NoMallopt(), RaisingMallopt(), FakeLibc(answer=0)])
def test_never_raises_where_mallopt_is_missing_or_refuses(libc):
    assert allocator.return_freed_memory_to_system("cpu", environ={}, libc=libc) is False


def test_another_c_library_is_left_alone(monkeypatch):
    """musl, macOS: no glibc version, so no libc is opened and nothing is called."""

    def no_confstr(name):
        raise ValueError("unrecognized configuration name")

    monkeypatch.setattr(allocator.os, "confstr", no_confstr)
    assert allocator.glibc_version() is None
    opened = []
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *a: opened.append(a))
    assert allocator.return_freed_memory_to_system("cpu", environ={}) is False
    assert opened == []
    monkeypatch.setattr(allocator.os, "confstr", lambda name: None)
    assert allocator.glibc_version() is None


def test_train_sets_it_up_for_the_run_device(monkeypatch):
    """The trainer's set-up calls it with the run's device before loading the model."""
    import lorakit.train.loop as loop

    seen = []

    class Stop(Exception):
        pass

    def record(device="cpu", environ=None, libc=None):
        seen.append(device)
        raise Stop

    monkeypatch.setattr(loop.allocator, "return_freed_memory_to_system", record)
    with pytest.raises(Stop):
        loop.set_up(loop.TrainConfig(method="lora", device="cpu"), echo=lambda *_: None, strategy=loop.SingleProcess())
    assert seen == ["cpu"]


# A process that allocates large blocks interleaved with smaller ones it keeps, frees the large ones and
# reports its resident set. A freed 4 MiB block before the threshold is set comes from the heap (the
# adaptive threshold rose past it with the first 8 MiB block freed) and stays resident; after, it is
# an mmap of its own, unmapped at free.
HOLES = textwrap.dedent("""
    import ctypes, json, sys
    from lorakit.train import allocator
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def rss():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
    big = libc.malloc(8 << 20); ctypes.memset(big, 1, 8 << 20); libc.free(big)  # raises glibc's adaptive threshold
    applied = allocator.return_freed_memory_to_system("cpu") if sys.argv[1] == "on" else False
    before = rss()
    large, kept = [], []
    for _ in range(64):
        block = libc.malloc(4 << 20)
        ctypes.memset(block, 1, 4 << 20)
        large.append(block)
        kept.append(libc.malloc(512 << 10))  # too large for the holes the imports left: placed after the block
    interleaved = sum(a < k < b for a, k, b in zip(large, kept, large[1:]))
    for block in large:
        libc.free(block)
    print(json.dumps({"applied": applied, "interleaved": interleaved, "retained_mib": rss() - before}))
""")


def retained(setting: str) -> dict:
    import json

    env = {k: v for k, v in __import__("os").environ.items() if k not in ("LORAKIT_MALLOC", "MALLOC_MMAP_THRESHOLD_")}
    done = subprocess.run([sys.executable, "-c", HOLES, setting], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(allocator.glibc_version() is None or not sys.platform.startswith("linux"), reason="glibc on Linux")
def test_freed_large_blocks_leave_the_resident_set():
    off, on = retained("off"), retained("on")
    assert on["applied"] is True
    assert off["interleaved"] >= 56  # the blocks lie between kept ones, not merged into the heap's top
    assert off["retained_mib"] >= 200  # 256 MiB freed, still resident: what the setting is for
    assert on["retained_mib"] <= 32
