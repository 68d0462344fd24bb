"""Builds lorakit's one native piece: the NF4 dequantization kernel (src/lorakit/kernels/_nf4_native.c).

Everything else about the package is in pyproject.toml. The kernel is plain C loaded with ctypes
(lorakit/kernels/nf4_native.py), built as an optional extension so that it is compiled by `pip install .`
and `pip install -e .` alike and lands next to nf4_native.py; without a working C compiler the build
step fails quietly, lorakit still installs, and NF4 dequantization uses its PyTorch path.
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
        )
    ]
)
