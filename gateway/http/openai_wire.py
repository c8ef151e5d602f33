"""OpenAI's chat-completions wire format: a request body read into plain data, answers and errors written back.

Pure functions on parsed JSON (no Flask): `read_chat_request` checks a `/v1/chat/completions` body
field by field and refuses, naming the field, whatever the gateway cannot honour (tools, n > 1,
images, logprobs...) instead of silently ignoring it; `completion_body`, `chunk` and `error_body`
write OpenAI's shapes. An unsupported field sent with its neutral value (`n: 1`, `logprobs: false`,
`response_format: {"type": "text"}`, `null`) asks for nothing and is accepted: SDKs send such defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.errors import InvalidRequest
from gateway.http.schemas import MAX_STOP_CHARS, MAX_STOP_SEQUENCES, MAX_TOKENS_LIMIT

PREFIX = "/v1"  # the surface's paths (the OpenAI SDKs append /chat/completions to a base URL ending in it)

MAX_MESSAGES = 256  # messages in one conversation
MAX_CONTENT_PARTS = 64  # text parts in one message's content
MAX_MODEL_CHARS = 128
MAX_USER_CHARS = 256
SUPPORTED_FIELDS = frozenset({"messages", "model", "temperature", "top_p", "max_tokens", "max_completion_tokens",
                              "stop", "n", "user", "stream", "stream_options"})
# OpenAI fields the gateway cannot honour, with the value that asks for nothing (accepted as if absent).
NEUTRAL_VALUES = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False,), "parallel_tool_calls": (),
    "response_format": ({"type": "text"},), "tools": ([],), "functions": ([],), "tool_choice": ("none",),
    "function_call": ("none",), "logit_bias": ({},), "top_logprobs": (0,), "seed": (), "service_tier": ("auto",),
    "store": (False,), "metadata": ({},), "modalities": (["text"],), "audio": (), "prediction": (),
    "reasoning_effort": (), "web_search_options": (), "verbosity": (), "prompt_cache_key": (), "safety_identifier": (),
}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # OpenAI's -> ours
REFUSED_ROLES = frozenset({"tool", "function"})
MESSAGE_FIELDS = frozenset({"role", "content"})
FINISH_REASONS = {  # every provider's finish reason -> OpenAI's
    "stop": "stop", "end_turn": "stop", "stop_sequence": "stop", "finish_reason_stop": "stop",
    "length": "length", "max_tokens": "length", "model_context_window_exceeded": "length",
    "content_filter": "content_filter", "safety": "content_filter", "prohibited_content": "content_filter",
    "blocklist": "content_filter", "spii": "content_filter", "recitation": "content_filter",
    "refusal": "content_filter",
}


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat request: the conversation as (role, content) pairs in the gateway's roles, and the options."""

    model: str
    messages: tuple[tuple[str, str], ...]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_tokens_field: str = "max_tokens"  # the name the client used (max_completion_tokens or max_tokens)
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def is_openai_path(path: str) -> bool:
    """Whether a request path is on the OpenAI-compatible surface (its errors in OpenAI's format)."""
    return path == PREFIX or path.startswith(f"{PREFIX}/")


def refuse(param: str, reason: str) -> InvalidRequest:
    """A 400 naming the field, in the gateway's error tree (its `details.fields` becomes OpenAI's `param`)."""
    return InvalidRequest(f"Invalid input: '{param}' {reason}", details={"fields": {param: reason}})


def read_chat_request(body: object, max_chars: int) -> ChatRequest:
    """The checked request of a `/v1/chat/completions` body; `InvalidRequest` naming the first bad field.
    `max_chars` bounds the whole conversation's text (REQUEST_MAX_PROMPT_CHARS)."""
    if not isinstance(body, dict):
        raise refuse("body", "must be a JSON object")
    given = {name: value for name, value in body.items() if value is not None}  # null = not given, as OpenAI reads it
    for name in sorted(set(given) - SUPPORTED_FIELDS):
        if name not in NEUTRAL_VALUES:
            raise refuse(name, "is not a chat-completions field this gateway knows")
        if not any(_same(given[name], neutral) for neutral in NEUTRAL_VALUES[name]):
            raise refuse(name, "is not supported by this gateway (only text chat without tools)")
    model = given.get("model")
    if not isinstance(model, str) or not model.strip() or len(model) > MAX_MODEL_CHARS:
        raise refuse("model", f"is required: a model id or alias of at most {MAX_MODEL_CHARS} characters")
    n = given.get("n", 1)
    if not _is_int(n) or n != 1:
        raise refuse("n", "must be 1: this gateway returns one choice")
    user = given.get("user", "")
    if not isinstance(user, str) or len(user) > MAX_USER_CHARS:
        raise refuse("user", f"must be a string of at most {MAX_USER_CHARS} characters")
    stream = given.get("stream", False)
    if not isinstance(stream, bool):
        raise refuse("stream", "must be true or false")
    return ChatRequest(
        model=model.strip(), messages=_messages(given.get("messages"), max_chars),
        temperature=_number(given, "temperature", 0.0, 2.0), top_p=_number(given, "top_p", 0.0, 1.0),
        max_tokens=_max_tokens(given),
        max_tokens_field="max_completion_tokens" if "max_completion_tokens" in given else "max_tokens",
        stop=_stop(given.get("stop")), stream=stream,
        include_usage=_include_usage(given.get("stream_options"), stream),
    )


def _messages(messages: object, max_chars: int) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise refuse("messages", "must be a non-empty list of messages")
    if len(messages) > MAX_MESSAGES:
        raise refuse("messages", f"must hold at most {MAX_MESSAGES} messages")
    read, total = [], 0
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise refuse(where, "must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str):
            raise refuse(f"{where}.role", f"must be one of {', '.join(ROLES)}")
        if role in REFUSED_ROLES:
            raise refuse(f"{where}.role", f"'{role}' messages are not supported (no tools on this gateway)")
        if role not in ROLES:
            raise refuse(f"{where}.role", f"must be one of {', '.join(ROLES)}")
        for name in sorted(set(message) - MESSAGE_FIELDS):
            if message[name] is not None and message[name] != []:  # `tool_calls: []` asks for nothing
                raise refuse(f"{where}.{name}", "is not supported by this gateway (only role and content)")
        content = _content(message.get("content"), where)
        total += len(content)
        if total > max_chars:
            raise refuse("messages", f"hold more than {max_chars} characters of text together")
        read.append((ROLES[role], content))
    if not any(role == "user" for role, _ in read):
        raise refuse("messages", "must include at least one user message")
    return tuple(read)


def _content(content: object, where: str) -> str:
    """A message's text: a string, or a list of `{"type": "text", "text": ...}` parts (joined by newlines)."""
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        if not content or len(content) > MAX_CONTENT_PARTS:
            raise refuse(f"{where}.content", f"must hold 1 to {MAX_CONTENT_PARTS} parts")
        texts = []
        for number, part in enumerate(content):
            at = f"{where}.content[{number}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                reason = f"'{kind}' parts are not supported (text only)" if isinstance(kind, str) and len(kind) < 40 \
                    else "must be an object {\"type\": \"text\", \"text\": ...}"
                raise refuse(f"{at}.type" if isinstance(kind, str) else at, reason)
            if set(part) - {"type", "text"} or not isinstance(part.get("text"), str):
                raise refuse(at, "must be {\"type\": \"text\", \"text\": <string>} and nothing else")
            texts.append(part["text"])
        text = "\n".join(texts)
    else:
        raise refuse(f"{where}.content", "must be a string or a list of text parts")
    if not text.strip():
        raise refuse(f"{where}.content", "must not be empty or blank")
    return text


def _number(given: dict, name: str, low: float, high: float) -> float | None:
    value = given.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not low <= value <= high:
        raise refuse(name, f"must be a number from {low:g} to {high:g}")
    return float(value)


def _max_tokens(given: dict) -> int | None:
    values = {}
    for name in ("max_completion_tokens", "max_tokens"):
        value = given.get(name)
        if value is None:
            continue
        if not _is_int(value) or not 1 <= value <= MAX_TOKENS_LIMIT:
            raise refuse(name, f"must be an integer from 1 to {MAX_TOKENS_LIMIT}")
        values[name] = value
    if len(set(values.values())) > 1:
        raise refuse("max_tokens", "differs from 'max_completion_tokens': send one of them")
    return next(iter(values.values()), None)


def _stop(stop: object) -> tuple[str, ...]:
    sequences = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(sequences, list) or len(sequences) > MAX_STOP_SEQUENCES or not all(
            isinstance(item, str) and 1 <= len(item) <= MAX_STOP_CHARS for item in sequences):
        raise refuse("stop", f"must be a string or a list of up to {MAX_STOP_SEQUENCES} strings of 1 to "
                             f"{MAX_STOP_CHARS} characters")
    return tuple(sequences)


def _include_usage(options: object, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise refuse("stream_options", "is only allowed when 'stream' is true")
    if not isinstance(options, dict) or set(options) - {"include_usage"} \
            or not isinstance(options.get("include_usage", False), bool):
        raise refuse("stream_options", "must be {\"include_usage\": true|false}")
    return options.get("include_usage", False)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _same(value: object, neutral: object) -> bool:
    """JSON equality that keeps `false` apart from `0` (Python's True == 1)."""
    return type(value) is type(neutral) and value == neutral or (
        _is_int(value) and isinstance(neutral, float) and value == neutral)


# --- answers --------------------------------------------------------------------------------------

def finish_reason(reason: str | None) -> str:
    """The provider's finish reason as OpenAI names it (stop, length, content_filter); unknown or none: stop."""
    return FINISH_REASONS.get((reason or "stop").lower(), "stop")


def usage(input_tokens: int, output_tokens: int) -> dict:
    return {"prompt_tokens": input_tokens, "completion_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens}


def completion_body(completion_id: str, created: int, model: str, text: str, reason: str | None,
                    input_tokens: int, output_tokens: int) -> dict:
    """A `chat.completion` object with its one choice."""
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason(reason)}],
        "usage": usage(input_tokens, output_tokens), "system_fingerprint": None,
    }


def chunk(completion_id: str, created: int, model: str, delta: dict | None, reason: str | None = None,
          *, with_usage: bool = False, usage_of: dict | None = None) -> dict:
    """One `chat.completion.chunk`; `delta` None = the usage chunk (no choices). With `with_usage` (the client's
    `include_usage`) every chunk carries `usage`: null, except the usage chunk."""
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": reason}]}
    if with_usage:
        body["usage"] = usage_of
    return body


# --- errors ---------------------------------------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
               403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 502: "api_error", 503: "server_error", 504: "timeout"}
# The gateway's codes that OpenAI's clients know by another name.
ERROR_CODES = {"unauthorized": "invalid_api_key", "key_revoked": "invalid_api_key", "key_expired": "invalid_api_key",
               "budget_exceeded": "insufficient_quota", "rate_limited": "rate_limit_exceeded",
               "token_limit_exceeded": "rate_limit_exceeded"}


def error_body(gateway_body: dict, status: int) -> dict:
    """OpenAI's `{"error": {message, type, param, code}}` for the gateway's own error body (routes.error_payload):
    the same message and status; `param` is the field a 400 names; `code` OpenAI's name where it has one."""
    code = gateway_body.get("code")
    details = gateway_body.get("details") or {}
    fields = details.get("fields") if isinstance(details, dict) else None
    param = next(iter(fields), None) if isinstance(fields, dict) and fields else None
    message = gateway_body.get("error", "")
    reason = details.get("reason") if isinstance(details, dict) else None
    if isinstance(reason, str):  # no `details` here: the reason joins the message (the gateway's words)
        message = f"{message.removesuffix(' (see details.reason)')}: {reason}"
    if code == "model_not_found":
        error_type, param = "invalid_request_error", "model"  # as OpenAI answers an unknown model
    else:
        error_type = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": error_type, "param": param,
                      "code": ERROR_CODES.get(code, code)}}
