"""Readiness and status probes, beside the cheap liveness check (`/health`).

- `GET /api/v1/ready`: 200 when this instance can serve tasks: its configuration loaded (it
  would not have started otherwise), its ledger can be written, and at least one model has its
  provider configured; 503 naming each check that fails. For a load balancer or Kubernetes.
- `GET /api/v1/status`: what an operator wants to see at a glance: version, uptime, mode, the
  models with their providers, configuration and circuit states, the cache and limit settings,
  and which worker answered.
"""

from __future__ import annotations

import os
import tempfile
import time

from flask_restx import Namespace, Resource, fields

from gateway.container import Gateway
from gateway.http.routes import __version__
from gateway.http.schemas import Schemas


def readiness(gateway: Gateway) -> dict[str, str]:
    """Each check's result: "ok" or why not (our words; no paths of the host beyond the ledger's own)."""
    checks = {"config": "ok", "ledger": "ok" if _ledger_writable(gateway.tracker.ledger_path)
              else "the cost ledger cannot be written"}
    configured = [model["id"] for model in gateway.models.describe() if model["configured"]]
    checks["models"] = "ok" if configured else "no model has its provider's key set"
    return checks


def _ledger_writable(ledger) -> bool:
    """The ledger is a file (or not made yet) and its folder takes new files: SQLite writes its journal
    there. A real file is created and removed, since permission bits say nothing for root or a read-only disk."""
    if ledger.exists() and not ledger.is_file():
        return False
    if not (os.access(ledger.parent, os.W_OK) and (not ledger.exists() or os.access(ledger, os.W_OK))):
        return False
    try:
        with tempfile.TemporaryFile(dir=ledger.parent):
            return True
    except OSError:
        return False


def probe_namespaces(gateway: Gateway, schemas: Schemas) -> list[tuple[Namespace, str]]:
    ready_ns = Namespace("ready", description="Readiness probe")
    status_ns = Namespace("status", description="Instance status for operators")
    ready_model = ready_ns.model("Readiness", {
        "ready": fields.Boolean(example=True),
        "checks": fields.Raw(description='Each check ("config", "ledger", "models"): "ok" or what is wrong',
                             example={"config": "ok", "ledger": "ok", "models": "ok"}),
    })

    @ready_ns.route("")
    class Ready(Resource):
        @ready_ns.response(200, "Ready to serve tasks", ready_model)
        @ready_ns.response(503, "Not ready: the failing checks are named", ready_model)
        def get(self):
            """Report whether this instance can serve tasks, with each check named."""
            checks = readiness(gateway)
            ready = all(value == "ok" for value in checks.values())
            return {"ready": ready, "checks": checks}, 200 if ready else 503

    @status_ns.route("")
    class Status(Resource):
        @status_ns.response(200, "Status")
        def get(self):
            """Report version, uptime, mode, models and their circuits, cache and limit settings."""
            config = gateway.config
            circuits = gateway.router.circuits()
            return {
                "version": __version__,
                "environment": config.app_env,
                "mode": gateway.upstream.mode,
                "uptime_seconds": round(time.monotonic() - gateway.started_at, 3),
                "pid": os.getpid(),  # which serve.py worker answered
                "default_model": gateway.service.default_model,
                "models": [{**model, "circuit": circuits.get(model["id"])} for model in gateway.models.describe()],
                "cache": {"enabled": config.cache_enabled, **gateway.cache.stats()["total"]},
                "rate_limits": {"enabled": config.ratelimit_enabled, "tasks": config.ratelimit_task_limits,
                                "strategy": config.ratelimit_strategy,
                                "storage": config.ratelimit_storage_uri.split(":", 1)[0]},
            }

    return [(ready_ns, "/ready"), (status_ns, "/status")]
