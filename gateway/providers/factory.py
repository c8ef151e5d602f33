"""Routes for every model of the registry: its provider client, circuit breaker and outbound ceilings.

Provider clients are made once and shared: every model with the same provider, key and base URL
uses one client (and one connection pool). Each model has its own circuit breaker (one failing
model must not take its siblings down); outbound ceilings are per provider, since quotas are
kept per account. A model whose key is not set gets no route: asking for it is a 503 naming the
variable (`ModelCatalog`). In demo mode every model is served by its provider's emulator.
"""

from __future__ import annotations

from gateway.config import Config
from gateway.providers.circuit_breaker import CircuitBreaker
from gateway.providers.demo import demo_endpoint
from gateway.providers.fallback import Candidate
from gateway.providers.model_file import ModelSpec
from gateway.providers.outbound_limits import OutboundLimiter, outbound_storage
from gateway.providers.registry import ModelRegistry

PROVIDERS = ("gemini", "openai", "anthropic")


def build_routes(registry: ModelRegistry, config: Config) -> dict[str, Candidate]:
    """A route per configured model id (aliases resolve to ids before routing)."""
    clients: dict[tuple[str, str | None, str], object] = {}
    limiters = _outbound_limiters(config)
    routes = {}
    for spec in registry:
        if not registry.configured(spec):
            continue
        base_url, key = _endpoint(registry, spec, config)
        client_key = (spec.provider, base_url, key)
        if client_key not in clients:
            clients[client_key] = _provider(spec.provider, key, base_url, config)
        routes[spec.id] = Candidate(
            model_id=spec.id, provider=clients[client_key], upstream=spec.upstream,
            breaker=CircuitBreaker(spec.id, failure_threshold=config.circuit_failure_threshold,
                                   cool_down=config.circuit_cool_down_seconds),
            limiter=limiters.get(spec.provider))
    return routes


def _endpoint(registry: ModelRegistry, spec: ModelSpec, config: Config) -> tuple[str | None, str]:
    if config.demo_mode:
        return demo_endpoint(spec.provider)
    # A model that needs no key (a local OpenAI-compatible server) still sends one: the SDKs require a value.
    return registry.base_url(spec), registry.api_key(spec) or "no-key-needed"


def _provider(provider: str, key: str, base_url: str | None, config: Config):
    """The provider client for one (provider, key, base URL): LangChain builds the vendor SDK under it."""
    if provider == "openai":
        from gateway.providers.openai_compat import OpenAICompatProvider

        return OpenAICompatProvider(api_key=key, base_url=base_url, max_connections=config.gemini_max_connections)
    if provider == "anthropic":
        from gateway.providers.anthropic import AnthropicProvider

        return AnthropicProvider(api_key=key, base_url=base_url, max_connections=config.gemini_max_connections)
    from gemini_wrapper import GeminiProvider

    return GeminiProvider(api_key=key, base_url=base_url or config.gemini_base_url or None,
                          max_connections=config.gemini_max_connections, pool_shards=config.gemini_pool_shards)


def _outbound_limiters(config: Config) -> dict[str, OutboundLimiter]:
    """Per provider, the ceilings its *_REQUESTS_PER_MINUTE / *_TOKENS_PER_MINUTE settings ask for (0 = none),
    counted in the rate limiter's storage (Redis shares them across workers)."""
    storage = None
    limiters = {}
    for provider in PROVIDERS:
        requests = getattr(config, f"{provider}_requests_per_minute")
        tokens = getattr(config, f"{provider}_tokens_per_minute")
        if requests or tokens:
            storage = storage or outbound_storage(config.ratelimit_storage_uri)
            limiters[provider] = OutboundLimiter(f"outbound:{provider}", requests_per_minute=requests or None,
                                                 tokens_per_minute=tokens or None, storage=storage)
    return limiters
