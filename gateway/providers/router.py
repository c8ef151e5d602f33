"""Which model answers a request: the public model ids, their providers, retries and fallbacks.

The task service asks for an ordered list of public model ids (the requested one, then its
fallbacks) and gets back the answer with the model that gave it. Each model is tried under the
retry policy (one deadline for the whole request); a model whose retries end in a retryable
failure hands over to the next; a non-retryable one (a 400, a safety block, a rejected call)
ends the request, since another model would be asked the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.errors import GatewayError
from gateway.providers.base import Completion, GenerationParams, Message, Provider, ProviderRequest, TextStream
from gateway.providers.retry_policy import RetryPolicy


@dataclass(frozen=True)
class ModelRoute:
    """One public model id and how to reach it."""

    model_id: str  # what clients ask for and what the ledger records
    provider: Provider
    upstream: str  # the vendor's own model name


@dataclass(frozen=True)
class Routed:
    """Who answered: the route taken, and the models that failed before it (id, error code)."""

    route: ModelRoute
    failed: tuple[tuple[str, str], ...] = ()
    completion: Completion | None = None

    @property
    def fallback_used(self) -> bool:
        return bool(self.failed)


@dataclass
class ModelRouter:
    routes: dict[str, ModelRoute]
    policy: RetryPolicy = field(default_factory=RetryPolicy)

    def complete(self, model_ids: Sequence[str], messages: tuple[Message, ...],
                 params: GenerationParams) -> Routed:
        def attempt(route: ModelRoute, seconds_left: float) -> Completion:
            return route.provider.complete(ProviderRequest(route.upstream, messages, params), seconds_left)

        route, failed, completion = self._first_success(model_ids, attempt, "call")
        return Routed(route, failed, completion)

    def open_stream(self, model_ids: Sequence[str], messages: tuple[Message, ...],
                    params: GenerationParams) -> tuple[TextStream, Routed]:
        """Retries and fallbacks cover opening the stream, up to its first chunk."""
        def attempt(route: ModelRoute, seconds_left: float) -> TextStream:
            chunks = route.provider.open_stream(ProviderRequest(route.upstream, messages, params), seconds_left)
            return TextStream.opened(chunks, route.upstream)

        route, failed, stream = self._first_success(model_ids, attempt, "stream")
        return stream, Routed(route, failed)

    def _first_success(self, model_ids: Sequence[str], attempt, what: str):
        failed: list[tuple[str, str]] = []
        for index, model_id in enumerate(model_ids):
            route = self.routes[model_id]
            try:
                result = self.policy.run(lambda seconds_left, route=route: attempt(route, seconds_left),
                                         label=f"{route.provider.name} {what} ({model_id})")
            except GatewayError as error:
                if not error.retryable or index == len(model_ids) - 1:
                    raise
                failed.append((model_id, error.code))
                continue
            return route, tuple(failed), result
        raise AssertionError("no model to try")  # callers always pass at least one
