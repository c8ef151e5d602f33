"""The deadline transport (`gateway.providers.deadline`) for SDKs built on httpx2/httpcore2.

Why: the anthropic (and openai) SDKs send through `httpx2`, a fork of httpx with the same
per-operation timeouts: a reply dripped one byte every 0.5 s, or a stream that stalls after
its first event, never trips a read timeout. `deadline.DeadlineTransport` already takes the
httpx flavour as an argument; what it lacks is a builder that does not ask google-genai which
flavour to use. This module is that builder and nothing more.

The SDK hands each request's timeout to the transport, which makes it a deadline over the
whole exchange (connect, send, headers, every body byte, the whole of a stream).
"""

from __future__ import annotations

import httpcore2
import httpx2

from gateway.providers.deadline import DeadlineTransport, environment_proxy


def build_transport(*, base_url: str, max_connections: int, verify=True) -> DeadlineTransport:
    """httpx2's own transport (pool size, TLS as httpx2 would set it up, the environment's proxy
    for `base_url`) with each request's timeout enforced as a deadline over all of it."""
    limits = httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    inner = httpx2.HTTPTransport(verify=verify, limits=limits, proxy=environment_proxy(base_url))
    return DeadlineTransport(inner, httpx2, httpcore2)
