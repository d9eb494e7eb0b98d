"""The OpenAI-compatible surface of the front door, as vLLM serves it: requests parsed, answers built.

Transport-free (the HTTP layer calls these), so the same code serves any
server stack. Prompts are token ids (``prompt: [ids]`` or a list of them):
without a tokenizer there is no text, so each choice carries ``token_ids``
and ``text`` is empty (vLLM's ``return_token_ids``); a text prompt, or text
``stop`` strings, get a 400 that says so. Log-probabilities name tokens
``token_id:N`` (vLLM's ``return_tokens_as_token_ids``).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Optional

from lamina_comm.model import SamplingParams
from lamina_comm.model.sampling import MAX_LOGPROBS

_COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stop_token_ids",
                      "n", "logprobs", "stream", "stream_options", "return_token_ids", "user"}
MAX_N = 16  # choices per prompt


class OpenAIError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 kind: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def error_body(status: int, message: str) -> dict[str, Any]:
    """An OpenAI error object for a failure that came from the scheduler (503, 429, 500, ...)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return OpenAIError(status, message, kind=kind).body()


@dataclass(frozen=True)
class CompletionRequest:
    prompts: list[list[int]]
    params: list[SamplingParams]  # one per choice: prompt-major, n per prompt
    n: int
    stream: bool
    include_usage: bool


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_completion(request: Any, model_name: str) -> CompletionRequest:
    """A /v1/completions body checked; OpenAIError (400/404) names the field."""
    if not isinstance(request, dict):
        raise OpenAIError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
    unknown = sorted(set(request) - _COMPLETION_FIELDS)
    if unknown:
        raise OpenAIError(HTTPStatus.BAD_REQUEST, f"unknown fields {unknown}", param=unknown[0])
    model = request.get("model")
    if model != model_name:
        raise OpenAIError(HTTPStatus.NOT_FOUND, f"the model {str(model)[:80]!r} does not exist; this server has "
                          f"{model_name!r}", param="model", code="model_not_found")
    prompt = request.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and any(isinstance(p, str) for p in prompt)):
        raise OpenAIError(HTTPStatus.BAD_REQUEST, "text prompts need a tokenizer, and this model has none: send "
                          "token ids (prompt: [ids] or a list of them)", param="prompt")
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        prompts = prompt
    else:
        raise OpenAIError(HTTPStatus.BAD_REQUEST, "prompt must be a non-empty list of token ids, or a list of them",
                          param="prompt")
    for one in prompts:
        if not one or not all(_is_int(t) for t in one):
            raise OpenAIError(HTTPStatus.BAD_REQUEST, "every prompt must be a non-empty list of integer token ids",
                              param="prompt")
    n = request.get("n", 1)
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise OpenAIError(HTTPStatus.BAD_REQUEST, f"n must be an integer in 1..{MAX_N}", param="n")
    logprobs = request.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise OpenAIError(HTTPStatus.BAD_REQUEST, f"logprobs must be an integer in 0..{MAX_LOGPROBS}",
                          param="logprobs")
    stop = request.get("stop")
    if stop not in (None, [], ""):
        raise OpenAIError(HTTPStatus.BAD_REQUEST, "stop strings need a tokenizer; use stop_token_ids", param="stop")
    stop_ids = request.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(_is_int(t) for t in stop_ids):
        raise OpenAIError(HTTPStatus.BAD_REQUEST, "stop_token_ids must be a list of integer token ids",
                          param="stop_token_ids")
    stream = request.get("stream", False)
    if not isinstance(stream, bool):
        raise OpenAIError(HTTPStatus.BAD_REQUEST, "stream must be true or false", param="stream")
    options = request.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise OpenAIError(HTTPStatus.BAD_REQUEST, "stream_options may hold include_usage only", param="stream_options")
    seed = request.get("seed")
    if seed is not None and not _is_int(seed):
        raise OpenAIError(HTTPStatus.BAD_REQUEST, "seed must be an integer", param="seed")
    def given(name: str, default: Any) -> Any:  # OpenAI clients send null for "not set"
        value = request.get(name)
        return default if value is None else value

    params = []
    for _ in prompts:
        for choice in range(n):
            try:
                params.append(SamplingParams(
                    temperature=given("temperature", 1.0), top_p=given("top_p", 1.0),
                    max_tokens=given("max_tokens", 16),
                    # n choices of one seeded request differ, and each is reproducible.
                    seed=None if seed is None else seed + choice,
                    stop_token_ids=stop_ids, logprobs=logprobs))
            except (TypeError, ValueError) as exc:
                field = str(exc).split(" ", 1)[0]
                raise OpenAIError(HTTPStatus.BAD_REQUEST, str(exc),
                                  param=field if field in _COMPLETION_FIELDS else None) from None
    return CompletionRequest(prompts, params, n, stream, bool(options.get("include_usage", False)))


def new_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_name(token: int) -> str:
    """A token where OpenAI expects its text (no tokenizer): vLLM's ``return_tokens_as_token_ids`` form."""
    return f"token_id:{token}"


def logprobs_body(tokens: list[int], logprobs: list[tuple[float, list[tuple[int, float]]]]) -> Optional[dict]:
    """OpenAI's completion logprobs object (None when the request asked for none)."""
    if not logprobs:
        return None
    return {"tokens": [token_name(t) for t in tokens], "token_logprobs": [lp for lp, _ in logprobs],
            "top_logprobs": [{token_name(t): v for t, v in top} for _, top in logprobs],
            "text_offset": [0] * len(tokens)}


def completion_body(completion_id: str, model: str, request: CompletionRequest,
                    results: list[dict[str, Any]]) -> dict[str, Any]:
    """The non-streamed answer; ``results[i]`` is choice i's {"tokens", "finish_reason", "logprobs"}
    (prompt-major)."""
    choices = []
    for index, result in enumerate(results):
        prompt = request.prompts[index // request.n]
        choices.append({"index": index, "text": "", "token_ids": list(result["tokens"]),
                        "logprobs": logprobs_body(result["tokens"], result.get("logprobs") or []),
                        "finish_reason": result["finish_reason"], "prompt_token_ids": list(prompt)})
    prompt_tokens = sum(len(p) for p in request.prompts)
    completion_tokens = sum(len(r["tokens"]) for r in results)
    return {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(completion_id: str, model: str, index: int, token_ids: list[int],
               finish_reason: Optional[str], logprobs: Optional[list] = None) -> dict[str, Any]:
    """One streamed chunk (Server-Sent Events ``data:`` line) of choice ``index``."""
    return {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": "", "token_ids": token_ids,
                         "logprobs": logprobs_body(token_ids, logprobs or []), "finish_reason": finish_reason}]}


def usage_chunk(completion_id: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def models_body(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "lamina",
                                        "root": model, "parent": None}]}
