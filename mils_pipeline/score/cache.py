"""Text embeddings computed once: a byte-bounded LRU in memory, an optional store on disk, and the
seed pool's embeddings pinned for good.

At corpus scale the candidates alone run to terabytes of embeddings, so the memory cache is
bounded in bytes (least recently used out), and an item's own candidates are demoted to the
eviction end when the item finishes: they stay available to later items only while there is room.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mils_pipeline.errors import OutputError
from mils_pipeline.score.base import Scorer, scorer_fingerprint
from mils_pipeline.text import normalise_text

_ENTRY_OVERHEAD = 160  # dict slot, key string and array header, measured roughly


class TextEmbeddingCache:
    """Byte-bounded LRU of normalised text -> embedding, for one scorer."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _cost(key: str, vector: np.ndarray) -> int:
        return vector.nbytes + len(key) + _ENTRY_OVERHEAD

    def get(self, key: str) -> np.ndarray | None:
        vector = self._entries.get(key)
        if vector is not None:
            self._entries.move_to_end(key)
        return vector

    def put(self, key: str, vector: np.ndarray) -> None:
        cost = self._cost(key, vector)
        if cost > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= self._cost(key, old)
        self._entries[key] = vector
        self.bytes += cost
        while self.bytes > self.max_bytes:
            evicted_key, evicted = self._entries.popitem(last=False)
            self.bytes -= self._cost(evicted_key, evicted)
            self.evictions += 1

    def demote(self, keys: Iterable[str]) -> None:
        """Move entries to the eviction end: they go first when room is needed."""
        for key in keys:
            if key in self._entries:
                self._entries.move_to_end(key, last=False)


class EmbeddingStore:
    """On-disk text embeddings shared by runs (SQLite: one file, safe for concurrent readers)."""

    def __init__(self, directory: str | Path) -> None:
        path = Path(directory).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path / "text_embeddings.sqlite", check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS embedding ("
                " scorer TEXT NOT NULL, text TEXT NOT NULL, dim INTEGER NOT NULL, vector BLOB NOT NULL,"
                " PRIMARY KEY (scorer, text))"
            )
        except (OSError, sqlite3.Error) as exc:
            raise OutputError(f"scorer.cache_dir {path} cannot hold the embedding store: {exc}") from exc
        self._lock = threading.Lock()

    def get_many(self, scorer: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT text, vector FROM embedding WHERE scorer=? AND text IN ({marks})", [scorer, *chunk]
                )
                for text, blob in rows:
                    found[text] = np.frombuffer(blob, dtype=np.float32).copy()
        return found

    def put_many(self, scorer: str, items: dict[str, np.ndarray]) -> None:
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR IGNORE INTO embedding VALUES (?, ?, ?, ?)",
                [(scorer, k, v.shape[0], v.astype(np.float32).tobytes()) for k, v in items.items()],
            )

    def close(self) -> None:
        self._db.close()


@dataclass
class EncoderStats:
    requested: int = 0
    encoded: int = 0
    encoder_calls: int = 0
    memory_hits: int = 0
    pinned_hits: int = 0
    store_hits: int = 0


class CachedTextEncoder:
    """The only way texts reach a scorer's text tower: each normalised text is encoded at most once
    while it stays cached (pinned seed pool, memory LRU, then the on-disk store)."""

    def __init__(self, scorer: Scorer, max_bytes: int, batch_size: int, store: EmbeddingStore | None = None) -> None:
        self.scorer = scorer
        self.scorer_id = scorer_fingerprint(scorer.identity)
        self.cache = TextEmbeddingCache(max_bytes)
        self.batch_size = batch_size
        self.store = store
        self.stats = EncoderStats()
        self._pinned_index: dict[str, int] = {}
        self._pinned: np.ndarray | None = None

    def pin(self, keys: Sequence[str], embeddings: np.ndarray) -> None:
        """Serve these normalised texts from ``embeddings`` (the seed pool) for the whole run."""
        self._pinned = embeddings
        self._pinned_index = {key: i for i, key in enumerate(keys)}

    def _lookup(self, key: str) -> np.ndarray | None:
        index = self._pinned_index.get(key)
        if index is not None and self._pinned is not None:
            self.stats.pinned_hits += 1
            return np.asarray(self._pinned[index], dtype=np.float32)
        vector = self.cache.get(key)
        if vector is not None:
            self.stats.memory_hits += 1
        return vector

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings for ``texts`` in order (float32, normalised)."""
        return self.encode_with_origin(texts)[0]

    def encode_with_origin(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings for ``texts`` in order, and a mask of the texts that reached the scorer in
        this call (the first occurrence of each freshly encoded text); the others came from the
        pinned seed pool, the memory cache or the store. Per-item cost accounting reads the mask."""
        self.stats.requested += len(texts)
        keys = [normalise_text(t) for t in texts]
        resolved: dict[str, np.ndarray] = {}
        missing: dict[str, str] = {}  # key -> first original text
        for key, text in zip(keys, texts, strict=True):
            if key in resolved or key in missing:
                continue
            vector = self._lookup(key)
            if vector is None:
                missing[key] = text
            else:
                resolved[key] = vector
        if missing and self.store is not None:
            stored = self.store.get_many(self.scorer_id, list(missing))
            self.stats.store_hits += len(stored)
            for key, vector in stored.items():
                resolved[key] = vector
                self.cache.put(key, vector)
                del missing[key]
        fresh: dict[str, np.ndarray] = {}
        if missing:
            fresh = self._encode_missing(missing)
            resolved.update(fresh)
            if self.store is not None:
                self.store.put_many(self.scorer_id, fresh)
        if not keys:
            return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=bool)
        fresh_keys = set(fresh)
        fresh_mask = np.zeros(len(keys), dtype=bool)
        for i, key in enumerate(keys):
            if key in fresh_keys:
                fresh_mask[i] = True
                fresh_keys.discard(key)
        return np.stack([resolved[k] for k in keys]), fresh_mask

    def _encode_missing(self, missing: dict[str, str]) -> dict[str, np.ndarray]:
        keys = list(missing)
        fresh: dict[str, np.ndarray] = {}
        for start in range(0, len(keys), self.batch_size):
            batch = keys[start : start + self.batch_size]
            # The key (normal form) is what gets encoded, so a text's embedding never depends on
            # which spelling of it reached the cache first.
            vectors = self.scorer.embed_texts(batch)
            self.stats.encoder_calls += 1
            self.stats.encoded += len(batch)
            for key, vector in zip(batch, vectors, strict=True):
                vector = np.ascontiguousarray(vector, dtype=np.float32)
                fresh[key] = vector
                self.cache.put(key, vector)
        return fresh

    def release(self, texts: Iterable[str]) -> None:
        """An item finished: its candidates become the first to go when memory is needed."""
        self.cache.demote(normalise_text(t) for t in texts)
