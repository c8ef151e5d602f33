"""Property-based fuzzing of every operation in /swagger.json (schemathesis over Hypothesis).

For each operation of the spec Flask-RESTX emits (Swagger 2.0, which schemathesis reads as it
is), Hypothesis draws requests that fit the schema and requests that break it, and each goes
through the app in process (WSGI) with rate limits off and the Gemini emulator upstream (the
real SDK path). Every answer must be: no 5xx, a status the operation documents, a documented
content type, a body that matches the documented schema of that status, and a 4xx (never a 2xx)
for data the schema forbids.

Bounded and repeatable: FUZZ_SEED (printed) and FUZZ_MAX_EXAMPLES per operation, both
overridable from the environment for a longer hunt (`FUZZ_MAX_EXAMPLES=2000 FUZZ_SEED=7 pytest
tests/test_fuzz_openapi.py`); Hypothesis's example database is off, so a run is the same run
everywhere. The app requires API keys; requests carry an admin key from the `fuzz_key_headers`
fixture, and `ignored_auth` (a request without a key or with a wrong one must be refused) is one of
the checks.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "20261126"))
FUZZ_MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "100"))
# The spec's maxLength of a prompt follows REQUEST_MAX_PROMPT_CHARS; at the default 32,000 schemathesis spends
# about 9 s drawing 60 bodies for one operation, at 1,000 about 1 s. The limit itself is tested in test_api.py.
FUZZ_PROMPT_CHARS = 1000


@schemathesis.check
def json_schema_conformance(ctx, response, case) -> bool | None:
    """`response_schema_conformance`, but for a task answered as an event stream (`"stream": true`): Swagger 2.0
    gives a status one schema, the JSON answer's; the events are described in words (tests/test_task_streams.py)."""
    if any(value.startswith("text/event-stream") for value in response.headers.get("content-type", [])):
        return None
    return response_schema_conformance(ctx, response, case)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, json_schema_conformance,
          negative_data_rejection]
# Every operation of the spec (test_the_fuzz_covers_every_operation keeps this list complete).
OPERATIONS = ["GET /health", "POST /generate/text", "POST /generate/code", "POST /generate/text/stream",
              "POST /classify/text", "GET /stats", "GET /keys", "POST /keys", "GET /keys/me/usage",
              "DELETE /keys/{key_id}", "GET /keys/{key_id}/usage", "GET /usage/export", "GET /models",
              "GET /ready", "GET /status", "POST /generate/batch", "POST /process"]


@pytest.fixture
def fuzz_app(make_app):
    """The app under fuzzing: keys required, rate limits off (a 429 would hide everything after it),
    emulator upstream."""
    return make_app(ratelimit_enabled=False, request_max_prompt_chars=FUZZ_PROMPT_CHARS, auth_enabled=True)


@pytest.fixture
def fuzz_key_headers(fuzz_app) -> dict[str, str]:
    """Headers carrying a valid admin key of `fuzz_app` (admin: every operation is reachable)."""
    _, key = fuzz_app.extensions["gateway"].keys.create(name="fuzz", scope="admin")
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def fuzz_schema(fuzz_app):
    return schemathesis.openapi.from_wsgi("/swagger.json", fuzz_app)


def test_the_fuzz_covers_every_operation(fuzz_schema):
    labels = [result.ok().label for result in fuzz_schema.get_all_operations()]
    assert sorted(labels) == sorted(OPERATIONS)


@pytest.mark.parametrize("label", OPERATIONS)
def test_every_answer_matches_the_spec(fuzz_schema, fuzz_key_headers, label):
    """Schema-valid and schema-breaking requests to one operation; each answer checked against the spec."""
    print(f"fuzz {label}: seed {FUZZ_SEED}, at most {FUZZ_MAX_EXAMPLES} examples "
          "(set FUZZ_SEED / FUZZ_MAX_EXAMPLES to change)")
    operation = fuzz_schema.find_operation_by_label(label)
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                      operation.as_strategy(GenerationMode.NEGATIVE))
    checks = [*CHECKS, ignored_auth] if fuzz_key_headers else CHECKS

    @seed(FUZZ_SEED)
    @settings(max_examples=FUZZ_MAX_EXAMPLES, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(case=cases)
    def fuzz(case):
        case.call_and_validate(headers=fuzz_key_headers or None, checks=checks)

    fuzz()
