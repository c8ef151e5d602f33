"""The per-request security scan: suspicious patterns in the path, query, User-Agent and JSON strings.

Why it looks like this:

- Findings in the URL are "high"; in the body they are "medium", because a code prompt may
  legitimately say `SELECT * FROM users` or `<script>`. In the default "log" mode findings are only
  logged; "block" mode refuses "high" ones; "off" means the caller does not scan.
- Patterns run on RE2 (`google-re2`), which matches in time linear in the text: Python's `re`
  backtracks, and a run of 60,000 spaces in a URL once froze a process for 38-52 s.
- Each location (path, query, User-Agent, and the body's strings together) is looked at up to
  `SCAN_MAX_CHARS` characters, so a request's scan costs at most a fixed amount whatever its size;
  a result says how many characters it looked at, and the scanner keeps running totals.
- A finding records its type, location, severity, and the match's length and a short SHA-256,
  never the matched text: that text is the client's (a prompt fragment), and logs keep prompts as
  length + hash.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, unquote_plus

import re2

SCAN_MAX_CHARS = 64 * 1024  # per location; the body's strings count together
_SEPARATOR = "\x00"  # between body strings: no pattern matches across it, so one search covers them all

# RE2's \s and \S are ASCII; these are what Python's str.isspace() calls whitespace.
_WS = r"\s\v\x1c-\x1f\x85\p{Z}"
_S = rf"[{_WS}]"
_NS = rf"[^{_WS}\x00]"  # not whitespace and not the separator
_ANY = r"[^\x00]"  # any character within one string

_SQL_COMMON = (
    rf"['\"][{_WS})]*\b(?:or|and)\b{_S}+{_NS}{{1,20}}?{_S}*={_S}*{_NS}"  # ' OR 1=1, " or ''='
    rf"|\bunion\b(?:{_S}+all)?{_S}+select\b"
    rf"|;{_S}*(?:drop|truncate|alter){_S}+(?:table|database)\b"
    rf"|;{_S}*(?:delete{_S}+from|insert{_S}+into|exec(?:ute)?{_S})"
    rf"|['\"][{_WS})]*(?:--|/\*)"  # a quote closed, then the rest of the query commented out
)
_XSS_COMMON = rf"<script\b|<iframe\b|\bon(?:error|load){_S}*="
_TRAVERSAL = r"(?:\.|%2e){2}(?:/|\\|%2f|%5c)|/etc/(?:passwd|shadow)\b|\bwin\.ini\b"
_PROMPT_PHRASES = (
    "ignore (?:all )?(?:the )?(?:previous|prior|above) instructions",
    "disregard (?:all )?(?:of )?the above",
    r"you are now (?-i:DAN)\b",
    "reveal (?:your|the) system prompt",
    "pretend (?:that )?you have no (?:restrictions|rules|limits)",
)


def _compile(pattern: str) -> re2._Regexp:
    return re2.compile(f"(?i){pattern}")


# (type, description, pattern for path/query, pattern for body). The URL of a JSON API has no
# business holding SQL at all; a body may be a prompt about SQL or HTML, so its patterns are
# narrower ("select the best one from this list" is English, `SELECT * FROM users` is not).
_CHECK_SOURCES: list[tuple[str, str, str | None, str]] = [
    ("sql_injection", "SQL injection pattern",
     _SQL_COMMON + rf"|\bselect\b{_ANY}{{1,100}}?\bfrom\b",
     _SQL_COMMON + rf"|\bselect{_S}+\*{_S}+from\b|(?-i:\bSELECT\b){_ANY}{{1,100}}?(?-i:\bFROM\b)"),
    ("xss", "script injection pattern", _XSS_COMMON + rf"|javascript{_S}*:", _XSS_COMMON + rf"|javascript:{_NS}"),
    ("path_traversal", "path traversal pattern", _TRAVERSAL, _TRAVERSAL),
    ("prompt_injection", "prompt injection phrase", None,
     "|".join(phrase.replace(" ", f"{_S}+") for phrase in _PROMPT_PHRASES)),
]
_CHECKS = [(kind, description, _compile(url) if url else None, _compile(body))
           for kind, description, url, body in _CHECK_SOURCES]
# Most requests are clean: one search with every pattern of a location rules a text out at once.
_ANY_URL_FINDING = _compile("|".join(f"(?:{url})" for _, _, url, _ in _CHECK_SOURCES if url))
_ANY_BODY_FINDING = _compile("|".join(f"(?:{body})" for _, _, _, body in _CHECK_SOURCES))
_SCANNER_UA = _compile(r"\b(?:sqlmap|nikto|nmap|masscan|zgrab|acunetix|nessus|wpscan|dirbuster|gobuster|nuclei)\b")


@dataclass(frozen=True)
class SecurityEvent:
    """One finding: what (type), how bad (low/medium/high), where (path, query, body, header:...), why.

    `detail` is in the gateway's words; the matched text itself is kept only as its length and the
    first 16 hex digits of its SHA-256 (enough to see the same fragment twice, not to read it)."""

    type: str
    severity: str
    location: str
    detail: str
    match_length: int | None = None
    match_sha256: str | None = None


@dataclass(frozen=True)
class ScanResult:
    """The findings of one scan and how many characters it looked at in each location."""

    events: list[SecurityEvent]
    scanned: dict[str, int]


def _finding(kind: str, severity: str, location: str, description: str, match: re2._Match) -> SecurityEvent:
    text = match.group(0)
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return SecurityEvent(kind, severity, location, description, len(text), digest)


def _search(pattern: re2._Regexp, text: str) -> re2._Match | None:
    try:
        return pattern.search(text)
    except UnicodeEncodeError:  # a lone surrogate: RE2 takes UTF-8 only
        return pattern.search(text.encode("utf-8", "replace").decode("utf-8"))


def _bounded_join(texts: Iterable[str], limit: int) -> str:
    """The texts joined by the separator, at most `limit` characters; stops pulling texts once full."""
    pieces: list[str] = []
    used = 0
    for text in texts:
        if not text:
            continue
        room = limit - used - (1 if pieces else 0)
        if room <= 0:
            break
        piece = text[:room]
        used += len(piece) + (1 if pieces else 0)
        pieces.append(piece)
    return _SEPARATOR.join(pieces)


class SecurityScanner:
    """Looks at one request's plain data and says what is suspicious; logging and blocking are the caller's."""

    def __init__(self, max_body_bytes: int, *, max_scan_chars: int = SCAN_MAX_CHARS) -> None:
        self.max_body_bytes = max_body_bytes
        self.max_scan_chars = max_scan_chars
        self._lock = threading.Lock()
        self._scanned: Counter[str] = Counter()

    def scan(self, *, path: str, query: str, headers: Mapping[str, str], body_texts: Iterable[str],
             body_size: int) -> ScanResult:
        """At most one event per (type, location); URL findings are high, body findings medium.

        `body_texts` may be lazy: it is read only until `max_scan_chars` characters are taken."""
        limit = self.max_scan_chars
        url = {"path": unquote((path or "")[:limit]), "query": unquote_plus((query or "")[:limit])}
        body = _bounded_join(body_texts, limit)
        user_agent = _user_agent(headers)[:limit]
        scanned = {**{where: len(text) for where, text in url.items()}, "body": len(body),
                   "header:User-Agent": len(user_agent)}

        events: list[SecurityEvent] = []
        url_hits = [(where, text) for where, text in url.items() if text and _search(_ANY_URL_FINDING, text)]
        body_hit = bool(body) and _search(_ANY_BODY_FINDING, body) is not None
        for kind, description, url_pattern, body_pattern in _CHECKS:
            for location, text in url_hits:
                if url_pattern is not None and (match := _search(url_pattern, text)):
                    events.append(_finding(kind, "high", location, description, match))
            if body_hit and (match := _search(body_pattern, body)):
                events.append(_finding(kind, "medium", "body", description, match))
        if user_agent and (match := _search(_SCANNER_UA, user_agent)):
            events.append(_finding("scanner_user_agent", "medium", "header:User-Agent", "known scanner user agent",
                                   match))
        if body_size > self.max_body_bytes:
            events.append(SecurityEvent("oversized_payload", "high", "body",
                                        f"body is {body_size} bytes, limit {self.max_body_bytes}"))
        with self._lock:
            self._scanned.update(scanned)
        return ScanResult(events, scanned)

    def scanned_chars(self) -> dict[str, int]:
        """Characters looked at so far, by location, over every scan of this scanner."""
        with self._lock:
            return dict(self._scanned)

    @staticmethod
    def should_block(events: Iterable[SecurityEvent], mode: str) -> bool:
        """Refuse the request only in "block" mode and only for a high finding ("log"/"off" never block)."""
        return mode == "block" and any(e.severity == "high" for e in events)


def _user_agent(headers: Mapping[str, str]) -> str:
    """The User-Agent header: one case-insensitive lookup on a request's headers (werkzeug's `Headers`),
    a case-insensitive walk only for a plain mapping."""
    if hasattr(headers, "getlist"):
        return headers.get("User-Agent") or ""
    return next((value for name, value in headers.items() if name.lower() == "user-agent"), "")

