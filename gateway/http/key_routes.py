"""The `/api/v1/keys` namespace: API key management (admin keys) and a key's own usage (any key).

Who may call what is decided before a route runs (`gateway/auth/guard.py`, from `app.py`'s hook); these
routes validate input (`api_keys.parse_key_settings`, the month) and talk to the `KeyStore`
and the ledger. Creating a key is the only answer that ever contains a key.
"""

from __future__ import annotations

from flask import request
from flask_restx import Namespace, Resource, fields

from gateway.auth.keys import SCOPES, TASKS, InvalidKeyField, parse_key_settings
from gateway.container import Gateway
from gateway.errors import InvalidRequest, NotFound, Unauthorized, UnsupportedMediaType
from gateway.http.request_state import state
from gateway.http.schemas import nullable as _nullable


def _no_such_key(key_id: str) -> NotFound:
    return NotFound("No API key has this id", details={"key_id": key_id[:64]})


def keys_namespace(gateway: Gateway, schemas, admin_limit) -> Namespace:
    ns = Namespace("keys", description="API keys: create, list, revoke (admin keys); usage per key and month")
    settings = {
        "name": fields.String(required=True, description="What the key is for", example="billing-service"),
        "owner": fields.String(description="Who holds it (a label)", example="team-billing"),
        "scope": fields.String(enum=list(SCOPES), default="user", description="user: tasks and own usage; admin: all"),
        "rate_limit": fields.String(description="The key's own request limits, overriding RATELIMIT_TASK_LIMITS "
                                                "(Flask-Limiter syntax)", example="100/minute;1000/day"),
        "tokens_per_minute": fields.Integer(min=1, description="Tokens (input + output) per minute, this key"),
        "monthly_budget_usd": fields.Float(min=0, description="Monthly budget in USD (stored and shown)"),
        "allowed_tasks": fields.List(fields.String(enum=list(TASKS)), description="Tasks it may run; absent: all"),
        "allowed_models": fields.List(fields.String(example="gemini-2.0-flash"),
                                      description="Models it may use (ids or aliases from GET /models, stored as ids); "
                                                  "absent: all"),
        "expires_at": fields.String(description="Expiry: YYYY-MM-DD (midnight UTC) or an ISO 8601 date-time",
                                    example="2027-01-01"),
    }
    new_key = ns.model("NewKey", settings)
    optional = ("rate_limit", "tokens_per_minute", "monthly_budget_usd", "allowed_tasks", "allowed_models")
    shown = {**settings, **{name: _nullable(settings[name]) for name in optional},
             "id": fields.String(example="key_3f2c9a7e4b1d4e0f"),
             "expires_at": _nullable(fields.String(description="ISO 8601, UTC", example="2027-01-01T00:00:00Z")),
             "created_at": fields.String(example="2026-11-26T08:00:00Z"), "last_used_at": _nullable(fields.String()),
             "revoked_at": _nullable(fields.String())}
    key_model = ns.model("ApiKey", shown)
    created_model = ns.model("CreatedKey", {**shown, "key": fields.String(
        description="The key itself: shown this once, stored only as a hash", example="mtk_...")})
    key_list = ns.model("ApiKeyList", {"keys": fields.List(fields.Nested(key_model))})
    day = ns.model("KeyUsageDay", {"date": fields.String(example="2026-11-26"), "requests": fields.Integer(),
                                   "input_tokens": fields.Integer(), "output_tokens": fields.Integer(),
                                   "cost_usd": fields.Float(), "cache_hits": fields.Integer(),
                                   "saved_usd": fields.Float()})
    usage_model = ns.model("KeyUsage", {
        "key_id": fields.String(), "month": fields.String(example="2026-11"), "from": fields.String(),
        "until": fields.String(), "requests": fields.Integer(), "input_tokens": fields.Integer(),
        "output_tokens": fields.Integer(), "cost_usd": fields.Float(), "cache_hits": fields.Integer(),
        "saved_usd": fields.Float(), "monthly_budget_usd": _nullable(fields.Float()),
        "by_day": fields.List(fields.Nested(day)),
    })
    month_doc = {"month": {"in": "query", "type": "string", "description": "YYYY-MM (UTC); default: this month"}}
    def refusals(*statuses):
        """Document the auth and limit refusals an operation can answer."""
        described = {401: "No valid API key (missing, unknown, revoked or expired)", 403: "Needs an admin key",
                     429: "Rate limited; see Retry-After"}

        def decorate(method):
            for status in statuses:
                method = ns.response(status, described[status], schemas.error)(method)
            return method

        return decorate

    admin = refusals(401, 403, 429)

    @ns.route("")
    class Keys(Resource):
        @ns.expect(new_key)
        @ns.response(201, "Created: the key is in `key`, shown this once", created_model)
        @ns.response(400, "Invalid setting (details.fields names it)", schemas.error)
        @ns.response(415, "Body is not JSON", schemas.error)
        @admin
        @admin_limit
        def post(self):
            """Create a key (admin).

            The answer holds the key itself, once; only its hash is stored.
            """
            if not request.is_json:
                raise UnsupportedMediaType("Send the body as JSON with 'Content-Type: application/json'",
                                           details={"content_type": request.content_type or ""})
            body = request.get_json()  # a body that does not parse is a 400 with its reason
            if not isinstance(body, dict):
                raise InvalidRequest("The request body must be a JSON object",
                                     details={"fields": {"body": "must be an object"}})
            try:
                key, secret = gateway.keys.create(**parse_key_settings(body, resolve_model=gateway.registry.resolve))
            except InvalidKeyField as exc:
                raise InvalidRequest(f"Invalid input: '{exc.field}' {exc.reason}",
                                     details={"fields": {exc.field: exc.reason}}) from None
            return {**key.public(), "key": secret}, 201

        @ns.response(200, "Every key (never a key or its hash)", key_list)
        @admin
        @admin_limit
        def get(self):
            """List keys (admin), revoked ones included."""
            return {"keys": [key.public() for key in gateway.keys.list()]}

    @ns.route("/<string:key_id>")
    class Key(Resource):
        @ns.response(200, "Revoked (from the next request on, in every worker)", key_model)
        @ns.response(404, "No such key", schemas.error)
        @admin
        @admin_limit
        def delete(self, key_id):
            """Revoke a key (admin)."""
            key = gateway.keys.revoke(key_id)
            if key is None:
                raise _no_such_key(key_id)
            return key.public()

    @ns.route("/<string:key_id>/usage")
    class KeyUsage(Resource):
        @ns.doc(params=month_doc)
        @ns.response(200, "The key's usage in the month, by day", usage_model)
        @ns.response(400, "Invalid month", schemas.error)
        @ns.response(404, "No such key", schemas.error)
        @admin
        @admin_limit
        def get(self, key_id):
            """One key's requests, tokens, cost, cache hits and savings in a month (admin)."""
            key = gateway.keys.get(key_id)
            if key is None:
                raise _no_such_key(key_id)
            return _usage(gateway, key)

    @ns.route("/me/usage")
    class OwnUsage(Resource):
        @ns.doc(params=month_doc)
        @ns.response(200, "The calling key's usage in the month, by day", usage_model)
        @ns.response(400, "Invalid month", schemas.error)
        @refusals(401, 429)
        @admin_limit
        def get(self):
            """The calling key's own usage in a month (any key)."""
            key = state().api_key
            if key is None:
                raise Unauthorized("Send your API key to read its usage")
            return _usage(gateway, gateway.keys.get(key.id) or key)

    return ns


def _usage(gateway: Gateway, key) -> dict:
    month = request.args.get("month") or None
    try:
        usage = gateway.tracker.key_usage(key.id, month)
    except ValueError:
        raise InvalidRequest("Invalid input: 'month' must be YYYY-MM",
                             details={"fields": {"month": "must be YYYY-MM"}}) from None
    return {**usage, "monthly_budget_usd": key.monthly_budget_usd}

