"""The score a caption gets: one scorer's cosine similarity, or a weighted combination of several
scorers of different parts of a sample (a video clip's frames and its sound track).

combined = sum(weight_i * score_i) / sum(weight_i), over the components whose media the sample
has (a silent clip is scored by the video component alone). With one component the combined
score is that component's score, unchanged.

Each component has its own text-embedding cache and its own stored seed-pool embeddings. Scoring
the seed pool stays one chunked matrix product per item: the components' pool embeddings are laid
side by side, and an item's query is its media embeddings side by side, each scaled by its
normalised weight (zeros for a missing part), so one dot product gives the combined score.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mils_pipeline.score.cache import CachedTextEncoder


def _same(media: Any) -> Any:
    return media


def sound_track(clip: Any) -> Any:
    """A decoded video clip's audio (None when the clip is silent)."""
    return clip.audio


# media part of an extra scorer -> how to get it from the item's decoded media
MEDIA_PARTS: dict[str, Callable[[Any], Any]] = {"audio": sound_track}


@dataclass
class Component:
    """One scorer in the objective. ``media_of`` takes the item's decoded media to the part this
    scorer rates (None: the sample lacks it)."""

    name: str
    weight: float
    encoder: CachedTextEncoder
    pool_embeddings: np.ndarray
    media_of: Callable[[Any], Any] = _same

    @property
    def scorer(self) -> Any:
        return self.encoder.scorer


@dataclass
class ItemMedia:
    """An item's media embedding per component (None where the sample lacks that part)."""

    embeddings: list[np.ndarray | None]


class Objective:
    def __init__(self, components: Sequence[Component]) -> None:
        if not components:
            raise ValueError("an objective needs at least one scorer")
        self.components = list(components)
        self.names = [c.name for c in self.components]
        if len(self.components) == 1:
            self.pool_embeddings = self.components[0].pool_embeddings
        else:
            self.pool_embeddings = np.concatenate([c.pool_embeddings for c in self.components], axis=1)

    def embed_media(self, media: Sequence[Any]) -> list[ItemMedia]:
        """Embed every item's parts: one encoder call per component for the whole batch."""
        per_item: list[list[np.ndarray | None]] = [[] for _ in media]
        for component in self.components:
            parts = [component.media_of(m) for m in media]
            present = [i for i, part in enumerate(parts) if part is not None]
            rows = component.scorer.embed_media([parts[i] for i in present]) if present else None
            placed: dict[int, np.ndarray] = {i: rows[n] for n, i in enumerate(present)} if rows is not None else {}
            for i in range(len(media)):
                per_item[i].append(placed.get(i))
        return [ItemMedia(embeddings) for embeddings in per_item]

    def _weights(self, item: ItemMedia) -> list[float]:
        present = [c.weight if e is not None else 0.0 for c, e in zip(self.components, item.embeddings, strict=True)]
        total = sum(present)
        return [w / total for w in present]

    def query(self, item: ItemMedia) -> np.ndarray:
        """The item's side of the combined dot product with the side-by-side pool embeddings."""
        if len(self.components) == 1:
            return item.embeddings[0]
        parts = []
        for component, embedding, weight in zip(self.components, item.embeddings, self._weights(item), strict=True):
            width = component.pool_embeddings.shape[1]
            parts.append(embedding * weight if embedding is not None else np.zeros(width, dtype=np.float32))
        return np.concatenate(parts).astype(np.float32)

    def pool_components(self, indices: np.ndarray, item: ItemMedia) -> np.ndarray:
        """Per-component scores of the given pool rows against the item: (len(indices), components);
        NaN where the item lacks a component's media."""
        out = np.full((len(indices), len(self.components)), np.nan, dtype=np.float32)
        for j, (component, embedding) in enumerate(zip(self.components, item.embeddings, strict=True)):
            if embedding is not None:
                rows = np.asarray(component.pool_embeddings[indices], dtype=np.float32)
                out[:, j] = rows @ embedding
        return out

    def encode_with_origin(self, texts: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """Like ``encode``, plus the mask of texts the main scorer encoded in this call (per-item
        cost counts the main scorer's encodes)."""
        main, fresh = self.components[0].encoder.encode_with_origin(texts)
        return [main] + [component.encoder.encode(texts) for component in self.components[1:]], fresh

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Text embeddings per component (each through its own cache): one call per component."""
        return [component.encoder.encode(texts) for component in self.components]

    def truncated(self, texts: Sequence[str]) -> np.ndarray:
        """Bool per text: some scorer read only its first tokens (the text is longer than its context)."""
        cut = np.zeros(len(texts), dtype=bool)
        for component in self.components:
            if texts:
                cut |= component.scorer.truncated(texts)
        return cut

    def score(self, embeddings: list[np.ndarray], rows: slice, item: ItemMedia) -> tuple[np.ndarray, np.ndarray]:
        """(combined scores, per-component scores) of the texts at ``rows`` of ``embeddings``."""
        weights = self._weights(item)
        n = rows.stop - rows.start
        components = np.full((n, len(self.components)), np.nan, dtype=np.float32)
        combined = np.zeros(n, dtype=np.float32)
        for j, (embedding, weight) in enumerate(zip(item.embeddings, weights, strict=True)):
            if embedding is not None:
                components[:, j] = embeddings[j][rows] @ embedding
                combined += weight * components[:, j]
        return combined, components

    def release(self, texts: Iterable[str]) -> None:
        texts = list(texts)
        for component in self.components:
            component.encoder.release(texts)
