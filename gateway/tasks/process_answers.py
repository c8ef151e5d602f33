"""Reading a model's answer to a `process` request into the type's result, or `UpstreamBadAnswer` (502).

Models answer structured questions the way people do: the JSON inside a ```json fence, after
"Sure! Here are the keywords:", or wrapped in an object ({"keywords": [...]}). All of that is
accepted. What is not: an answer with no JSON of the asked shape, items of the wrong type, or
more items than any sensible answer has. The answer is the provider's (and the caller's text can
steer it), so the work is bounded: answers over MAX_ANSWER_CHARS are refused before any parsing,
at most MAX_JSON_STARTS places are tried as the start of the JSON, nesting too deep for the
parser is a bad answer (RecursionError), and lists over MAX_ITEMS are refused, not walked.

The structured results are kept as canonical JSON text (what the cache stores); `result_of`
turns that back into the answer's `result`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from gateway.errors import UpstreamBadAnswer
from gateway.tasks.prompts import fenced_block, match_category

MAX_ANSWER_CHARS = 100_000  # far above 100 keywords or entities; a bigger answer is refused, not parsed
MAX_JSON_STARTS = 8  # "[" or "{" positions tried as the start of the JSON (prose may hold brackets)
MAX_ITEMS = 100  # keywords or entities in one answer
MAX_ITEM_CHARS = 200  # one keyword or entity text
MAX_ENTITY_TYPE_CHARS = 40
SENTIMENTS = ("positive", "negative", "neutral", "mixed")
STRUCTURED = frozenset({"keywords", "entities", "sentiment"})
_DECODER = json.JSONDecoder()


def parse_answer(kind: str, answer: str) -> str:
    """The result of a `kind` answer as the cache keeps it: the text itself, or canonical JSON."""
    if kind not in STRUCTURED:
        if not answer.strip():
            raise UpstreamBadAnswer(f"the model returned an empty {kind}")
        return answer.strip()
    if len(answer) > MAX_ANSWER_CHARS:
        raise UpstreamBadAnswer(f"the model's {kind} answer is too long to parse",
                                details={"answer_chars": len(answer), "max_chars": MAX_ANSWER_CHARS})
    result = {"keywords": _keywords, "entities": _entities, "sentiment": _sentiment}[kind](answer)
    return json.dumps(result, ensure_ascii=False, separators=(",", ":"))


def result_of(kind: str, stored: str) -> Any:
    """The answer's `result` from what `parse_answer` produced (our own JSON for the structured types)."""
    return json.loads(stored) if kind in STRUCTURED else stored


def _keywords(answer: str) -> list[str]:
    items = _json_list(answer, "keywords")
    keywords: dict[str, str] = {}  # case-folded -> as written: duplicates once, first spelling kept
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise _bad("keywords", answer, "every keyword must be a non-empty string")
        keyword = " ".join(item.split())
        if len(keyword) > MAX_ITEM_CHARS:
            raise _bad("keywords", answer, f"a keyword is longer than {MAX_ITEM_CHARS} characters")
        keywords.setdefault(keyword.casefold(), keyword)
    return list(keywords.values())


def _entities(answer: str) -> list[dict[str, str]]:
    items = _json_list(answer, "entities")
    entities: dict[tuple[str, str], dict[str, str]] = {}
    for item in items:
        text = item.get("text") if isinstance(item, dict) else None
        kind = item.get("type") if isinstance(item, dict) else None
        if not (isinstance(text, str) and text.strip() and isinstance(kind, str) and kind.strip()):
            raise _bad("entities", answer, "every entity must be an object with a non-empty 'text' and 'type'")
        text, kind = " ".join(text.split()), " ".join(kind.split()).lower()
        if len(text) > MAX_ITEM_CHARS or len(kind) > MAX_ENTITY_TYPE_CHARS:
            raise _bad("entities", answer, f"an entity's text is over {MAX_ITEM_CHARS} characters or its type "
                                           f"over {MAX_ENTITY_TYPE_CHARS}")
        entities.setdefault((text.casefold(), kind), {"text": text, "type": kind})
    return list(entities.values())


def _sentiment(answer: str) -> dict[str, Any]:
    """{"sentiment": label, "score": number in [-1, 1] or None}: from a JSON object, a JSON string, or an
    answer in words that names exactly one label ("The sentiment is positive.")."""
    value = _first_json(answer, lambda found: isinstance(found, str) or (
        isinstance(found, dict) and ("sentiment" in found or "label" in found)))
    if isinstance(value, dict):
        label, score = value.get("sentiment", value.get("label")), value.get("score")
    else:
        label, score = answer if value is None else value, None
    if not isinstance(label, str):
        raise _bad("sentiment", answer, f"no sentiment label ({', '.join(SENTIMENTS)})")
    try:
        label = match_category(label, list(SENTIMENTS))
    except UpstreamBadAnswer:
        raise _bad("sentiment", answer, f"the sentiment is not one of {', '.join(SENTIMENTS)}") from None
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                              or not math.isfinite(score) or not -1 <= score <= 1):
        raise _bad("sentiment", answer, "the score must be a number from -1 to 1")
    return {"sentiment": label, "score": None if score is None else float(score)}


def _json_list(answer: str, kind: str) -> list:
    """The JSON list of the answer: a bare list, or an object's `kind` list ({"keywords": [...]})."""
    def usable(found) -> bool:
        return isinstance(found, list) or (isinstance(found, dict) and isinstance(found.get(kind), list))

    found = _first_json(answer, usable)
    if found is None:
        raise _bad(kind, answer, "no JSON list in the answer")
    items = found if isinstance(found, list) else found[kind]
    if len(items) > MAX_ITEMS:
        raise _bad(kind, answer, f"more than {MAX_ITEMS} items ({len(items)})")
    return items


def _first_json(answer: str, usable) -> Any:
    """The first JSON value that `usable` accepts: in the first fenced block, else at one of the first
    MAX_JSON_STARTS brackets of the answer (text after the value is ignored); None without one."""
    fenced = fenced_block(answer)
    for text in ([fenced] if fenced is not None else []) + [answer]:
        start = -1
        for _ in range(MAX_JSON_STARTS):
            start = _next_start(text, start + 1)
            if start < 0:
                break
            try:
                value, _end = _DECODER.raw_decode(text, start)
            except (ValueError, RecursionError):  # not JSON here, a number over 4300 digits, nesting too deep
                continue
            if usable(value):
                return value
        stripped = text.strip()
        if stripped.startswith('"'):  # a bare JSON string: "positive"
            try:
                value = json.loads(stripped)
            except ValueError:
                continue
            if usable(value):
                return value
    return None


def _next_start(text: str, at: int) -> int:
    positions = [position for position in (text.find("[", at), text.find("{", at)) if position >= 0]
    return min(positions, default=-1)


def _bad(kind: str, answer: str, reason: str) -> UpstreamBadAnswer:
    return UpstreamBadAnswer(f"the model's {kind} answer cannot be used: {reason}",
                             details={"type": kind, "reason": reason, "answer": answer[:200]})
