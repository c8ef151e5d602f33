"""The emulators' deterministic answers to `POST /api/v1/process` prompts (demo mode and tests).

A prompt is recognised by the bundled templates' first line, `Task: process <type>`, and the
caller's text is what lies between its `-----BEGIN TEXT <boundary>-----` and `-----END TEXT
<boundary>-----` lines (the first marker and the first block: a text holding marker lines of its
own cannot change the type). Answers have the shapes the templates ask for, so the gateway's
parsing is exercised for real: keywords a JSON array of strings, entities a JSON array of
{text, type}, sentiment a JSON object {sentiment, score}; the other types plain text.
"""

from __future__ import annotations

import json
import re
from collections import Counter

from gateway.tasks.process_templates import BEGIN_TEXT, END_TEXT, TASK_MARKER

_TASK = re.compile(rf"^[ \t]*{re.escape(TASK_MARKER)} ([a-z]+)[ \t]*$", re.MULTILINE)
_BEGIN = re.compile(rf"^{re.escape(BEGIN_TEXT)}([0-9a-f]{{16,64}})-----$", re.MULTILINE)
_LANGUAGE = re.compile(r"\binto (.{1,40}?)\.$", re.MULTILINE)
_STOPWORDS = {"this", "that", "with", "from", "have", "were", "will", "would", "could", "should", "there",
              "their", "about", "which", "what", "when", "your", "they", "them", "been", "into", "than",
              "then", "also", "just", "very", "some", "more", "most", "such", "only", "over", "need"}
_SENTENCE_WORDS = {"the", "a", "an", "we", "i", "it", "this", "that", "our", "they", "he", "she", "you",
                   "please", "summarize", "summarise", "translate", "hello", "hi", "dear", "thanks"}
_ORGANIZATION_ENDS = {"inc", "corp", "corporation", "ltd", "llc", "gmbh", "company", "group", "bank"}
_DATES = {"monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "january", "february",
          "march", "april", "may", "june", "july", "august", "september", "october", "november", "december"}
_LOCATIONS = {"paris", "london", "berlin", "tokyo", "new york", "madrid", "rome", "france", "germany",
              "spain", "italy", "japan", "china", "india", "europe", "america", "canada", "england"}
_POSITIVE_SCORE = 0.8


def process_reply(prompt: str, classify) -> str | None:
    """The answer to a process prompt, or None if `prompt` is not one. `classify(text, labels)` is the
    emulator's sentiment lexicon (passed in: it lives in the Gemini emulator)."""
    task = _TASK.search(prompt)
    if task is None:
        return None
    text = _delimited_text(prompt, task.end())
    kind = task.group(1)
    if kind == "keywords":
        return json.dumps(keywords(text))
    if kind == "entities":
        return json.dumps(entities(text))
    if kind == "sentiment":
        label = classify(text, ["positive", "negative", "neutral"])
        score = {"positive": _POSITIVE_SCORE, "negative": -_POSITIVE_SCORE}.get(label, 0.0)
        return json.dumps({"sentiment": label, "score": score})
    if kind == "summary":
        first = re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0][:200]
        return f"In short: {first}"
    if kind == "translation":
        language = _LANGUAGE.search(prompt[:task.end() + 500])
        return f"[{language.group(1) if language else 'translation'}] {text.strip()}"
    return f"Demo answer to the request: {' '.join(text.split()[:12])}"


def _delimited_text(prompt: str, after: int) -> str:
    begin = _BEGIN.search(prompt, after)
    if begin is None:
        return prompt[after:]
    end = prompt.find(f"\n{END_TEXT}{begin.group(1)}-----", begin.end())
    return prompt[begin.end() + 1:end if end >= 0 else len(prompt)]


def keywords(text: str, most: int = 5) -> list[str]:
    """The most frequent words of four letters or more (first appearance breaks ties), lower-cased."""
    words = [word for word in re.findall(r"[a-z][a-z'-]{3,}", text.lower()) if word not in _STOPWORDS]
    counts = Counter(words)
    first = {word: index for index, word in reversed(list(enumerate(words)))}
    return sorted(counts, key=lambda word: (-counts[word], first[word]))[:most]


def entities(text: str) -> list[dict[str, str]]:
    """Runs of capitalised words, typed by a few word lists; a lone capital that merely starts a sentence
    ("We", "The") is not an entity."""
    found: dict[str, dict[str, str]] = {}
    for match in re.finditer(r"\b[A-Z][A-Za-z]+(?:[ \t]+[A-Z][A-Za-z]+)*", text):
        name = match.group(0)
        words = name.lower().split()
        if len(words) == 1 and words[0] in _SENTENCE_WORDS:
            continue
        found.setdefault(name, {"text": name, "type": _entity_type(words)})
    return list(found.values())


def _entity_type(words: list[str]) -> str:
    if words[-1] in _ORGANIZATION_ENDS:
        return "organization"
    if any(word in _DATES for word in words):
        return "date"
    if " ".join(words) in _LOCATIONS:
        return "location"
    return "person" if len(words) >= 2 else "other"
