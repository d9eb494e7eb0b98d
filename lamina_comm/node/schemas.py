"""Request bodies of the front door, as pydantic models.

The models check shape and types (strictly: a string is not a number, true is
not 1) and refuse unknown fields; ranges and the meaning of values are
checked where the values are used (``SamplingParams``, ``openai_api``), so
that each rule lives in one place. ``validate_body`` turns pydantic's errors
into one ``BodyError`` that names the field, which the HTTP layer answers as
a 400 (an OpenAI error object on /v1, ``{"error"}`` elsewhere).

Bodies are parsed straight from bytes (``model_validate_json``): pydantic's
JSON parser bounds nesting depth itself, so a hostile body cannot recurse the
server into a crash.
"""
from __future__ import annotations

from typing import Literal, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lamina_comm.model import SamplingParams

_DEFAULTS = SamplingParams()

TokenIds = list[int]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class GenerateBody(_Body):
    """POST /generate."""

    prompt: TokenIds = Field(min_length=1)
    max_tokens: int = _DEFAULTS.max_tokens
    temperature: float = _DEFAULTS.temperature
    top_p: float = _DEFAULTS.top_p
    seed: Optional[int] = None
    stop_token_ids: TokenIds = []
    stream: bool = False


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """What /v1/completions and /v1/chat/completions share. OpenAI clients send null for "not set"."""

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[None, str, list[str]] = None
    stop_token_ids: Optional[TokenIds] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    return_token_ids: Optional[bool] = None
    user: Optional[str] = None


class CompletionBody(SamplingFields):
    """POST /v1/completions: a prompt of token ids, a list of them, a text, or a list of texts."""

    prompt: Union[TokenIds, list[TokenIds], str, list[str]]
    logprobs: Optional[int] = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatBody(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None  # the newer name of max_tokens


# Fields that may take several shapes, and how to say which.
_UNION_FIELDS = {
    "prompt": "a list of integer token ids, a list of such lists, a text, or a list of texts",
    "stop": "a text or a list of texts",
}


class BodyError(ValueError):
    """A body that does not fit its schema; ``field`` is the top-level field at fault (None: the body)."""

    def __init__(self, message: str, field: Optional[str]):
        super().__init__(message)
        self.field = field


Model = TypeVar("Model", bound=_Body)


def validate_body(model: type[Model], body: bytes) -> Model:
    """``body`` parsed as ``model``; BodyError naming the first field at fault."""
    if not body.strip():
        raise BodyError("a JSON body is required", None)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise body_error(exc) from None


# pydantic's error types, said the way the rest of the front door says them.
_PHRASES = {
    "int_type": "must be an integer", "int_parsing": "must be an integer",
    "float_type": "must be a number", "float_parsing": "must be a number",
    "bool_type": "must be true or false", "string_type": "must be a text",
    "list_type": "must be a list", "too_short": "must not be empty",
    "model_type": "must be a JSON object", "dict_type": "must be a JSON object",
}


def body_error(exc: ValidationError) -> BodyError:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    location = first["loc"]
    kind = first["type"]
    if kind == "json_invalid":
        return BodyError(f"body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}", None)
    if kind == "extra_forbidden":
        unknown = sorted(_path(e["loc"]) for e in errors if e["type"] == "extra_forbidden" and e["loc"])
        return BodyError(f"unknown fields {unknown}", str(location[0]))
    field = str(location[0]) if location else None
    if kind == "missing":
        return BodyError(f"{_path(location)} is required", field)
    if field in _UNION_FIELDS and len(location) > 1 and isinstance(location[1], str):
        # one error per alternative (loc names it: "str", "list[int]"): say what the field may be instead
        return BodyError(f"{field} must be {_UNION_FIELDS[field]}", field)
    return BodyError(f"{_path(location)} {_PHRASES.get(kind, 'is invalid: ' + first['msg'])}", field)


def _path(location: tuple) -> str:
    """("messages", 0, "role") -> "messages[0].role"; () -> "body"."""
    if not location:
        return "body"
    return str(location[0]) + "".join(f"[{part}]" if isinstance(part, int) else f".{part}"
                                      for part in location[1:])
