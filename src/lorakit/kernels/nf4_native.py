"""lorakit's native CPU kernel for NF4 dequantization (`_nf4_native.c`), loaded with ctypes.

The C library is compiled when lorakit is installed (`pip install .` or `pip install -e .`: an
optional setuptools extension, see setup.py) and lies next to this file as
`_nf4_native<extension suffix>` (e.g. `_nf4_native.cpython-311-x86_64-linux-gnu.so`). Without a C
compiler the install still succeeds, the library is absent, and `nf4.dequantize_nf4` uses its
PyTorch path, which gives the same bits.

Environment:
    LORAKIT_NATIVE=0             never use the native kernel (read at each call)
    LORAKIT_NF4_ISA=scalar|avx2|avx512|avx512vbmi
                                 force one code path of the kernel (default: the best the CPU
                                 runs); a path the CPU (or the build) lacks raises NativeKernelError

Large tensors are cut into chunks of whole blocks that run in parallel on `torch.get_num_threads()`
threads (a thread pool; ctypes releases the GIL during the call).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch

from ..errors import LorakitError

LIBRARY_NAME = "_nf4_native"
ISAS = ("scalar", "avx2", "avx512", "avx512vbmi")
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# weights per thread below which a dequantization is not split: a chunk of 2^19 is some 30-60 us of
# work, well above the cost of handing it to a pool thread (10-30 us)
MIN_WEIGHTS_PER_THREAD = 1 << 19

_load_error: str | None = None


class NativeKernelError(LorakitError, RuntimeError):
    """The kernel cannot run as the environment asks (LORAKIT_NF4_ISA): one `error:` line on the CLI."""


def library_path(name: str = LIBRARY_NAME) -> Path | None:
    """Where the compiled library `name` is (None if lorakit was installed without it)."""
    try:
        spec = importlib.util.find_spec(f"{__package__}.{name}")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and os.path.isfile(spec.origin):
        return Path(spec.origin)
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (here / f"{name}{suffix}").is_file():
            return here / f"{name}{suffix}"
    return None


@cache
def _library() -> ctypes.CDLL | None:
    global _load_error
    path = library_path()
    if path is None:
        _load_error = f"{LIBRARY_NAME} was not built (no C compiler when lorakit was installed?)"
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        _load_error = f"{path}: {e}"
        return None
    try:
        lib.lorakit_nf4_isa_supported.argtypes = [ctypes.c_int]
        lib.lorakit_nf4_isa_supported.restype = ctypes.c_int
        lib.lorakit_nf4_best_isa.argtypes = []
        lib.lorakit_nf4_best_isa.restype = ctypes.c_int
        lib.lorakit_nf4_dequantize.argtypes = (
            [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_void_p]
        )
        lib.lorakit_nf4_dequantize.restype = None
    except AttributeError as e:  # a library from another version of lorakit
        _load_error = f"{path}: {e} (reinstall lorakit to rebuild it)"
        return None
    return lib


def available() -> bool:
    """Whether the native library is built and loads."""
    return _library() is not None


def load_error() -> str | None:
    """Why the library is not available (None when it is)."""
    _library()
    return _load_error


def enabled() -> bool:
    """Available and not switched off by LORAKIT_NATIVE=0."""
    return os.environ.get("LORAKIT_NATIVE", "1") != "0" and _library() is not None


def supported_isas() -> list[str]:
    """The kernel's code paths this CPU runs ("scalar" always)."""
    lib = _library()
    return [name for i, name in enumerate(ISAS) if lib is not None and lib.lorakit_nf4_isa_supported(i)]


@cache
def _resolve_isa(forced: str | None) -> int:
    lib = _library()
    if lib is None:
        raise NativeKernelError(f"lorakit's native NF4 kernel is not available: {load_error()}")
    if not forced:
        return lib.lorakit_nf4_best_isa()
    if forced not in ISAS:
        raise NativeKernelError(f"LORAKIT_NF4_ISA={forced!r}: expected one of {', '.join(ISAS)}")
    if not lib.lorakit_nf4_isa_supported(ISAS.index(forced)):
        raise NativeKernelError(
            f"LORAKIT_NF4_ISA={forced}: this CPU (or this build) cannot run it; it runs {supported_isas()}"
        )
    return ISAS.index(forced)


def isa() -> str:
    """The code path used: LORAKIT_NF4_ISA if set (checked), else the best one."""
    return ISAS[_resolve_isa(os.environ.get("LORAKIT_NF4_ISA"))]


def accepts(packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int, dtype: torch.dtype) -> bool:
    """Whether `dequantize` handles this call (else nf4.dequantize_nf4 takes its PyTorch path).

    CPU tensors (not subclasses such as the fake tensors of tracing, not under torch.compile), uint8
    codes, fp32/bf16/fp16 output, an even block size, enough codes and scales for `n` weights, no
    autograd through `absmax`, and LORAKIT_NATIVE not 0.
    """
    return (
        dtype in DTYPES
        and type(packed) is torch.Tensor
        and type(absmax) is torch.Tensor
        and packed.is_cpu
        and absmax.is_cpu
        and packed.dtype == torch.uint8
        and absmax.is_floating_point()
        and n > 0
        and blocksize > 0
        and blocksize % 2 == 0
        and packed.numel() * 2 >= n
        and absmax.numel() * blocksize >= n
        and not (absmax.requires_grad and torch.is_grad_enabled())
        and not torch.compiler.is_compiling()
        and enabled()
    )


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorakit-nf4")
        return _pool


def _forget_pool_after_fork() -> None:  # the pool's threads do not exist in a forked child
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    n: int,
    blocksize: int,
    dtype: torch.dtype,
    code: torch.Tensor,
    shape: tuple[int, ...] | torch.Size | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The first `n` weights in `dtype` (flat, or in `shape`): `code[nibble] * absmax[block]` in fp32,
    rounded once (into `out`, a contiguous CPU tensor of `n` elements in `dtype`, when given).

    `packed`: uint8, two codes per byte (high nibble first); `absmax`: per-block scales (fp32 after
    `.float()`); `code`: the 16 NF4 values. Call when `accepts(...)` is true.
    """
    lib = _library()
    path = _resolve_isa(os.environ.get("LORAKIT_NF4_ISA"))
    if not packed.is_contiguous():
        packed = packed.contiguous()
    if absmax.dtype != torch.float32 or not absmax.is_contiguous():
        absmax = absmax.detach().float().contiguous()
    if code.dtype != torch.float32 or not code.is_contiguous():
        code = code.float().contiguous()
    if out is None:
        out = torch.empty(n if shape is None else shape, dtype=dtype)
    blocks = (n + blocksize - 1) // blocksize
    args = (path, DTYPES[dtype], packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), blocksize, n)
    parts = min(torch.get_num_threads(), blocks, max(1, n // MIN_WEIGHTS_PER_THREAD))
    if parts <= 1:
        lib.lorakit_nf4_dequantize(*args, 0, blocks, out.data_ptr())
        return out
    bounds = [blocks * i // parts for i in range(parts + 1)]
    futures = [
        _executor(parts - 1).submit(lib.lorakit_nf4_dequantize, *args, bounds[i], bounds[i + 1], out.data_ptr())
        for i in range(1, parts)
    ]
    lib.lorakit_nf4_dequantize(*args, bounds[0], bounds[1], out.data_ptr())
    for f in futures:
        f.result()
    return out
