"""Skip marks for tests that need one operating system's features."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

posix_only = pytest.mark.skipif(os.name != "posix", reason="signals (SIGKILL), rlimits and /proc are POSIX")
linux_only = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc")
several_workers = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="several workers need SO_REUSEPORT")
