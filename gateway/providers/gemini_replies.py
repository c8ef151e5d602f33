"""Gemini's generateContent replies, checked before anything in them is used.

Every reply and stream chunk is checked against the documented shape: an off-contract reply
(`candidates` or `parts` of the wrong type, a part that is not an object, a reason that is not
a string) is a 502 `upstream_bad_answer`, never a 500 from a TypeError further on.

Token counts that are not non-negative integers within MAX_TOKEN_COUNT are not believed: the
answer itself is good (and the provider has most likely charged for it), so the client gets it
and it is billed from our own token estimate (token_source "estimate"), with a warning in the
log. Refusing it with a 502 would make the client ask again and pay twice; believing it let a
negative count bill -$0.50 and drive the all-time total below zero.

Hand-written checks rather than a schema library: they run on every upstream reply and cost
about 3 microseconds; the SDK's pydantic models are the layer `gemini_wrapper` skips for speed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gateway.providers.replies import off_contract, usage_counts

log = logging.getLogger("gateway.gemini")

_MAX_MODEL_NAME = 128
_MAX_REASON = 64


@dataclass(frozen=True, slots=True)
class Reply:
    """A generateContent reply or stream chunk, checked: its text and what the provider reported."""

    text: str
    finish_reason: str | None = None
    block_reason: str | None = None
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


def read_reply(answer) -> Reply:
    """Check a reply (REST JSON) against the documented shape and keep what is usable of it."""
    if not isinstance(answer, dict):
        raise _off_contract("the reply")
    text, finish_reason = "", None
    candidates = answer.get("candidates")
    if candidates is not None and not isinstance(candidates, list):
        raise _off_contract("candidates")
    if candidates:
        candidate = candidates[0]
        if not isinstance(candidate, dict):
            raise _off_contract("candidates[0]")
        text = _text_of(candidate)
        finish_reason = _reason(candidate.get("finishReason"), "candidates[0].finishReason")
    feedback = answer.get("promptFeedback")
    if feedback is not None and not isinstance(feedback, dict):
        raise _off_contract("promptFeedback")
    block_reason = _reason((feedback or {}).get("blockReason"), "promptFeedback.blockReason")
    model = answer.get("modelVersion")
    if not (isinstance(model, str) and 0 < len(model) <= _MAX_MODEL_NAME):
        model = None
    input_tokens, output_tokens = _usage_of(answer.get("usageMetadata"))
    return Reply(text, finish_reason, block_reason, model, input_tokens, output_tokens)


def _text_of(candidate: dict) -> str:
    content = candidate.get("content")
    if content is None:
        return ""
    if not isinstance(content, dict):
        raise _off_contract("candidates[0].content")
    parts = content.get("parts")
    if parts is None:
        return ""
    if not isinstance(parts, list):
        raise _off_contract("candidates[0].content.parts")
    texts = []
    for part in parts:
        if not isinstance(part, dict):
            raise _off_contract("candidates[0].content.parts[]")
        text = part.get("text")
        if text is None:
            continue
        if not isinstance(text, str):
            raise _off_contract("candidates[0].content.parts[].text")
        texts.append(text)
    return "".join(texts)


def _reason(value, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value and value[:_MAX_REASON]
    raise _off_contract(field)


def _usage_of(usage) -> tuple[int | None, int | None]:
    """(prompt tokens, output tokens) as reported; (None, None) when absent or not believable."""
    return usage_counts(usage, "promptTokenCount", "candidatesTokenCount")


_off_contract = off_contract
