"""Scorers: backends chosen from a registry by ``scorer.backend`` (and the run's modality)."""

from __future__ import annotations

from collections.abc import Callable

from mils_pipeline.config import ScorerConfig
from mils_pipeline.errors import ConfigError
from mils_pipeline.registry import SCORER_BACKENDS, load_factory
from mils_pipeline.score.base import Scorer, scorer_fingerprint
from mils_pipeline.score.cache import CachedTextEncoder, EmbeddingStore, TextEmbeddingCache

BACKENDS = SCORER_BACKENDS  # (scorer.backend, modality) -> "module:factory"; the table lives in registry.py


def build_scorer(config: ScorerConfig, modality: str) -> Scorer:
    try:
        target = BACKENDS[(config.backend, modality)]
    except KeyError:
        known = sorted(f"{b} for {m}" for b, m in BACKENDS)
        raise ConfigError(
            f"no scorer backend {config.backend!r} for modality {modality!r}; available: {known}"
        ) from None
    factory: Callable[[ScorerConfig], Scorer] = load_factory(target)
    return factory(config)


def build_text_encoder(scorer: Scorer, config: ScorerConfig) -> CachedTextEncoder:
    store = EmbeddingStore(config.cache_dir) if config.cache_dir else None
    return CachedTextEncoder(scorer, config.cache_bytes, config.text_batch_size, store)


__all__ = [
    "BACKENDS",
    "CachedTextEncoder",
    "EmbeddingStore",
    "Scorer",
    "TextEmbeddingCache",
    "build_scorer",
    "build_text_encoder",
    "scorer_fingerprint",
]
