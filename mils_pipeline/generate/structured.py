"""Structured output: the shape of a refine reply as a JSON schema or a regex, for backends that
constrain decoding (vLLM ``structured_outputs``, an OpenAI-compatible ``response_format``).

Both shapes are read by the ordinary parser (``parse_candidates`` takes JSON lists and plain
lines), which stays the fallback for anything a server returns.
"""

from __future__ import annotations

from typing import Any

from mils_pipeline.generate.base import CandidateList

# Caption words: bounded runs of letters (digits after the first word), inner apostrophes and
# hyphens, an optional trailing comma. Nothing that needs escaping in JSON, no list numbering, no
# scores: small models otherwise fill a constrained reply with numbers.
_FIRST_WORD = "[A-Za-z][A-Za-z'-]{0,24},?"
_WORD = "[A-Za-z0-9][A-Za-z0-9'-]{0,24},?"


def caption_pattern(max_words: int) -> str:
    """One caption of 1..max_words words separated by single spaces."""
    return f"{_FIRST_WORD}( {_WORD}){{0,{max_words - 1}}}"


def caption_list_schema(shape: CandidateList) -> dict[str, Any]:
    """JSON schema of ``{"captions": [...]}`` with exactly N short captions."""
    return {
        "type": "object",
        "properties": {
            "captions": {
                "type": "array",
                "items": {"type": "string", "pattern": f"^{caption_pattern(shape.max_words)}$"},
                "minItems": shape.n,
                "maxItems": shape.n,
            }
        },
        "required": ["captions"],
        "additionalProperties": False,
    }


def caption_list_regex(shape: CandidateList) -> str:
    """N lines of one caption each (an optional leading space continues a "1." the prompt ends with)."""
    return f"( ?{caption_pattern(shape.max_words)}\n){{{shape.n}}}"


def json_max_tokens(max_tokens: int, shape: CandidateList) -> int:
    """Completion cap of a JSON reply: the list's cap plus the quotes, commas and braces, and the
    whitespace a server's grammar may let the model put between them."""
    return max_tokens + 4 * shape.n + 16
