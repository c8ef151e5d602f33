"""Checks every provider's reply parser shares: believable token counts and the off-contract error.

A token count that is not a non-negative integer within MAX_TOKEN_COUNT is not believed: the
answer itself is good (and the provider has most likely charged for it), so the client gets it
and it is billed from our own token estimate, with a warning in the log.
"""

from __future__ import annotations

import logging

from gateway.errors import UpstreamBadAnswer

log = logging.getLogger("gateway.replies")

MAX_TOKEN_COUNT = 10**8  # far above any model's context window (the largest Gemini's is 2M tokens)


def usage_counts(usage: object, input_field: str, output_field: str, *,
                 all_or_nothing: bool = True) -> tuple[int | None, int | None]:
    """(input, output) tokens as `usage` reports them under the vendor's field names. A count that is
    absent or not believable is None; with `all_or_nothing`, one bad count discards both."""
    if usage is None:
        return None, None
    if not isinstance(usage, dict):
        log.warning("the provider's usage is not an object; billing from our token estimate")
        return None, None
    counts = []
    for field in (input_field, output_field):
        value = usage.get(field)
        if value is not None and not (type(value) is int and 0 <= value <= MAX_TOKEN_COUNT):
            log.warning("the provider reported an unusable %s (%s); billing from our token estimate",
                        field, type(value).__name__)
            if all_or_nothing:
                return None, None
            value = None
        counts.append(value)
    return counts[0], counts[1]


def off_contract(field: str) -> UpstreamBadAnswer:
    return UpstreamBadAnswer("the provider's reply is not in the documented shape", details={"field": field})
