"""Element types: one table for the channel wire, numpy, torch and the command lines.

Canonical names are numpy's, plus bfloat16, which numpy lacks: it is stored
as raw 16-bit words (uint16). Wire codes are lamina.h's LM_DTYPE_*. This
module imports neither numpy, torch nor the native extension until a lookup
needs one, so the planner (lamina_comm.plan) stays pure Python.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

from .errors import InvalidArgumentError


@dataclasses.dataclass(frozen=True)
class _DType:
    name: str      # canonical
    wire: str      # the lamina.h macro holding its wire code
    storage: str   # numpy dtype that holds its elements
    itemsize: int


_TABLE: dict[str, _DType] = {d.name: d for d in (
    _DType("float16", "LM_DTYPE_FLOAT16", "float16", 2),
    _DType("bfloat16", "LM_DTYPE_BFLOAT16", "uint16", 2),
    _DType("float32", "LM_DTYPE_FLOAT32", "float32", 4),
    _DType("int32", "LM_DTYPE_INT32", "int32", 4),
    _DType("int64", "LM_DTYPE_INT64", "int64", 8),
    _DType("uint8", "LM_DTYPE_UINT8", "uint8", 1),
    _DType("int8", "LM_DTYPE_INT8", "int8", 1),
    _DType("float64", "LM_DTYPE_FLOAT64", "float64", 8),
)}
NAMES = tuple(_TABLE)
ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
           "float": "float32", "fp64": "float64", "double": "float64"}
# What `lamina-bench pipeline --dtype` and `lamina-bench plan --dtype` accept.
CLI_CHOICES = ("bf16", "fp16", "fp32")


_KNOWN: dict[Any, str] = {}  # dtype objects and names already resolved (per message on the hot path)


def canonical(dtype: Any) -> str:
    """Canonical name of a dtype given as a name, alias, numpy or torch dtype."""
    try:
        return _KNOWN[dtype]
    except (KeyError, TypeError):  # (TypeError: not hashable)
        pass
    name = _canonical(dtype)
    try:
        if len(_KNOWN) < 256:
            _KNOWN[dtype] = name
    except TypeError:
        pass
    return name


def _canonical(dtype: Any) -> str:
    if isinstance(dtype, str):
        name = dtype
    elif str(dtype).startswith("torch."):
        name = str(dtype).removeprefix("torch.")
    else:
        import numpy as np  # on demand: only dtypes given as numpy (or Python) types need it
        name = np.dtype(dtype).name
    name = ALIASES.get(name, name)
    if name not in _TABLE:
        raise InvalidArgumentError(f"dtype {dtype!r} is not supported; choose from {sorted(_TABLE)}")
    return name


def itemsize(dtype: Any) -> int:
    return _TABLE[canonical(dtype)].itemsize


def numpy_storage(dtype: Any) -> Any:
    """The numpy dtype holding its elements (uint16 for bfloat16)."""
    return _numpy_storages()[canonical(dtype)]


def torch_dtype(dtype: Any) -> Any:
    import torch  # on demand: nothing else here needs torch
    return getattr(torch, canonical(dtype))


def wire_code(dtype: Any) -> int:
    """Its LM_DTYPE_* code on the channel wire."""
    return _wire_codes()[canonical(dtype)]


def name_of_wire_code(code: int) -> str:
    """The canonical name a wire code stands for; KeyError for a code lamina.h does not define."""
    return _names_by_wire_code()[code]


@functools.cache
def _numpy_storages() -> dict[str, Any]:
    import numpy as np
    return {d.name: np.dtype(d.storage) for d in _TABLE.values()}


@functools.cache
def _wire_codes() -> dict[str, int]:
    from ._bindings import lib  # on demand: the table is usable without the native extension
    return {d.name: getattr(lib, d.wire) for d in _TABLE.values()}


@functools.cache
def _names_by_wire_code() -> dict[int, str]:
    return {code: name for name, code in _wire_codes().items()}
