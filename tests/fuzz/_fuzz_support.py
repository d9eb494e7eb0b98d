"""What every atheris fuzzer in tests/fuzz shares: instrumented import of its
target, and the command line (libFuzzer flags, or --write-seeds DIR)."""
from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Callable

try:
    import atheris
except ImportError:  # replaying a corpus (check_one) needs no atheris
    atheris = None


def import_target(name: str, fuzzing: bool) -> ModuleType:
    """Import module `name`, instrumented for coverage when fuzzing with atheris."""
    if atheris is not None and fuzzing:
        with atheris.instrument_imports(include=[name]):
            return importlib.import_module(name)
    return importlib.import_module(name)


def write_seeds(directory: str, seeds: dict[str, bytes]) -> None:
    os.makedirs(directory, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


def main(check_one: Callable[[bytes], None], seeds: Callable[[], dict[str, bytes]]) -> None:
    """`--write-seeds DIR` regenerates the seed corpus; otherwise fuzz check_one."""
    if sys.argv[1:2] == ["--write-seeds"]:
        write_seeds(sys.argv[2], seeds())
        return
    if atheris is None:
        sys.exit("atheris is not installed: pip install -e '.[test]'")
    atheris.Setup(sys.argv, check_one)
    atheris.Fuzz()
