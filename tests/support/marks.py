"""Skip marks for tests that need one operating system's features, and the Redis the backend tests need."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

posix_only = pytest.mark.skipif(os.name != "posix", reason="signals (SIGKILL), rlimits and /proc are POSIX")
linux_only = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc")
several_workers = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="several workers need SO_REUSEPORT")

REDIS_URI = "redis://127.0.0.1:6379"


def require_redis(purpose: str) -> str:
    """The local Redis's URI; skip (with the reason) when none answers, or fail when `CI` is set, so CI
    always runs the Redis tests."""
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return REDIS_URI
    except OSError:
        if os.environ.get("CI"):
            pytest.fail("CI is set but no Redis answers on 127.0.0.1:6379")
        pytest.skip(f"no Redis on 127.0.0.1:6379: {purpose} needs one")
