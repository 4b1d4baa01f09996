"""Seed pools: short LLM-written descriptions of a theme, scored against every item to start MILS.

A pool is a text file of one caption per line, named by its content id, with a JSON sidecar of
its provenance. Its embeddings are computed once per scorer and stored beside it (float16), so a
caption run scores the pool against an item with one chunked matrix product and never re-embeds it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from types import MappingProxyType

import numpy as np
import yaml

from mils_pipeline.config import RunConfig
from mils_pipeline.errors import SeedPoolError
from mils_pipeline.generate.base import Generator, SamplingParams
from mils_pipeline.generate.parsing import parse_candidates
from mils_pipeline.generate.prompts import PromptTemplate, max_tokens_for, seed_prompt
from mils_pipeline.io.sink import write_bytes_whole
from mils_pipeline.paths import seed_pool_dir
from mils_pipeline.score.base import Scorer, scorer_fingerprint
from mils_pipeline.text import clean_caption, normalise_text

log = logging.getLogger(__name__)

POOL_SUFFIX = ".txt"


@dataclass(frozen=True)
class Theme:
    """What a seed pool describes: the LLM is asked for captions of ``description``, shown a few of
    ``examples`` per prompt. One YAML file per theme under mils_pipeline/data/themes/."""

    name: str
    description: str
    examples: tuple[str, ...]
    modality: str = "image"  # whose caption length the pool follows


def _read_themes() -> dict[str, Theme]:
    """The bundled themes by name: the name of their file under mils_pipeline/data/themes/."""
    themes = {}
    for file in sorted(resources.files("mils_pipeline.data").joinpath("themes").iterdir(), key=lambda f: f.name):
        if not file.name.endswith(".yaml"):
            continue
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
        name = file.name.removesuffix(".yaml")
        themes[name] = Theme(
            name=name,
            description=data["description"],
            examples=tuple(data["examples"]),
            modality=data.get("modality", "image"),
        )
    return themes


# read once, at import: small files, and every caller needs them whole
THEMES: Mapping[str, Theme] = MappingProxyType(_read_themes())

BUNDLED_PACKAGE = "mils_pipeline.data.seed_pools"


@dataclass
class SeedPool:
    """A loaded pool: display texts, their normal forms, its content id and where it lives."""

    id: str
    texts: list[str]
    path: Path
    metadata: dict = field(default_factory=dict)
    bundled: bool = False

    @property
    def keys(self) -> list[str]:
        return [normalise_text(t) for t in self.texts]


def pool_id(texts: list[str]) -> str:
    return hashlib.sha256(("\n".join(texts) + "\n").encode()).hexdigest()[:16]


def write_seed_pool(texts: list[str], directory: Path, metadata: dict) -> SeedPool:
    """Store a pool as ``<id>.txt`` with ``<id>.json`` beside it; the id is the content hash."""
    unique: dict[str, str] = {}
    for text in texts:
        cleaned = clean_caption(text)
        if cleaned:
            unique.setdefault(normalise_text(cleaned), cleaned)
    lines = sorted(unique.values(), key=str.casefold)
    if not lines:
        raise SeedPoolError("refusing to write an empty seed pool")
    pid = pool_id(lines)
    path = directory / f"{pid}{POOL_SUFFIX}"
    write_bytes_whole(str(path), ("\n".join(lines) + "\n").encode())
    meta = {**metadata, "id": pid, "size": len(lines)}
    write_bytes_whole(str(directory / f"{pid}.json"), json.dumps(meta, indent=2).encode())
    return SeedPool(id=pid, texts=lines, path=path, metadata=meta)


def _read_pool(path: Path, bundled: bool = False) -> SeedPool:
    try:
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise SeedPoolError(f"cannot read seed pool {path}: {exc}") from exc
    if not texts:
        raise SeedPoolError(f"seed pool {path} is empty")
    sidecar = path.with_suffix(".json")
    metadata = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    return SeedPool(id=pool_id(texts), texts=texts, path=path, metadata=metadata, bundled=bundled)


def bundled_pools() -> list[str]:
    return sorted(
        p.name.removesuffix(POOL_SUFFIX)
        for p in resources.files(BUNDLED_PACKAGE).iterdir()
        if p.name.endswith(POOL_SUFFIX)
    )


def load_seed_pool(ref: str, directory: str | None = None) -> SeedPool:
    """Find a pool by file path, by id under the pool directory, or by bundled name."""
    as_path = Path(ref).expanduser()
    if as_path.is_file():
        return _read_pool(as_path)
    by_id = seed_pool_dir(directory) / f"{ref}{POOL_SUFFIX}"
    if by_id.is_file():
        return _read_pool(by_id)
    bundled = resources.files(BUNDLED_PACKAGE) / f"{ref}{POOL_SUFFIX}"
    if bundled.is_file():
        return _read_pool(Path(str(bundled)), bundled=True)
    of_theme = _pools_of_theme(ref, seed_pool_dir(directory))
    if len(of_theme) == 1:
        return _read_pool(of_theme[0])
    if of_theme:
        ids = ", ".join(p.stem for p in of_theme)
        raise SeedPoolError(f"several seed pools of theme {ref!r} in {seed_pool_dir(directory)} ({ids}): pick one id")
    how = f"`mils seed --theme {ref}`" if ref in THEMES else "`mils seed --theme NAME`"
    raise SeedPoolError(
        f"seed pool {ref!r} not found: not a file, not an id or a theme's pool in {seed_pool_dir(directory)}, "
        f"and not a bundled pool ({', '.join(bundled_pools())}). Make one with {how}"
    )


def _pools_of_theme(theme: str, directory: Path) -> list[Path]:
    """Pools in ``directory`` whose sidecar names ``theme`` (as `mils seed --theme` writes them)."""
    found = []
    for sidecar in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            metadata = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue
        pool = sidecar.with_suffix(POOL_SUFFIX)
        if isinstance(metadata, dict) and metadata.get("theme") == theme and pool.is_file():
            found.append(pool)
    return found


def _embeddings_path(pool: SeedPool, fingerprint: str, directory: str | None) -> Path:
    beside = pool.path.parent
    # Bundled pools live in the installed package: their embeddings go to the pool directory.
    writable = not pool.bundled and os.access(beside, os.W_OK)
    target = beside if writable else seed_pool_dir(directory)
    return target / f"{pool.id}.{fingerprint}.npy"


def pool_embeddings(
    pool: SeedPool,
    scorer: Scorer,
    batch_size: int,
    directory: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """The pool's text embeddings for this scorer (float16, normalised), computed once and stored."""
    path = _embeddings_path(pool, scorer_fingerprint(scorer.identity), directory)
    if path.is_file():
        stored = np.load(path, mmap_mode="r")
        if stored.shape[0] == len(pool.texts):
            return np.asarray(stored)
        log.warning("stored embeddings %s do not match the pool size; recomputing", path)
    keys = pool.keys
    chunks = []
    for start in range(0, len(keys), batch_size):
        chunks.append(scorer.embed_texts(keys[start : start + batch_size]).astype(np.float16))
        if progress is not None:
            progress(len(chunks[-1]))
    embeddings = np.concatenate(chunks)
    buffer = io.BytesIO()
    np.save(buffer, embeddings)
    write_bytes_whole(str(path), buffer.getvalue())
    return embeddings


def top_k_seeds(
    pool_embeddings: np.ndarray, media: np.ndarray, k: int, chunk_rows: int = 16384
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` pool rows per media row: (indices, scores), each (n_media, k), best first.

    The pool is scanned in chunks, so memory stays at one chunk × n_media scores.
    """
    n = media.shape[0]
    k = min(k, pool_embeddings.shape[0])
    best_idx = np.zeros((n, 0), dtype=np.int64)
    best_score = np.zeros((n, 0), dtype=np.float32)
    media32 = media.astype(np.float32)
    for start in range(0, pool_embeddings.shape[0], chunk_rows):
        block = np.asarray(pool_embeddings[start : start + chunk_rows], dtype=np.float32)
        scores = media32 @ block.T  # (n, rows)
        idx = np.broadcast_to(np.arange(start, start + block.shape[0]), scores.shape)
        all_scores = np.concatenate([best_score, scores], axis=1)
        all_idx = np.concatenate([best_idx, idx], axis=1)
        keep = np.argpartition(-all_scores, k - 1, axis=1)[:, :k] if all_scores.shape[1] > k else None
        if keep is not None:
            all_scores = np.take_along_axis(all_scores, keep, axis=1)
            all_idx = np.take_along_axis(all_idx, keep, axis=1)
        best_score, best_idx = all_scores, all_idx
    # best first; ties broken by pool order so the result is deterministic
    order = np.lexsort((best_idx, -best_score), axis=1)
    return np.take_along_axis(best_idx, order, axis=1), np.take_along_axis(best_score, order, axis=1)


def generate_seed_texts(
    generator: Generator,
    theme: Theme,
    target_size: int,
    max_words: int,
    seed: int = 0,
    prompts_per_call: int = 8,
    temperature: float = 1.0,
    top_p: float = 0.95,
    style: str = "completion",
    max_stalled_calls: int = 5,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Ask the generator for theme captions until ``target_size`` distinct ones exist.

    Each prompt shows a different random handful of the theme's examples, at high temperature, so
    the pool spreads out. Stops early, with a warning, when several calls in a row add nothing.
    """
    rng = random.Random(seed)
    template = PromptTemplate(style=style)
    known = {normalise_text(e) for e in theme.examples}
    texts: list[str] = []
    stalled = 0
    call = 0
    params = SamplingParams(
        temperature=temperature, top_p=top_p, max_tokens=max_tokens_for(20, max_words), stop=("\n\n",)
    )
    while len(texts) < target_size and stalled < max_stalled_calls:
        prompts = [
            seed_prompt(template, theme.description, rng.sample(theme.examples, 6), max_words)
            for _ in range(prompts_per_call)
        ]
        seeds = [seed * 1_000_003 + call * prompts_per_call + i for i in range(prompts_per_call)]
        call += 1
        added = 0
        for completion in generator.generate(prompts, params, seeds):
            parsed = parse_candidates(
                completion.text, max_words=max_words, exclude=known, cut_off=completion.finish_reason == "length"
            )
            for text in parsed.candidates:
                known.add(normalise_text(text))
                texts.append(text)
                added += 1
        stalled = 0 if added else stalled + 1
        if progress is not None:
            progress(added)
    if len(texts) < target_size:
        log.warning(
            "seed pool stopped at %d of %d texts: the generator stopped adding new ones", len(texts), target_size
        )
    return texts[:target_size]


def seed_pool_metadata(
    theme: Theme, generator: Generator, seed: int, max_words: int, sampling: dict[str, object]
) -> dict:
    """Provenance of a pool: the generator, and the sampling it was asked for (which differs from
    the generator's caption-run settings)."""
    return {
        "theme": theme.name,
        "generator": generator.identity.as_row(),
        "sampling": sampling,
        "seed": seed,
        "max_words": max_words,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def build_seed_pool(
    config: RunConfig,
    theme_name: str,
    size: int,
    directory: str | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 0.95,
    progress: Callable[[int], None] | None = None,
) -> SeedPool:
    """Generate a pool for a theme with the run's generator and store it under its content id
    (in ``directory``, else ``seed_pool.dir``, else $MILS_HOME/seed_pools)."""
    from mils_pipeline.generate import build_generator

    theme = THEMES.get(theme_name)
    if theme is None:
        raise SeedPoolError(f"unknown theme {theme_name!r}; choose one of {sorted(THEMES)}")
    if config.modality != theme.modality:
        raise SeedPoolError(
            f"theme {theme_name!r} is for modality {theme.modality} (its caption length); "
            f"the configuration says modality {config.modality}: set modality={theme.modality}"
        )
    generator = build_generator(config.generator)
    try:
        texts = generate_seed_texts(
            generator,
            theme,
            target_size=size,
            max_words=config.optimize.max_caption_words,
            seed=seed,
            temperature=temperature,
            top_p=top_p,
            style=config.generator.prompt_style,
            progress=progress,
        )
    finally:
        generator.close()
    sampling = {"temperature": temperature, "top_p": top_p, "prompt_style": config.generator.prompt_style}
    metadata = seed_pool_metadata(theme, generator, seed, config.optimize.max_caption_words, sampling)
    return write_seed_pool(texts, seed_pool_dir(directory or config.seed_pool.dir), metadata)
