"""Check rate limits once per request: drop Flask-Limiter's before-request pass when it has nothing to do.

Flask-Limiter checks limits twice on a decorated route: its before-request hook walks the
application-wide, default, blueprint and meta limits, then the route's decorator walks the route's
own. Every limit of this gateway is a decorator on its route (`app._task_limit`, the stats limit),
so the hook resolves an empty list on every request: about 45 us of a cache hit's CPU, 35 of a
/health (`python -m bench.request_profile`). `drop_idle_check` removes the hook only while there is
nothing for it to check; if any such limit exists, or this Flask-Limiter keeps them where we do not
look, the hook stays and nothing changes but the saving.
"""

from __future__ import annotations

from flask import Flask
from flask_limiter import Limiter


def drop_idle_check(app: Flask, limiter: Limiter) -> bool:
    """Remove the limiter's before-request check from `app` if it has no limit to check there.

    Call after every route and limit is registered. True if the hook was removed."""
    if _has_hook_limits(limiter):
        return False
    hooks = app.before_request_funcs.get(None, [])
    check = limiter._check_request_limit
    if check not in hooks:
        return False
    hooks.remove(check)
    return True


def _has_hook_limits(limiter: Limiter) -> bool:
    """Whether anything only the before-request pass applies exists (or might: unknown attributes count)."""
    try:
        manager = limiter.limit_manager
        return bool(manager.application_limits or manager.default_limits or manager._blueprint_limits
                    or limiter._meta_limits or limiter._in_memory_fallback_enabled)
    except AttributeError:
        return True
