"""How each task talks to the model, and how its answer is turned into the task's result.

Prompt building and answer parsing live together here so the contract of each task is in one
place: a code answer is the code without markdown fences, a classification is always exactly
one of the caller's categories (or an `UpstreamBadAnswer`, never a label outside the list).
The marker lines (`Task:`, `Language:`, `Categories (JSON array):`, `Text:`) are also what
the Gemini emulator recognises, so demo mode and tests give answers that fit each task.

Categories are caller text, so they go into the prompt as one JSON array on one line: a
category holding ` | `, quotes, a newline or a Unicode line separator stays one string inside
the array (escaped by JSON) and cannot add a category, a line or an instruction. Refusing such
categories instead would turn away honest labels like "billing | refunds".
"""

from __future__ import annotations

import json
import re

from gateway.errors import UpstreamBadAnswer

CODE_MARKER = "Task: generate code"
LANGUAGE_PREFIX = "Language:"
REQUEST_PREFIX = "Request:"
CATEGORIES_PREFIX = "Categories (JSON array):"
TEXT_PREFIX = "Text:"

FENCE = "```"
_EDGE_NOISE = "\"'`*.,;:!?()[]{}<> \t\r\n"
# Line breaks that JSON leaves unescaped with ensure_ascii=False (it escapes U+0000-U+001F itself).
_RAW_LINE_BREAKS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def text_prompt(prompt: str) -> str:
    return prompt


def code_prompt(prompt: str, language: str) -> str:
    return (
        f"{CODE_MARKER}\n"
        f"{LANGUAGE_PREFIX} {language}\n"
        "Answer with one complete, runnable code block and nothing else. "
        "Include docstrings or comments where they help.\n"
        f"{REQUEST_PREFIX} {prompt}"
    )


def categories_line(categories: list[str]) -> str:
    """The categories as one JSON array on one line, whatever characters they hold."""
    return json.dumps(list(categories), ensure_ascii=False).translate(_RAW_LINE_BREAKS)


def classification_prompt(text: str, categories: list[str]) -> str:
    return (
        "Task: classify the text into exactly one of the categories.\n"
        f"{CATEGORIES_PREFIX} {categories_line(categories)}\n"
        "Answer with one category only, exactly as written in that array, without quotes.\n"
        f"{TEXT_PREFIX} {text}"
    )


def extract_code(answer: str) -> str:
    """The code inside the first fenced block, or the whole answer if it has no fence."""
    fenced = fenced_block(answer)
    code = answer if fenced is None else fenced
    code = code.strip("\n").rstrip()
    if not code.strip():
        raise UpstreamBadAnswer("the model returned no code")
    return code


def fenced_block(answer: str) -> str | None:
    """The body of the first fenced block: from the line after the first fence (if a line
    follows) to the next line that starts with a fence, or to the end; None without one.

    Plain scanning, each character looked at no more than twice: the answer is the provider's
    (and the prompt can steer it), and the regex this replaces backtracked quadratically on an
    unclosed fence followed by a long line ("```" + "a" * 150000 took seconds)."""
    opening = answer.find(FENCE)
    if opening < 0:
        return None
    header_end = answer.find("\n", opening + len(FENCE))  # the rest of the fence line: a language tag
    if header_end < 0:
        return None
    start = header_end + 1
    newline = answer.find("\n", start)
    while newline >= 0:
        after = newline + 1
        while after < len(answer) and answer[after] in " \t":
            after += 1
        if answer[after:after + len(FENCE)] == FENCE:
            return answer[start:newline]
        newline = answer.find("\n", after)
    return answer[start:]


def normalise_label(label: str) -> str:
    return " ".join(label.split()).casefold()


def match_category(answer: str, categories: list[str]) -> str:
    """Map the model's answer onto exactly one of `categories`, as the caller wrote it.

    Exact match first (case and whitespace aside), so a category that starts or ends with
    punctuation, such as "(draft)", is not trimmed into another one; then after trimming quotes and
    punctuation; then an answer that names exactly one category as a whole word ("The sentiment is
    positive."). Anything else is an error: returning a label the caller did not offer would be
    silently wrong.
    """
    by_normal_form = {normalise_label(category): category for category in categories}
    exact = normalise_label(answer)
    if exact in by_normal_form:
        return by_normal_form[exact]
    cleaned = normalise_label(answer.strip(_EDGE_NOISE))
    if cleaned in by_normal_form:
        return by_normal_form[cleaned]
    spoken = normalise_label(answer)
    named = [
        original for normal, original in by_normal_form.items()
        if re.search(rf"(?<!\w){re.escape(normal)}(?!\w)", spoken)
    ]
    if len(named) == 1:
        return named[0]
    raise UpstreamBadAnswer(
        "the model's answer is not one of the given categories",
        details={"answer": answer[:200], "categories": categories},
    )
