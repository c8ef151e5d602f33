"""One object per request holding what the hooks, the resources and the accounting share.

Instead of loose `flask.g` attributes set in one place and read (or guessed at with
`g.get(...)`) in others, every request has one `RequestState`, created by the first hook and
found with `state()`. Its fields are the whole list of what travels between the parts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from flask import g


@dataclass(slots=True)
class RequestState:
    started: float = field(default_factory=time.perf_counter)
    request_id: str | None = None  # the gateway's own id (routes.request_id fills it on first use)
    client_request_id: str | None = None  # the client's X-Request-ID, when valid
    api_key: Any = None  # the authenticated `ApiKey`, when auth is on and the path needs one
    budget_reservation: Any = None  # released in teardown
    prompt: str | None = None  # the task's main input, described (length + hash) in the log line
    model: str = ""  # the public model id asked for
    outcome: Any = None  # the task's `TaskOutcome`, for the cost headers and the ledger
    streaming: bool = False  # accounted when the stream ends, not in after_request
    retry_after: str | None = None  # a Retry-After of our own (provider's hint), kept over the limiter's
    error_code: str | None = None  # the code of the error answered, if any


def state() -> RequestState:
    """This request's state (created on first use, so error handlers before any hook still have one)."""
    context = g._get_current_object()
    current = context.get("state")
    if current is None:
        current = context.state = RequestState()
    return current
