"""Text in and out of the front door: a checkpoint's tokenizer and chat template.

A checkpoint directory with ``tokenizer.json`` (the HF ``tokenizers`` format)
gets text prompts, text in every answer and ``/v1/chat/completions`` (the
chat template from ``tokenizer_config.json``, rendered by jinja2 in a
sandbox, as transformers does). Without one the front door speaks token ids
only. ``tokenizers`` and ``jinja2`` are the ``text`` extra.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


def _token_text(value: Any) -> Optional[str]:
    """bos_token / eos_token: a string, or an AddedToken-like {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class TextCodec:
    """Token ids <-> text with one tokenizer; renders chat messages with the checkpoint's template."""

    def __init__(self, tokenizer: Any, chat_template: Optional[str] = None, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None):
        self._tokenizer = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self._template = None
        if chat_template:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._template = env.from_string(chat_template)

    @classmethod
    def from_dir(cls, path: Union[str, Path]) -> Optional["TextCodec"]:
        """The codec of a checkpoint directory, or None when it has no tokenizer.json."""
        path = Path(path)
        if not (path / TOKENIZER_FILE).is_file():
            return None
        from tokenizers import Tokenizer
        config: dict[str, Any] = {}
        if (path / CONFIG_FILE).is_file():
            loaded = json.loads((path / CONFIG_FILE).read_text())
            config = loaded if isinstance(loaded, dict) else {}
        template = config.get("chat_template")
        return cls(Tokenizer.from_file(str(path / TOKENIZER_FILE)), template if isinstance(template, str) else None,
                   _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a conversation, ending where the assistant's answer starts."""
        if self._template is None:
            raise ValueError("this checkpoint has no chat template (tokenizer_config.json: chat_template)")
        return self._template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token or "",
                                     eos_token=self.eos_token or "")


class TextStream:
    """Streamed text of one choice: each push returns the text the new tokens added.

    Decodes everything so far (a token's text can depend on its neighbours)
    and holds back a trailing replacement character: a multi-byte character
    split over tokens is sent whole once its last token arrived.
    """

    def __init__(self, codec: TextCodec):
        self._codec = codec
        self._ids: list[int] = []
        self._sent = ""

    def push(self, ids: list[int]) -> str:
        self._ids += ids
        text = self._codec.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def finish(self) -> str:
        """Whatever was held back."""
        return self._advance(self._codec.decode(self._ids))

    def _advance(self, text: str) -> str:
        # Decoding a longer sequence extends the text (a decoder that rewrote earlier text would lose
        # that rewrite here: what was sent stays sent).
        delta = text[len(self._sent):]
        self._sent = text
        return delta


class StopText:
    """A choice's text checked against stop strings (OpenAI's ``stop``).

    ``push`` returns the text that may be sent now: up to the first stop
    string, which is not sent (``hit`` turns true: the caller cancels the
    request), and never a tail that could still grow into one. ``text`` is
    everything sent.
    """

    def __init__(self, codec: TextCodec, stops: tuple[str, ...]):
        self._stream = TextStream(codec)
        self._stops = stops
        self._hold = max(len(s) for s in stops) - 1
        self._pending = ""
        self.hit = False
        self.text = ""

    def push(self, ids: list[int]) -> str:
        if self.hit:
            return ""
        self._pending += self._stream.push(ids)
        return self._release(final=False)

    def finish(self) -> str:
        if self.hit:
            return ""
        self._pending += self._stream.finish()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        found = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if found:
            out, self._pending, self.hit = self._pending[:min(found)], "", True
        elif final or len(self._pending) > self._hold:
            keep = 0 if final else self._hold
            out, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        else:
            out = ""
        self.text += out
        return out


__all__ = ["StopText", "TextCodec", "TextStream"]
