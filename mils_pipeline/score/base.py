"""The Scorer protocol: a multimodal embedding model that rates texts against media. It declares
everything callers use, so nobody reaches into a backend's model."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mils_pipeline.backends import ModelIdentity
from mils_pipeline.score.footprint import ScorerFootprint


@runtime_checkable
class Scorer(Protocol):
    identity: ModelIdentity
    modality: str
    random_weights: bool  # no trained weights: the scores mean nothing (tests and demos)
    device: str  # where it runs, resolved: "cpu", "cuda", ...
    media_batch_size: int  # media per encoder call; the GPU memory plan may lower it
    decode_options: dict[str, Any]  # what the decoder must give this scorer (frames, audio windows)
    text_context: int  # tokens the text tower reads, special tokens included; a longer text is cut to them

    def truncated(self, texts: Sequence[str]) -> np.ndarray:
        """Bool per text: longer than ``text_context`` tokens, so it is scored on its first tokens."""
        ...

    def embed_media(self, media: Sequence[Any]) -> np.ndarray:
        """L2-normalised float32 embeddings, one row per decoded media item."""
        ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 embeddings, one row per text. Called through CachedTextEncoder."""
        ...

    def footprint(self) -> ScorerFootprint:
        """Bytes it needs on its device: weights, and activations per text and per media item."""
        ...


def scorer_fingerprint(identity: ModelIdentity) -> str:
    """A short id of a scorer's weights and parameters: names stored embeddings and cache keys."""
    canonical = json.dumps(identity.as_row(), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
