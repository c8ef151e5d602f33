"""Parse each rate-limit string once, not on every request.

Flask-Limiter 4 turns a limit's string ("200 per day;50 per hour;10 per minute", or a key's own
`rate_limit`) into `limits.RateLimitItem`s every time it looks at the limit: several parses per
task request (its before-request hook, the view's decorator and the headers each walk
`app._task_limit`'s limit group), once about a tenth of the gateway's own CPU on a cache hit. The items are immutable
values (amount, period), so the same ones can serve every request: `install()` puts a memoised
`parse_many` where Flask-Limiter looks it up. Which limits apply, what each counts and the
storage calls are unchanged; a string that does not parse still raises each time (errors are not
memoised). If a Flask-Limiter release stops importing `parse_many` that way, `install()` leaves it
alone and the only change is the lost saving.
"""

from __future__ import annotations

import functools

import limits
from flask_limiter import _limits as flask_limiter_limits

_MAX_STRINGS = 256  # distinct limit strings: the configured ones and the keys' own `rate_limit` values


@functools.lru_cache(maxsize=_MAX_STRINGS)
def parse_many(limit_string: str) -> tuple[limits.RateLimitItem, ...]:
    """`limits.parse_many`, once per distinct string (a tuple: the shared result cannot be changed)."""
    return tuple(limits.parse_many(limit_string))


def install() -> bool:
    """Make Flask-Limiter use the memoised parser; False (and nothing changed) if it no longer can."""
    current = getattr(flask_limiter_limits, "parse_many", None)
    if current is parse_many:
        return True
    if current is not limits.parse_many:
        return False
    flask_limiter_limits.parse_many = parse_many
    return True
