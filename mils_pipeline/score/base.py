"""The Scorer protocol: a multimodal embedding model that rates texts against media."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mils_pipeline.generate.base import ModelIdentity


@runtime_checkable
class Scorer(Protocol):
    identity: ModelIdentity
    modality: str
    random_weights: bool

    def embed_media(self, media: Sequence[Any]) -> np.ndarray:
        """L2-normalised float32 embeddings, one row per decoded media item."""
        ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 embeddings, one row per text. Called through CachedTextEncoder."""
        ...


def scorer_fingerprint(identity: ModelIdentity) -> str:
    """A short id of a scorer's weights and parameters: names stored embeddings and cache keys."""
    canonical = json.dumps(identity.as_row(), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
