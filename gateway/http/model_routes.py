"""`GET /api/v1/models`: the models this gateway serves, their providers and prices, and which can be called.

Read from the model registry (`gateway/providers/registry.py`, `data/models.json`). Any valid
key may list them (they are what `model` may name); the listing shows whether each model is
configured and, if not, the name of the variable its key would go in, never a key and never a
base URL (it may name an internal host). Limited like `/stats` (RATELIMIT_STATS_LIMITS).
"""

from __future__ import annotations

from flask_restx import Namespace, Resource, fields

from gateway.container import Gateway
from gateway.http.schemas import SECURITY, Schemas, nullable
from gateway.providers.registry import PROVIDERS


def models_namespace(gateway: Gateway, schemas: Schemas, limit) -> Namespace:
    ns = Namespace("models", description="The models requests may name, with their providers and prices")
    price = "USD per million {} tokens (null: unknown, recorded at $0)"
    model = ns.model("Model", {
        "id": fields.String(required=True, description="What a request's `model` names", example="gpt-4o-mini"),
        "provider": fields.String(required=True, enum=list(PROVIDERS), example="openai"),
        "upstream": fields.String(required=True, description="The vendor's own model name", example="gpt-4o-mini"),
        "aliases": fields.List(fields.String, required=True, description="Other names of the same model"),
        "input_per_million": nullable(fields.Float(required=True, description=price.format("input"), example=0.15)),
        "output_per_million": nullable(fields.Float(required=True, description=price.format("output"),
                                                    example=0.6)),
        "context_window": nullable(fields.Integer(required=True, description="Tokens in and out (null: unknown)",
                                                  example=128000)),
        "max_output_tokens": nullable(fields.Integer(required=True, description="Longest answer (null: unknown)",
                                                     example=16384)),
        "configured": fields.Boolean(required=True, description="Whether it can be called: its key is set, or "
                                                                "it needs none, or the gateway is in demo mode"),
        "missing_key": nullable(fields.String(required=True, description="The variable its key goes in, when "
                                                                         "not configured", example="OPENAI_API_KEY")),
        "default": fields.Boolean(required=True, description="Whether requests that name no model get it"),
    })
    listing = ns.model("ModelList", {
        "default_model": fields.String(required=True, example="gemini-2.0-flash"),
        "models": fields.List(fields.Nested(model), required=True),
    })

    @ns.route("")
    class Models(Resource):
        @ns.doc(security=SECURITY)
        @ns.response(200, "The models, in the registry's order (never a key)", listing)
        @ns.response(401, "No valid API key (missing, unknown, revoked or expired), when AUTH_ENABLED", schemas.error)
        @ns.response(429, "Rate limited (RATELIMIT_STATS_LIMITS); see Retry-After", schemas.error)
        @limit
        def get(self):
            """List the models a request may name, with their provider, prices and whether each can be called."""
            return {"default_model": gateway.registry.default.id, "models": gateway.registry.describe()}

    return ns
