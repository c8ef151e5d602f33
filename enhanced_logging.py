"""The gateway's JSON-lines logs under `logs/`, and the redaction every log sink goes through.

Why it looks like this:

- One file per concern (requests, security audit, errors, performance, cost) so each can be
  tailed, shipped or kept for its own time; every line is one JSON object (`ts`, `event`, fields).
- Request threads do as little as possible: each `log_*` call queues the plain fields it was given
  (one item per finished request, `log_finished`); redaction, JSON encoding, the console summary and
  the writes happen on one writer thread per `RequestLogger` (`gateway/observability/log_writer.py`).
  `flush()` waits for what is queued so far; `close()` drains and closes.
- Secrets never reach a file or the console: configured secret values, sensitive keys
  (Authorization, api keys, passwords...) and credential-looking text are replaced by "[REDACTED]".
  One `Redactor` does it for the JSON lines and, through `RedactingFormatter` (installed on the
  process's logging handlers by `redact_log_handlers`), for stderr: Python logging's own records,
  waitress's and werkzeug's, tracebacks included.
- The credential patterns run on RE2 (`google-re2`): linear time, whatever the text (Python's `re`
  backtracked quadratically over a long run of spaces after "key").
- It takes plain data (strings, dicts), never Flask objects, so it is testable and reusable.
- Instances share nothing (no `logging.getLogger` names), so many apps can live in one process.

The security scan lives in `gateway/observability/security_scanner.py`; its names are re-exported here.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import re2

from gateway.observability.log_writer import FINISHED, LOG_FILES, LogWriter
from gateway.observability.security_scanner import SCAN_MAX_CHARS, ScanResult, SecurityEvent, SecurityScanner

__all__ = ["LOG_FILES", "REDACTED", "SCAN_MAX_CHARS", "RedactingFormatter", "Redactor", "RequestLogger",
           "ScanResult", "SecurityEvent", "SecurityScanner", "redact_log_handlers"]

REDACTED = "[REDACTED]"
_SENSITIVE_KEYS = frozenset({
    "authorization", "proxy-authorization", "x-api-key", "api_key", "google_api_key", "password",
    "cookie", "set-cookie", "token", "secret",
})
_SENSITIVE_SUFFIXES = ("_key", "-key", "_token", "-token", "password", "_secret")
_MIN_SECRET_LEN = 4
_WS = r"\s\v\x1c-\x1f\x85\p{Z}"  # what Python's str.isspace() calls whitespace (RE2's \s is ASCII)
# Credentials inside free text (exception messages, URLs, headers dumped into a string).
_CREDENTIAL_TEXT = [
    (rf"((?:proxy-)?authorization|x-(?:goog-)?api-key|api[_-]?key|password|passwd|secret|token|\bkey)"
     rf"([{_WS}]*[\"']?[{_WS}]*[:=][{_WS}]*[\"']?)(?:bearer[{_WS}]+|basic[{_WS}]+)?[^{_WS}\"',;&}}]+",
     rf"\1\2{REDACTED}", True),
    (r"\bbearer[" + _WS + r"]+[A-Za-z0-9._~+/\-]{12,}=*", f"Bearer {REDACTED}", True),
    (r"AIza[0-9A-Za-z_\-]{30,}", REDACTED, False),  # no \b: a key glued to a word is still a key
    (r"mtk_[0-9A-Za-z_\-]{20,}", REDACTED, False),  # the gateway's own client API keys (gateway/auth/keys.py)
    # JWTs (a client's bearer token, gateway/auth/jwt_tokens.py): a base64url JSON header ("eyJ" is `{"`), a payload
    # and a signature, empty under alg "none". Wherever a client puts one: a path, an X-Request-ID, a prompt.
    (r"eyJ[0-9A-Za-z_\-]{8,}\.[0-9A-Za-z_\-]{8,}\.[0-9A-Za-z_\-]*", REDACTED, False),
]
_CREDENTIAL_PATTERNS = [(re2.compile(f"(?i){pattern}" if fold else pattern), replacement)
                        for pattern, replacement, fold in _CREDENTIAL_TEXT]
# One cheap search first: most strings (ids, paths, model names) match none of the patterns above.
# (Case-insensitive throughout: a superset of the patterns, which is all a pre-filter needs.)
_MAYBE_CREDENTIAL = re2.compile("(?i)" + "|".join(f"(?:{pattern})" for pattern, _, _ in _CREDENTIAL_TEXT))
# Cheaper still, in plain Python: every pattern above needs one of these words (compared case-folded,
# which folds what RE2's (?i) folds to ASCII, such as the Kelvin sign and the long s).
_CREDENTIAL_WORDS = ("key", "authorization", "passw", "secret", "token", "bearer", "aiza", "mtk_", "eyj")
_MEMO_MAX_LEN, _MEMO_ENTRIES = 64, 4096
_PLAIN_TYPES = frozenset({int, float, bool, type(None)})


class Redactor:
    """Replaces configured secret values, sensitive keys' values and credential-looking text by "[REDACTED]".

    One instance serves many threads: its memos are plain dicts whose single operations are atomic.
    Every pattern is RE2, so redacting a text costs time linear in its length."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        usable = {s for s in secrets if isinstance(s, str) and len(s) >= _MIN_SECRET_LEN}
        self.secrets: tuple[str, ...] = tuple(sorted(usable, key=len, reverse=True))  # longest first
        self._keys: dict[Any, tuple[Any, bool]] = {}  # field name -> (redacted name, is it sensitive)
        self._clean_short: dict[str, str] = {}

    def with_secrets(self, secrets: Iterable[str]) -> Redactor:
        """A redactor for these secrets as well as this one's (this one, if it already has them all)."""
        extra = set(Redactor(secrets).secrets) - set(self.secrets)
        return Redactor((*self.secrets, *extra)) if extra else self

    def redact(self, value: Any) -> Any:
        """A copy of `value` with secrets, sensitive keys and credential-looking text replaced."""
        kind = type(value)  # exact types first: this runs for every field of every line
        if kind is str:
            return self.redact_text(value)
        if kind in _PLAIN_TYPES:
            return value
        if isinstance(value, Mapping):
            return self._redact_mapping(value)
        if isinstance(value, list | tuple | set | frozenset):
            return [self.redact(v) for v in value]
        if isinstance(value, str):
            return self.redact_text(value)
        if isinstance(value, bool | int | float):
            return value
        return self.redact_text(str(value))  # anything else would be str()-ed by json: redact that text

    def redact_text(self, text: str) -> str:
        """`text` with secrets and credential-looking parts replaced."""
        if len(text) <= _MEMO_MAX_LEN:  # paths, methods, model names, clients repeat on every line
            clean = self._clean_short.get(text)
            if clean is None:
                if len(self._clean_short) >= _MEMO_ENTRIES:
                    self._clean_short.clear()
                clean = self._clean_short[text] = self._redact_uncached(text)
            return clean
        return self._redact_uncached(text)

    def _redact_mapping(self, mapping: Mapping) -> dict:
        clean = {}
        for key, item in mapping.items():
            known = self._keys.get(key)
            if known is None:  # field names repeat on every line: judge each distinct one once
                known = self._judge_key(key)
            clean_key, sensitive = known
            clean[clean_key] = REDACTED if sensitive else self.redact(item)
        return clean

    def _judge_key(self, key: Any) -> tuple[Any, bool]:
        judged = (self.redact_text(key) if isinstance(key, str) else key, _is_sensitive_key(key))
        if len(self._keys) < 1024:
            self._keys[key] = judged
        return judged

    def _redact_uncached(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        folded = text.casefold()
        if not any(word in folded for word in _CREDENTIAL_WORDS):
            return text
        try:
            suspect = _MAYBE_CREDENTIAL.search(text)
        except UnicodeEncodeError:  # a lone surrogate: RE2 takes UTF-8 only (files show it escaped anyway)
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
            suspect = _MAYBE_CREDENTIAL.search(text)
        if suspect:
            for pattern, replacement in _CREDENTIAL_PATTERNS:
                text = pattern.sub(replacement, text)
        return text


class RedactingFormatter(logging.Formatter):
    """Formats a record with the handler's own formatter, then redacts the whole text.

    The whole text, so the message, its arguments, `extra` fields, the traceback (`exc_text`) and
    `stack_info` are all covered, whatever the inner format string shows."""

    def __init__(self, inner: logging.Formatter | None, redactor: Redactor) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor.redact_text(self.inner.format(record))


def redact_log_handlers(secrets: Iterable[str]) -> int:
    """Send every handler of this process's loggers (the root's stderr handler, waitress's, werkzeug's...)
    through a `Redactor` that knows `secrets`, besides the secrets it already knew. Returns how many
    handlers it covered. Idempotent: a handler is wrapped once, and only new secrets are added."""
    redactor = Redactor(secrets)
    loggers = [logging.getLogger(), *(item for item in list(logging.Logger.manager.loggerDict.values())
                                      if isinstance(item, logging.Logger))]
    covered = 0
    for logger in loggers:
        for handler in list(logger.handlers):
            formatter = handler.formatter
            if isinstance(formatter, RedactingFormatter):
                formatter.redactor = formatter.redactor.with_secrets(redactor.secrets)
            else:
                handler.setFormatter(RedactingFormatter(formatter, redactor))
            covered += 1
    return covered


def log_uncaught_exceptions() -> None:
    """Send exceptions nothing caught (main thread and other threads) through logging, so they reach
    stderr through the redacting handlers above instead of Python's raw traceback printer."""
    uncaught = logging.getLogger("gateway.uncaught")

    def main_thread_hook(kind, exc, tb) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, exc, tb)
            return
        uncaught.critical("uncaught exception", exc_info=(kind, exc, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        uncaught.error("uncaught exception in thread %s", name,
                       exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = main_thread_hook
    threading.excepthook = thread_hook


class RequestLogger:
    """The gateway's JSON-lines logs; safe to call from any thread.

    Every `log_*` method only queues plain fields (already computed, with a `time.time()` stamp):
    the writer thread redacts, encodes and writes them. Dicts given to it are handed over: the caller
    must not change them afterwards."""

    def __init__(self, log_dir: Path | str, *, max_bytes: int = 10 * 1024 * 1024, backup_count: int = 5,
                 console: bool = True, console_level: str = "INFO", secrets: Iterable[str] = (),
                 log_full_prompts: bool = False) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_full_prompts = log_full_prompts
        self.redactor = Redactor(secrets)
        self._writer = LogWriter(self.log_dir, redactor=self.redactor, max_bytes=max_bytes, backup_count=backup_count,
                                 console=sys.stderr if console else None,
                                 console_level=logging.getLevelNamesMapping()[console_level.upper()])
        self._put = self._writer.put
        atexit.register(self.close)

    # --- lifecycle -------------------------------------------------------------------------

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Block until every line queued before this call is written; False if `timeout` ran out."""
        return self._writer.flush(timeout)

    def close(self) -> None:
        """Write everything queued, stop the writer thread and close the files. Idempotent."""
        atexit.unregister(self.close)
        self._writer.close()

    def __enter__(self) -> RequestLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- redaction -------------------------------------------------------------------------

    def redact(self, value: Any) -> Any:
        """A copy of `value` with secrets, sensitive keys and credential-looking text replaced."""
        return self.redactor.redact(value)

    # --- channels --------------------------------------------------------------------------

    def log_finished(self, request: dict[str, Any], performance: dict[str, Any] | None = None,
                     cost: dict[str, Any] | None = None) -> None:
        """Everything one finished request logs, as one queued item: its summary line (`request`:
        request_id, method, path, status, latency_ms, model, tokens...), and its performance line
        (request_id, total_ms, upstream_ms...) and cost line (the ledger record) when it has them."""
        self._put((time.time(), FINISHED, (request, performance, cost)))

    def log_request(self, **fields: Any) -> None:
        """One summary line (request_id, method, path, status, latency_ms, model, tokens...)."""
        self._put((time.time(), "requests", fields))

    def log_security_event(self, event: SecurityEvent, *, request_id: str, client: str, **fields: Any) -> None:
        """One audit line per finding of the security scan."""
        self._put((time.time(), "security", {**asdict(event), "request_id": request_id, "client": client, **fields}))

    def log_error(self, exc: BaseException, *, request_id: str, **fields: Any) -> None:
        """The exception, its cause/context chain and traceback, for errors a client saw as 5xx.

        The chain and traceback are formatted here, so the queue holds text, not the exception (whose
        traceback keeps every frame's locals alive); they are redacted on the writer thread."""
        data = {
            "request_id": request_id,
            "error_type": _type_name(exc),
            "message": _text_of(exc),
            "chain": [{"type": _type_name(e), "message": _text_of(e)} for e in _exception_chain(exc)],
            "traceback": "".join(traceback.format_exception(exc)),
            **fields,
        }
        self._put((time.time(), "errors", data))

    def log_performance(self, *, request_id: str, **timings: Any) -> None:
        """Where a request's time went (total_ms, upstream_ms, cache_lookup_ms...)."""
        self._put((time.time(), "performance", {"request_id": request_id, **timings}))

    def log_cost(self, **fields: Any) -> None:
        """One line per billed provider call, for the cost ledger's audit trail."""
        self._put((time.time(), "cost", fields))

    def describe_prompt(self, text: str) -> dict[str, Any]:
        """What to log about a prompt: its length and a short hash, or the text when full logging is on."""
        if self.log_full_prompts:
            return {"length": len(text), "text": text}
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        return {"length": len(text), "sha256": digest}


def _is_sensitive_key(key: Any) -> bool:
    if not isinstance(key, str):
        return False
    lowered = key.lower()
    return lowered in _SENSITIVE_KEYS or lowered.endswith(_SENSITIVE_SUFFIXES)


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc`, then what caused it (`__cause__`, else an unsuppressed `__context__`), without loops."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and id(current) not in {id(e) for e in chain}:
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


def _text_of(exc: BaseException) -> str:
    """str(exc), or a note if that raises: the line is still written."""
    try:
        return str(exc)
    except Exception:  # noqa: BLE001
        return f"<{_type_name(exc)}: str() failed>"
