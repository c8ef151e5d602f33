"""`flask --app app keys ...`: API key management from the command line.

    flask --app app keys create --name NAME [--owner O] [--scope admin] [--budget 25] [--limit "100/minute"]
                                [--tokens-per-minute N] [--tasks text,code] [--models gpt-4o-mini,...]
                                [--expires 2027-01-01]
    flask --app app keys list
    flask --app app keys revoke ID
    flask --app app keys usage ID [--month 2026-11]

The commands work on the app's own key store and ledger (COST_LEDGER_PATH), so a key made here
works at once in every running worker on that file. `create` prints the key once; nothing else
ever shows a key or its hash.
"""

from __future__ import annotations

import json
import time

import click
from flask import current_app
from flask.cli import AppGroup

from gateway.auth.keys import SCOPES, InvalidKeyField, parse_key_settings

keys_command = AppGroup("keys", help="Create, list and revoke API keys; show a key's usage.")


def _gateway():
    return current_app.extensions["gateway"]


@keys_command.command("create")
@click.option("--name", required=True, help="What the key is for.")
@click.option("--owner", default="", help="Who holds it (a label).")
@click.option("--scope", type=click.Choice(SCOPES), default="user", show_default=True)
@click.option("--budget", "monthly_budget_usd", default=None, help="Monthly budget in USD.")
@click.option("--limit", "rate_limit", default=None, help='Its own request limits, e.g. "100/minute;1000/day".')
@click.option("--tokens-per-minute", default=None, help="Tokens (input + output) per minute.")
@click.option("--tasks", "allowed_tasks", default=None, help="Comma-separated tasks it may run (text,code,classify).")
@click.option("--models", "allowed_models", default=None,
              help="Comma-separated models it may use (ids or aliases of the registry; default: all).")
@click.option("--expires", "expires_at", default=None, help="Expiry: YYYY-MM-DD (midnight UTC) or ISO date-time.")
def create_key(**options) -> None:
    """Create a key and print it (the only time it is shown)."""
    try:
        settings = parse_key_settings({name: value for name, value in options.items() if value is not None},
                                      resolve_model=_gateway().registry.resolve)
    except InvalidKeyField as exc:
        raise click.BadParameter(exc.reason, param_hint=f"--{_OPTION_OF.get(exc.field, exc.field)}") from None
    key, secret = _gateway().keys.create(**settings)
    click.echo(f"id:  {key.id}")
    click.echo(f"key: {secret}")
    click.echo("Store the key now: it is not shown again (only its hash is kept).", err=True)


_OPTION_OF = {"monthly_budget_usd": "budget", "rate_limit": "limit", "tokens_per_minute": "tokens-per-minute",
              "allowed_tasks": "tasks", "allowed_models": "models", "expires_at": "expires"}


@keys_command.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per key.")
def list_keys(as_json: bool) -> None:
    """List keys (ids and settings; never a key or its hash)."""
    keys, now = _gateway().keys.list(), time.time()
    if as_json:
        for key in keys:
            click.echo(json.dumps(key.public()))
        return
    click.echo(f"{'id':<21} {'scope':<6} {'state':<8} {'name':<24} {'owner':<16} {'created':<21} last used")
    for key in keys:
        public = key.public()
        state = "revoked" if key.revoked_at else "expired" if key.expired(now) else "active"
        click.echo(f"{key.id:<21} {key.scope:<6} {state:<8} {key.name[:24]:<24} {key.owner[:16]:<16} "
                   f"{public['created_at']:<21} {public['last_used_at'] or '-'}")


@keys_command.command("revoke")
@click.argument("key_id")
def revoke_key(key_id: str) -> None:
    """Revoke a key: refused from the next request on, in every worker."""
    key = _gateway().keys.revoke(key_id)
    if key is None:
        raise click.ClickException(f"no key with id {key_id!r}")
    click.echo(f"revoked {key.id} ({key.name})")


@keys_command.command("usage")
@click.argument("key_id")
@click.option("--month", default=None, help="YYYY-MM (UTC); default: this month.")
def key_usage(key_id: str, month: str | None) -> None:
    """A key's requests, tokens, cost, cache hits and savings in a month, as JSON (totals and by day)."""
    gateway = _gateway()
    key = gateway.keys.get(key_id)
    if key is None:
        raise click.ClickException(f"no key with id {key_id!r}")
    try:
        usage = gateway.tracker.key_usage(key.id, month)
    except ValueError:
        raise click.BadParameter("must be YYYY-MM", param_hint="--month") from None
    click.echo(json.dumps({**usage, "monthly_budget_usd": key.monthly_budget_usd}, indent=2))
