"""The OpenAI-compatible surface of the front door, as vLLM serves it: requests parsed, answers built.

Transport-free (the HTTP layer calls these), so the same code serves any
server stack. Prompts are token ids (``prompt: [ids]`` or a list of them),
or text when the checkpoint has a tokenizer (``node/text.py``), which also
enables ``/v1/chat/completions``. Without a tokenizer there is no text, so
each choice carries ``token_ids`` and ``text`` is empty (vLLM's
``return_token_ids``); a text prompt or a chat request gets a 400 that says
so. With one, ``token_ids`` / ``prompt_token_ids`` come back when the request
sets ``return_token_ids``; text ``stop`` strings end a choice where its text
first holds one (cut there, finish_reason "stop"). Log-probabilities name tokens ``token_id:N`` (vLLM's
``return_tokens_as_token_ids``).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Optional

from lamina_comm.model import SamplingParams
from lamina_comm.model.sampling import MAX_LOGPROBS
from lamina_comm.node.schemas import ChatBody, CompletionBody, SamplingFields
from lamina_comm.node.text import TextCodec

MAX_N = 16  # choices per prompt
MAX_STOPS = 4  # stop strings per request, as OpenAI allows


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
    codec: Optional[TextCodec] = None  # answers carry text
    stops: tuple[str, ...] = ()        # stop strings (need the codec)
    return_token_ids: bool = True      # choices carry token_ids, the answer prompt_token_ids
    chat: bool = False                 # /v1/chat/completions: messages in, an assistant message out


def _check_model(body: SamplingFields, model_name: str) -> None:
    if body.model != model_name:
        raise OpenAIError(HTTPStatus.NOT_FOUND, f"the model {body.model[:80]!r} does not exist; this server has "
                          f"{model_name!r}", param="model", code="model_not_found")


def parse_completion(body: CompletionBody, model_name: str, codec: Optional[TextCodec] = None) -> CompletionRequest:
    """A /v1/completions body (its types checked by the schema) checked; OpenAIError (400/404) names the field."""
    _check_model(body, model_name)
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
        prompts = _text_prompts(prompt, codec)
    elif prompt and isinstance(prompt[0], list):
        prompts = prompt
    else:
        prompts = [prompt]
    if not prompts or not all(prompts):
        raise OpenAIError(HTTPStatus.BAD_REQUEST, "prompt must be non-empty, and so must every prompt in it",
                          param="prompt")
    return _sampling(body, prompts, codec, chat=False, logprobs=body.logprobs, max_tokens=body.max_tokens)


def _text_prompts(prompt: Any, codec: Optional[TextCodec]) -> list[list[int]]:
    """Text prompts (a string, or a list of them) tokenized."""
    if codec is None:
        raise OpenAIError(HTTPStatus.BAD_REQUEST, "text prompts need a tokenizer, and this model has none: send "
                          "token ids (prompt: [ids] or a list of them)", param="prompt")
    texts = [prompt] if isinstance(prompt, str) else prompt
    if not all(texts):
        raise OpenAIError(HTTPStatus.BAD_REQUEST, "prompt must be one text or a list of non-empty texts",
                          param="prompt")
    return [codec.encode(p) for p in texts]


def parse_chat(body: ChatBody, model_name: str, codec: Optional[TextCodec]) -> CompletionRequest:
    """A /v1/chat/completions body checked: the messages rendered by the chat template, tokenized."""
    _check_model(body, model_name)
    if codec is None or not codec.has_chat_template:
        raise OpenAIError(HTTPStatus.BAD_REQUEST, "chat needs a tokenizer with a chat template (tokenizer.json "
                          "and tokenizer_config.json's chat_template in the checkpoint); this model has none: "
                          "use /v1/completions with token ids", param="messages")
    try:
        text = codec.render_chat([{"role": m.role, "content": m.content} for m in body.messages])
    except Exception as exc:  # a template error (jinja2's raise_exception, a sandbox refusal): the client's doing
        raise OpenAIError(HTTPStatus.BAD_REQUEST, f"the chat template refused these messages: {exc}",
                          param="messages") from None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    # The template writes the special tokens itself (bos_token): do not add them again.
    return _sampling(body, [codec.encode(text, add_special_tokens=False)], codec, chat=True, logprobs=None,
                     max_tokens=max_tokens)


def _sampling(body: SamplingFields, prompts: list[list[int]], codec: Optional[TextCodec], chat: bool,
              logprobs: Optional[int], max_tokens: Optional[int]) -> CompletionRequest:
    if not 1 <= body.n <= MAX_N:
        raise OpenAIError(HTTPStatus.BAD_REQUEST, f"n must be an integer in 1..{MAX_N}", param="n")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise OpenAIError(HTTPStatus.BAD_REQUEST, f"logprobs must be an integer in 0..{MAX_LOGPROBS}",
                          param="logprobs")
    stops = () if body.stop in (None, [], "") else (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
    if len(stops) > MAX_STOPS or not all(stops):
        raise OpenAIError(HTTPStatus.BAD_REQUEST, f"stop must be a text or a list of at most {MAX_STOPS} "
                          "non-empty texts", param="stop")
    if stops and codec is None:
        raise OpenAIError(HTTPStatus.BAD_REQUEST, "stop strings need a tokenizer; use stop_token_ids", param="stop")
    params = []
    for _ in prompts:
        for choice in range(body.n):
            try:
                params.append(SamplingParams(
                    temperature=_given(body.temperature, 1.0), top_p=_given(body.top_p, 1.0),
                    max_tokens=_given(max_tokens, 16),
                    # n choices of one seeded request differ, and each is reproducible.
                    seed=None if body.seed is None else body.seed + choice,
                    stop_token_ids=body.stop_token_ids or (), logprobs=logprobs))
            except (TypeError, ValueError) as exc:
                field = str(exc).split(" ", 1)[0]
                raise OpenAIError(HTTPStatus.BAD_REQUEST, str(exc),
                                  param=field if field in ChatBody.model_fields or field == "logprobs" else None) \
                    from None
    options = body.stream_options
    return CompletionRequest(prompts, params, body.n, body.stream, options is not None and options.include_usage,
                             codec, stops, return_token_ids=codec is None or bool(body.return_token_ids), chat=chat)


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


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


def _text(request: CompletionRequest, tokens: list[int], result: Optional[dict[str, Any]] = None) -> str:
    """A choice's text: cut at its stop string when it hit one (``result["text"]``), else decoded."""
    if result is not None and "text" in result:
        return result["text"]
    return request.codec.decode(tokens) if request.codec is not None else ""


def completion_body(completion_id: str, model: str, request: CompletionRequest,
                    results: list[dict[str, Any]]) -> dict[str, Any]:
    """The non-streamed answer; ``results[i]`` is choice i's {"tokens", "finish_reason", "logprobs"}
    (prompt-major)."""
    choices = []
    for index, result in enumerate(results):
        tokens = list(result["tokens"])
        choice: dict[str, Any] = {"index": index, "finish_reason": result["finish_reason"]}
        if request.chat:
            choice["message"] = {"role": "assistant", "content": _text(request, tokens, result)}
        else:
            choice.update(text=_text(request, tokens, result),
                          logprobs=logprobs_body(tokens, result.get("logprobs") or []))
        if request.return_token_ids:
            choice["token_ids"] = tokens
            if not request.chat:
                choice["prompt_token_ids"] = list(request.prompts[index // request.n])
        choices.append(choice)
    prompt_tokens = sum(len(p) for p in request.prompts)
    completion_tokens = sum(len(r["tokens"]) for r in results)
    body = {"id": completion_id, "object": "chat.completion" if request.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}
    if request.chat and request.return_token_ids:
        body["prompt_token_ids"] = list(request.prompts[0])
    return body


def chunk_body(completion_id: str, model: str, index: int, token_ids: list[int],
               finish_reason: Optional[str], logprobs: Optional[list] = None,
               request: Optional[CompletionRequest] = None, text: str = "", first: bool = False) -> dict[str, Any]:
    """One streamed chunk (Server-Sent Events ``data:`` line) of choice ``index``: its new tokens and the
    text they added (empty without a tokenizer)."""
    if request is not None and request.chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text or not first:
            delta["content"] = text
        choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish_reason}
        if request.return_token_ids:
            choice["token_ids"] = token_ids
        return {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model, "choices": [choice]}
    choice = {"index": index, "text": text, "logprobs": logprobs_body(token_ids, logprobs or []),
              "finish_reason": finish_reason}
    if request is None or request.return_token_ids:
        choice["token_ids"] = token_ids
    return {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice]}


def usage_chunk(completion_id: str, model: str, prompt_tokens: int, completion_tokens: int,
                chat: bool = False) -> dict[str, Any]:
    return {"id": completion_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def models_body(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "lamina",
                                        "root": model, "parent": None}]}
