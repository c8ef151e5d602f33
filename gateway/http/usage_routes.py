"""`GET /api/v1/usage/export`: the ledger's records as a CSV or JSON download, for admins.

Streamed: the body is `CostTracker.export_chunks`, rows fetched from one read snapshot of the
ledger as the client takes the pieces (64 KB each), so an export of any size holds a bounded
amount in memory and never blocks the ledger's writers (a WAL reader). Admin-only by
`auth.ADMIN_PREFIXES` (`/api/v1/usage`); limited like `/stats` (RATELIMIT_STATS_LIMITS).
"""

from __future__ import annotations

import time

from flask import Response, request
from flask_restx import Namespace, Resource

from gateway.container import Gateway
from gateway.errors import InvalidRequest
from gateway.http.routes import hours_argument
from gateway.http.schemas import Schemas

FORMATS = {"csv": "text/csv; charset=utf-8", "json": "application/json"}
MAX_EXPORT_HOURS = 24 * 366 * 100  # any finite window a person would ask for


def usage_namespace(gateway: Gateway, schemas: Schemas, limit) -> Namespace:
    ns = Namespace("usage", description="The cost ledger, for admins")

    @ns.route("/export")
    class UsageExport(Resource):
        @ns.doc(params={
            "hours": {"in": "query", "type": "number",
                      "description": f"Records of the last `hours` (0 < hours <= {MAX_EXPORT_HOURS}); all without it"},
            "format": {"in": "query", "type": "string", "enum": list(FORMATS), "default": "csv",
                       "description": "csv (a header row, then one row per record) or json (a list of records)"},
        })
        @ns.produces(["text/csv", "application/json"])
        @ns.response(200, "The ledger's records, oldest first, as an attachment (streamed)")
        @ns.response(400, "Invalid hours or format (details.fields names it)", schemas.error)
        @ns.response(401, "No valid API key, when AUTH_ENABLED", schemas.error)
        @ns.response(403, "Not an admin key", schemas.error)
        @ns.response(429, "Rate limited (RATELIMIT_STATS_LIMITS); see Retry-After", schemas.error)
        @limit
        def get(self):
            """Export the cost ledger (every task request's tokens, cost, cache, status, key id) as CSV or JSON."""
            kind, hours = _format_argument(), hours_argument(MAX_EXPORT_HOURS, default=None)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            chunks = gateway.tracker.export_chunks(kind, hours)
            return Response(chunks, mimetype=FORMATS[kind].split(";")[0], headers={
                "Content-Type": FORMATS[kind],
                "Content-Disposition": f'attachment; filename="usage-{stamp}.{kind}"',
                "Cache-Control": "no-store", "X-Accel-Buffering": "no",
            })

    return ns


def _format_argument() -> str:
    kind = request.args.get("format", "csv").strip().lower()
    if kind not in FORMATS:
        raise InvalidRequest("Invalid input: 'format' must be csv or json",
                             details={"fields": {"format": "must be csv or json"}})
    return kind
