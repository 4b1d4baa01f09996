"""Model-file hashes are computed once per machine, not once per process (a shard unit is often a
process of its own)."""

from __future__ import annotations

import hashlib
import os

import pytest

from mils_pipeline import hashing


def test_a_file_hash_is_read_from_the_store_a_previous_process_left(tmp_path, monkeypatch):
    monkeypatch.setenv("MILS_HOME", str(tmp_path / "home"))
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    hashing._file_sha256.cache_clear()
    assert hashing.file_sha256(weights) == expected
    assert len(list((tmp_path / "home" / "file-hashes").iterdir())) == 1

    hashing._file_sha256.cache_clear()  # a new process: the memo is gone, the store is not

    def never_open(*args, **kwargs):
        raise AssertionError("the weights were read again")

    monkeypatch.setattr(hashing, "open", never_open, raising=False)
    assert hashing.file_sha256(weights) == expected

    # new contents (a new mtime) are hashed again, not taken from the store
    monkeypatch.undo()
    monkeypatch.setenv("MILS_HOME", str(tmp_path / "home"))
    weights.write_bytes(b"other weights")
    os.utime(weights, ns=(1, 2))
    hashing._file_sha256.cache_clear()
    assert hashing.file_sha256(weights) == hashlib.sha256(b"other weights").hexdigest()


def test_a_damaged_store_entry_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("MILS_HOME", str(tmp_path / "home"))
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"abc")
    hashing._file_sha256.cache_clear()
    hashing.file_sha256(weights)
    [entry] = (tmp_path / "home" / "file-hashes").iterdir()
    entry.write_text("not a hash")
    hashing._file_sha256.cache_clear()
    assert hashing.file_sha256(weights) == hashlib.sha256(b"abc").hexdigest()
    assert entry.read_text() == hashlib.sha256(b"abc").hexdigest()  # and repaired


@pytest.fixture(autouse=True)
def fresh_memo():
    yield
    hashing._file_sha256.cache_clear()
