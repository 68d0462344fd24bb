"""Builds lorakit's native pieces: the NF4 dequantization kernel (src/lorakit/kernels/_nf4_native.c) and the
dropout-mask kernel (src/lorakit/kernels/_dropout_native.c).

Everything else about the package is in pyproject.toml. Each kernel is plain C loaded with ctypes
(lorakit/kernels/nf4_native.py, dropout.py), built as an optional extension so that it is compiled by `pip install .`
and `pip install -e .` alike and lands next to nf4_native.py; without a working C compiler the build
step fails quietly, lorakit still installs, and NF4 dequantization and dropout masks use their PyTorch
paths (the same bits).
Portable flags only (the vector code paths are chosen at run time), never -march=native.
"""

import sys

from setuptools import Extension, setup

unix_flags = ["-O3", "-fvisibility=hidden", "-ffp-contract=off", "-fno-fast-math"]

setup(
    ext_modules=[
        Extension(
            "lorakit.kernels._nf4_native",
            sources=["src/lorakit/kernels/_nf4_native.c"],
            extra_compile_args=[] if sys.platform == "win32" else unix_flags,
            optional=True,
        ),
        Extension(
            "lorakit.kernels._dropout_native",
            sources=["src/lorakit/kernels/_dropout_native.c"],
            extra_compile_args=[] if sys.platform == "win32" else unix_flags,
            optional=True,
        ),
    ]
)
