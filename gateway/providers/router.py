"""Which model answers a request: the public model ids, their routes, and the fallback chain.

The task service asks for an ordered list of public model ids (the requested one, then its
fallbacks) and gets back the answer with the model that gave it. `FallbackChain` does the
trying (retries per model under one deadline, circuit breakers, outbound ceilings; when to
move on is decided there); this module maps ids to routes and the chain's answers to `Routed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.providers.base import Completion, GenerationParams, Message, ProviderRequest, TextStream
from gateway.providers.fallback import Candidate, FallbackChain
from gateway.providers.retry_policy import RetryPolicy

ModelRoute = Candidate  # one public model id and how to reach it (provider, upstream name, breaker, limiter)


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
    chain: FallbackChain | None = None

    def __post_init__(self) -> None:
        if self.chain is None:
            self.chain = FallbackChain(self.policy)

    def complete(self, model_ids: Sequence[str], messages: tuple[Message, ...], params: GenerationParams,
                 caller: str | None = None) -> Routed:
        answer = self.chain.complete([self.routes[model_id] for model_id in model_ids],
                                     lambda route: ProviderRequest(route.upstream, messages, params), caller=caller)
        return Routed(self.routes[answer.model_id], _failed(answer.failed), answer.completion)

    def open_stream(self, model_ids: Sequence[str], messages: tuple[Message, ...],
                    params: GenerationParams, caller: str | None = None) -> tuple[TextStream, Routed]:
        """Retries and fallbacks cover opening the stream, up to its first text."""
        stream = self.chain.open_stream([self.routes[model_id] for model_id in model_ids],
                                        lambda route: ProviderRequest(route.upstream, messages, params), caller=caller)
        route = self.routes[stream.model_id]
        return TextStream(stream, route.upstream), Routed(route, _failed(stream.failed))

    def circuits(self) -> dict[str, dict]:
        """Each model's circuit breaker state, for /status."""
        return {model_id: route.breaker.snapshot() for model_id, route in self.routes.items() if route.breaker}


def _failed(failed) -> tuple[tuple[str, str], ...]:
    return tuple((model.model_id, model.code) for model in failed)
