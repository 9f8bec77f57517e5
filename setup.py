"""The one compiled part of the server: the validator's two per-line loops (core/_jsonl_native.c).
Everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("batchgate_server.core._jsonl_native",
                             ["server/batchgate_server/core/_jsonl_native.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra"])])
