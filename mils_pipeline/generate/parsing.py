"""Turn an LLM reply into clean, de-duplicated caption candidates.

Small models wrap answers in preambles, number them, bullet them, quote them, prefix them with
the scores they were shown, return JSON, repeat themselves and ramble. The parser accepts all of
that and counts what it throws away, so a reply with nothing usable is a statistic, not a crash.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

from mils_pipeline.text import clean_caption, normalise_text, word_count

_LIST_MARKER = re.compile(
    r"""^\s*(?:
        (?:\d{1,3}|[a-zA-Z])[.)\]:]\s+      # 1. 2) a. (single letter only with a delimiter)
      | \(\d{1,3}\)\s*                      # (3)
      | [-*•·▪●◦‣+]\s+                      # bullets
      | \#{1,6}\s+                          # markdown headings
    )""",
    re.VERBOSE,
)
_SCORE_PREFIX = re.compile(r"^\s*[\[(]?(?:score\s*[:=]?\s*)?-?\d*\.\d+[\])]?\s*[:|\-–]\s*", re.IGNORECASE)
_TRAILING_SCORE = re.compile(r"\s*[\[(]\s*(?:score\s*[:=]?\s*)?-?\d*\.\d+\s*[\])]\s*$", re.IGNORECASE)
_LABEL_PREFIX = re.compile(r"^\s*(?:new\s+)?(?:caption|description|candidate)\s*\d*\s*[:\-–]\s*", re.IGNORECASE)
_PREAMBLE = re.compile(
    r"^(?:sure|okay|ok|certainly|of course|here (?:are|is)|below (?:are|is)|i (?:have|will|would|can)"
    r"|these (?:are|captions)|note:|new captions|improved captions|captions:)",
    re.IGNORECASE,
)
_LETTER = re.compile(r"[^\W\d_]", re.UNICODE)
_SENTENCE_END = re.compile(r"(?<=[a-z0-9])[.!?](?:\s|$)", re.IGNORECASE)


@dataclass
class ParseResult:
    """Candidates from one reply, in reply order, plus counts of what was rejected and why."""

    candidates: list[str] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    # per candidate, the characters of the reply line it came from (with its newline); with
    # ``reply_chars``, what share of a reply went into each candidate
    line_chars: list[int] = field(default_factory=list)
    reply_chars: int = 0

    def useful_share(self, first: int) -> float:
        """Share of the reply's characters in the lines of its first ``first`` candidates: an
        estimate of the share of its completion tokens that bought a new candidate."""
        return min(1.0, sum(self.line_chars[:first]) / self.reply_chars) if self.reply_chars else 0.0

    @property
    def empty(self) -> bool:
        return not self.candidates


def _json_lines(reply: str) -> list[str] | None:
    start, end = reply.find("["), reply.rfind("]")
    if start < 0 or end <= start:
        return None
    try:
        data = json.loads(reply[start : end + 1])
    except json.JSONDecodeError:
        return None
    if not isinstance(data, list):
        return None
    out = []
    for entry in data:
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict):
            text = entry.get("caption") or entry.get("text")
            if isinstance(text, str):
                out.append(text)
    return out or None  # "[0.31]" after a caption is no JSON list of captions


def _strip_markup(line: str) -> str:
    for _ in range(3):  # markers nest: "1. - Caption: 0.31: a dog"
        before = line
        line = _LIST_MARKER.sub("", line, count=1)
        line = _SCORE_PREFIX.sub("", line, count=1)
        line = _LABEL_PREFIX.sub("", line, count=1)
        if line == before:
            break
    return _TRAILING_SCORE.sub("", line)


def _first_sentence(text: str) -> str:
    match = _SENTENCE_END.search(text)
    return text[: match.start()] if match else text


def parse_candidates(reply: str, max_words: int, exclude: set[str] | None = None, cut_off: bool = False) -> ParseResult:
    """Extract caption candidates from one reply.

    ``exclude`` holds normal forms that are already known (the prompt's own candidates, earlier
    rounds); those are counted as ``repeat`` and left out. ``cut_off`` says the reply hit its token
    cap: its last line is unfinished and is dropped (counted as ``cut_off``).
    """
    result = ParseResult(reply_chars=len(reply))
    seen = set(exclude or ())
    lines = _json_lines(reply)
    if lines is None:
        lines = reply.splitlines()
        if cut_off and lines:
            lines.pop()
            result.rejected["cut_off"] += 1
    for raw in lines:
        text, reason = parse_line(raw, max_words)
        if text is None:
            if reason:
                result.rejected[reason] += 1
            continue
        key = normalise_text(text)
        if key in seen:
            result.rejected["repeat"] += 1
            continue
        seen.add(key)
        result.candidates.append(text)
        result.line_chars.append(len(raw) + 1)
    return result


def parse_line(raw: str, max_words: int) -> tuple[str | None, str]:
    """One reply line: ``(caption, "")``, or ``(None, reason)`` for a line that holds none
    (``reason`` is empty for a blank line). ``parse_candidates`` runs every line through this, and
    so does the llama.cpp decoder's list guard while a reply streams."""
    if not raw.strip():
        return None, ""
    line = _strip_markup(raw)
    if _PREAMBLE.match(line.strip()) or raw.rstrip().endswith(":"):
        return None, "preamble"
    text = clean_caption(line)
    if word_count(text) > max_words:
        text = clean_caption(_first_sentence(text))
    if not text or len(_LETTER.findall(text)) < 2 or line.rstrip().endswith("?"):
        return None, "junk"  # no words, or a question to the user instead of a caption
    if word_count(text) > max_words:
        return None, "too_long"
    return text, ""
