"""The one dtype table: its columns agree with numpy, torch and lamina.h, and it loads none of them."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from lamina_comm import dtypes
from lamina_comm.errors import InvalidArgumentError


@pytest.mark.parametrize("name", dtypes.NAMES)
def test_every_column_agrees(name: str) -> None:
    from lamina_comm._bindings import lib
    assert dtypes.itemsize(name) == dtypes.numpy_storage(name).itemsize
    assert dtypes.wire_code(name) == getattr(lib, f"LM_DTYPE_{name.upper()}")
    assert dtypes.name_of_wire_code(dtypes.wire_code(name)) == name
    if name != "bfloat16":  # numpy has none: its storage is plain uint16
        assert dtypes.canonical(dtypes.numpy_storage(name)) == name


def test_aliases_numpy_and_torch_dtypes_name_the_same_entry() -> None:
    torch = pytest.importorskip("torch")
    assert dtypes.canonical("bf16") == dtypes.canonical(torch.bfloat16) == "bfloat16"
    assert dtypes.canonical("half") == dtypes.canonical(np.float16) == "float16"
    assert dtypes.torch_dtype("fp32") is torch.float32
    with pytest.raises(InvalidArgumentError, match="not supported"):
        dtypes.canonical("uint16")  # bfloat16's storage, but not a dtype of its own


def test_importing_the_table_loads_neither_numpy_torch_nor_the_extension() -> None:
    code = ("import sys, lamina_comm.plan; "
            "print([m for m in ('numpy', 'torch', 'lamina_comm._lamina') if m in sys.modules])")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"
