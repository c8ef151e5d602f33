"""Chat Completions replies and stream chunks, checked before anything in them is used.

The same rules as `gemini_replies`, for OpenAI's wire shape: an off-contract reply (`choices`
or `message` of the wrong type, `content` that is not a string, a reason that is not a string)
is a 502 `upstream_bad_answer`, never a 500 from a TypeError further on. Token counts that are
not non-negative integers within MAX_TOKEN_COUNT are not believed (None: billed from our own
estimate, with a warning), the answer itself is kept: the provider has most likely charged
for it, and refusing it would make the client ask again and pay twice.

Hand-written checks on the decoded JSON rather than the SDK's pydantic models: a few
microseconds per reply, and they work the same for every OpenAI-compatible server (vLLM,
Ollama, llama.cpp, LM Studio, Azure) whatever extra fields it adds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gateway.errors import UpstreamUnavailable
from gateway.providers.replies import off_contract, usage_counts

log = logging.getLogger("gateway.openai")

_MAX_MODEL_NAME = 128
_MAX_REASON = 64


@dataclass(frozen=True, slots=True)
class Reply:
    """A chat.completion body or one chunk of a stream, checked."""

    text: str
    finish_reason: str | None = None
    refusal: bool = False  # the model said why it will not answer (`message.refusal`)
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


def read_reply(answer: object) -> Reply:
    """Check a non-streamed `chat.completion` body; its text is choices[0].message.content."""
    if not isinstance(answer, dict):
        raise _off_contract("the reply")
    choice = _first_choice(answer)
    text, refusal = "", False
    if choice is not None:
        message = choice.get("message")
        if message is not None and not isinstance(message, dict):
            raise _off_contract("choices[0].message")
        text = _text(message or {}, "choices[0].message")
        refusal = bool(_string((message or {}).get("refusal"), "choices[0].message.refusal"))
    return _reply(answer, choice, text, refusal)


def read_chunk(event: object) -> Reply:
    """Check one `chat.completion.chunk`; its text is choices[0].delta.content (the usage-only
    last chunk has no choices). An error object in the stream is the server giving up mid-answer."""
    if not isinstance(event, dict):
        raise _off_contract("a stream chunk")
    if event.get("error") is not None:
        raise UpstreamUnavailable("the provider reported an error in the middle of the stream")
    choice = _first_choice(event)
    text = ""
    if choice is not None:
        delta = choice.get("delta")
        if delta is not None and not isinstance(delta, dict):
            raise _off_contract("choices[0].delta")
        text = _text(delta or {}, "choices[0].delta")
    return _reply(event, choice, text, False)


def _first_choice(answer: dict) -> dict | None:
    choices = answer.get("choices")
    if choices is not None and not isinstance(choices, list):
        raise _off_contract("choices")
    if not choices:
        return None
    if not isinstance(choices[0], dict):
        raise _off_contract("choices[0]")
    return choices[0]


def _text(message: dict, field: str) -> str:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    raise _off_contract(f"{field}.content")


def _string(value: object, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _off_contract(field)


def _reply(answer: dict, choice: dict | None, text: str, refusal: bool) -> Reply:
    reason = _string((choice or {}).get("finish_reason"), "choices[0].finish_reason")
    model = answer.get("model")
    if not (isinstance(model, str) and 0 < len(model) <= _MAX_MODEL_NAME):
        model = None
    input_tokens, output_tokens = _usage_of(answer.get("usage"))
    return Reply(text, reason and reason[:_MAX_REASON], refusal, model, input_tokens, output_tokens)


def _usage_of(usage: object) -> tuple[int | None, int | None]:
    """(prompt tokens, completion tokens) as reported; (None, None) when absent or not believable."""
    return usage_counts(usage, "prompt_tokens", "completion_tokens")


_off_contract = off_contract
