"""Anthropic Messages replies and stream events, checked before anything in them is used.

The provider reads the raw JSON (see `anthropic.py` for why it skips the SDK's models), so
this is where a reply meets the documented shape: a message is ``{type: "message", content:
[blocks], model, stop_reason, usage}``, a stream event ``{type, ...}``. Off-contract shapes
(content that is not a list, a block that is not an object, text that is not a string) are
`UpstreamBadAnswer`, never a TypeError further on. Blocks and events of kinds we do not use
(thinking, tool use, kinds added later) are skipped, as Anthropic's versioning policy asks.

Token counts follow `gemini_replies`: a count that is not a non-negative integer within
MAX_TOKEN_COUNT is not believed (None, so the gateway bills from its own estimate), with a
warning in the log; the answer itself is still served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gateway.providers.replies import off_contract, usage_counts

log = logging.getLogger("gateway.anthropic")

_MAX_NAME = 128  # model names, stop reasons and error types longer than this are not believed


@dataclass(frozen=True, slots=True)
class Reply:
    """A message, or what one stream event adds to it: text, reason, model and usage as reported."""

    kind: str
    text: str = ""
    stop_reason: str | None = None
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    error_type: str | None = None


def read_message(answer: object) -> Reply:
    """Check a whole (non-streamed) reply and keep what is usable of it."""
    if not isinstance(answer, dict) or answer.get("type") != "message":
        raise _off_contract("type")
    content = answer.get("content")
    if not isinstance(content, list):
        raise _off_contract("content")
    texts = [_block_text(block, "content[]") for block in content]
    input_tokens, output_tokens = _usage_of(answer.get("usage"))
    return Reply("message", "".join(texts), _name(answer.get("stop_reason"), "stop_reason"),
                 _model(answer.get("model")), input_tokens, output_tokens)


def read_event(event: object) -> Reply:
    """Check one stream event. Kinds: message_start, text (a text delta), message_delta,
    message_stop, error, and "other" for anything we do not use."""
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise _off_contract("event.type")
    kind = event["type"]
    if kind == "message_start":
        message = event.get("message")
        if not isinstance(message, dict):
            raise _off_contract("message_start.message")
        # Its output count is a placeholder (1 or so) until message_delta: only the input count is kept, or a
        # stream cut before its end would be billed one output token however much text was sent.
        usage = _usage_fields(message.get("usage"))
        return Reply(kind, model=_model(message.get("model")), input_tokens=usage["input_tokens"])
    if kind == "content_block_delta":
        delta = event.get("delta")
        if not isinstance(delta, dict):
            raise _off_contract("content_block_delta.delta")
        if delta.get("type") != "text_delta":
            return Reply("other")
        text = delta.get("text")
        if not isinstance(text, str):
            raise _off_contract("content_block_delta.delta.text")
        return Reply("text", text)
    if kind == "message_delta":
        delta = event.get("delta")
        if not isinstance(delta, dict):
            raise _off_contract("message_delta.delta")
        return Reply(kind, stop_reason=_name(delta.get("stop_reason"), "message_delta.delta.stop_reason"),
                     **_usage_fields(event.get("usage")))
    if kind == "error":
        error = event.get("error")
        error_type = error.get("type") if isinstance(error, dict) else None
        return Reply(kind, error_type=error_type if isinstance(error_type, str) and len(error_type) <= _MAX_NAME
                     else None)
    return Reply(kind if kind == "message_stop" else "other")


def _block_text(block: object, field: str) -> str:
    if not isinstance(block, dict):
        raise _off_contract(field)
    if block.get("type") != "text":
        return ""
    text = block.get("text")
    if not isinstance(text, str):
        raise _off_contract(f"{field}.text")
    return text


def _name(value: object, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value and value[:_MAX_NAME]
    raise _off_contract(field)


def _model(value: object) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= _MAX_NAME else None


def _usage_fields(usage: object) -> dict[str, int | None]:
    input_tokens, output_tokens = _usage_of(usage)
    return {"input_tokens": input_tokens, "output_tokens": output_tokens}


def _usage_of(usage: object) -> tuple[int | None, int | None]:
    """(input tokens, output tokens) as reported; None for a count absent or not believable."""
    return usage_counts(usage, "input_tokens", "output_tokens", all_or_nothing=False)


_off_contract = off_contract
