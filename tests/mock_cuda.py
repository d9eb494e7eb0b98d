"""Build tests/mock_libcuda.c, a host-memory stand-in for libcuda (see its header comment)."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

SOURCE = pathlib.Path(__file__).with_name("mock_libcuda.c")


def build_mock_libcuda(directory: str | os.PathLike) -> str | None:
    """Path of a freshly built mock libcuda.so.1 in directory; None without gcc.

    LAMINA_TEST_MOCK_LIBCUDA names one built already (tools/rxe-test.sh builds it on the host: compiling
    inside the emulated guest is slow)."""
    prebuilt = os.environ.get("LAMINA_TEST_MOCK_LIBCUDA")
    if prebuilt and os.path.exists(prebuilt):
        return prebuilt
    if shutil.which("gcc") is None:
        return None
    lib = pathlib.Path(directory) / "libcuda.so.1"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o", str(lib), str(SOURCE), "-lpthread"],
                   check=True)
    return str(lib)
