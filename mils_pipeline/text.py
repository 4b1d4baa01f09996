"""Caption text normalisation, shared by the parser, the embedding cache and seed pools."""

from __future__ import annotations

import re
import unicodedata

_SPACE = re.compile(r"\s+")
_EDGE_PUNCT = " \t\"'`“”‘’*_.,;:!-–—"


def clean_caption(text: str) -> str:
    """The display form: unicode-normalised, single-spaced, stripped of wrapping quotes and marks."""
    text = unicodedata.normalize("NFKC", text)
    text = _SPACE.sub(" ", text).strip().strip(_EDGE_PUNCT).strip()
    return text


def normalise_text(text: str) -> str:
    """The identity of a caption: two texts with the same normal form are the same candidate."""
    return clean_caption(text).casefold()


def word_count(text: str) -> int:
    return len(text.split())
