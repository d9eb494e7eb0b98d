"""cffi builder (API / out-of-line mode): compiles native/ into lamina_comm._lamina.

The declarations come from the public header itself (between the CDEF
markers), so the C API and the bindings cannot drift apart. The verbs
transport is compiled in when rdma-core's headers are present (Debian
libibverbs-dev); LAMINA_WITH_VERBS=0/1 forces the choice. LAMINA_SANITIZE=1
builds with ASan/UBSan (see `make asan`).
"""
from __future__ import annotations

import os
import pathlib
import re

from cffi import FFI

ROOT = pathlib.Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"
HEADERS = [NATIVE / "include" / "lamina.h", NATIVE / "include" / "lamina_bench.h"]


def _cdef_from_header(text: str) -> str:
    body = text.split("/* CDEF BEGIN */", 1)[1].split("/* CDEF END */", 1)[0]
    # cffi understands integer #defines, not other directives or comments.
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    return "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("#") or line.lstrip().startswith("#define"))


def _want_verbs() -> bool:
    forced = os.environ.get("LAMINA_WITH_VERBS")
    if forced is not None:
        return forced not in ("0", "", "no", "false")
    have_sources = any((NATIVE / "src" / "verbs").glob("*.c"))
    return have_sources and pathlib.Path("/usr/include/infiniband/verbs.h").exists()


def _sources(with_verbs: bool) -> list[str]:
    dirs = ["core", "tcp", "shm", "channel", "staged", "bench"] + (["verbs"] if with_verbs else [])
    files: list[str] = []
    for d in dirs:
        files += sorted(str(p.relative_to(ROOT)) for p in (NATIVE / "src" / d).glob("*.c"))
    return files


def make_ffi() -> FFI:
    with_verbs = _want_verbs()
    ffibuilder = FFI()
    for header in HEADERS:
        ffibuilder.cdef(_cdef_from_header(header.read_text()))
    cflags = ["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", "-O2", "-g"]
    ldflags: list[str] = []
    libraries = ["pthread"]
    macros = []
    if with_verbs:
        macros.append(("LM_HAVE_VERBS", "1"))
        libraries.append("ibverbs")
    if os.environ.get("LAMINA_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        cflags += san
        ldflags += san
    ffibuilder.set_source(
        "lamina_comm._lamina",
        '#include "lamina.h"\n#include "lamina_bench.h"\n'
        f"static const int LM_BUILT_WITH_VERBS = {1 if with_verbs else 0};\n",
        sources=_sources(with_verbs),
        include_dirs=[str(NATIVE / "include")],
        define_macros=macros,
        libraries=libraries,
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    ffibuilder.cdef("static const int LM_BUILT_WITH_VERBS;")
    return ffibuilder


ffibuilder = make_ffi()

# What the last build was made with. The compiler skips objects newer than
# their sources, so without this a plain build after a sanitized one (make
# asan) kept the sanitized library, which then refuses to load without the
# ASan runtime preloaded.
STAMP = ROOT / "lamina_comm" / ".build-flavour"


def _flavour() -> str:
    return "sanitize" if os.environ.get("LAMINA_SANITIZE") == "1" else "plain"


def _drop_other_flavour() -> None:
    if STAMP.exists() and STAMP.read_text() == _flavour():
        return
    for stale in [*(ROOT / "lamina_comm").glob("_lamina*.so"), *(ROOT / "lamina_comm").glob("_lamina*.o"),
                  *(NATIVE / "src").rglob("*.o")]:
        stale.unlink()


if __name__ == "__main__":
    os.chdir(ROOT)
    _drop_other_flavour()
    ffibuilder.compile(verbose=True)
    STAMP.write_text(_flavour())
