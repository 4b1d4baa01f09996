"""Bad input through real caption runs: every sample ends up as exactly one row or one quarantine
row with its reason, and the rest of the shard and the run are unaffected.

One module-scoped run over a catalogue of broken shards and samples serves most cases (SmolLM2
and a tiny open_clip model, as everywhere); the cases that need their own run follow it.
RELIABILITY.md lists every case with the test that covers it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import stat
import struct
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from mils_pipeline.config import RunConfig
from mils_pipeline.errors import OutputError, ShardReadError, ShardsFailedError
from mils_pipeline.generate.base import Completion
from mils_pipeline.io.shards import list_shards, write_shard
from mils_pipeline.run import build_runtime, caption_dataset, caption_shard
from tests.conftest import run_settings
from tests.test_media import png_claiming

MARKER = "mils-pickle-was-executed"


class _Exploit:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _png(photo_jpeg: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo_jpeg)).save(buffer, format="PNG")
    return buffer.getvalue()


def _bmp_with_jpeg_compression() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="BMP")
    data = bytearray(buffer.getvalue())
    data[30:34] = struct.pack("<I", 4)  # BI_JPEG: a BMP codec Pillow does not decode
    return bytes(data)


def _cut_tar(path: Path, before_member: str, extra: int) -> None:
    """Cut a tar ``extra`` bytes into the header of ``before_member`` (0: just before it)."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(before_member).offset
    path.write_bytes(path.read_bytes()[: offset + extra])


def _rows(output: Path, part: str) -> list[dict]:
    return pq.read_table(output / "data" / f"part-{part}.parquet").to_pylist()


def _quarantine(output: Path, part: str) -> list[dict]:
    return pq.read_table(output / "quarantine" / f"part-{part}.parquet").to_pylist()


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def runtime_and_config(tmp_path_factory, small_pool_texts):
    from mils_pipeline.seeding import write_seed_pool

    root = tmp_path_factory.mktemp("reliability")
    pool = write_seed_pool(small_pool_texts, root / "pools", {"theme": "test"})
    settings = run_settings((root / "pools", pool.id), max_rounds=1, top_k=3, max_active_items=8)
    config = RunConfig.model_validate(settings)
    runtime = build_runtime(config)
    yield runtime, config
    runtime.close()


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, runtime_and_config, photos):
    """The run's root sits one level below a directory of its own, and the run works in ``root/cwd``:
    ``../..`` from the working directory, the source or any output directory stays inside that parent."""
    runtime, config = runtime_and_config
    root = tmp_path_factory.mktemp("catalogue") / "root"
    source = root / "in"
    write_shard(
        str(source / "samples.tar"),
        [
            ("ok-1", {"jpg": photos["astronaut"]}),
            ("meta-only", {"json": b'{"caption": null}', "txt": b"no media here"}),
            ("zero", {"jpg": b""}),
            ("png-named-jpg", {"jpg": _png(photos["chelsea"])}),
            ("text-named-jpg", {"jpg": b"just some text, not an image"}),
            ("bomb", {"png": png_claiming(100_000, 100_000)}),
            ("bmp-jpeg", {"bmp": _bmp_with_jpeg_compression()}),
            ("../../escape", {"jpg": photos["rocket"]}),
            ("dir.v1/img", {"jpg": photos["camera"]}),
            ("pickled", {"jpg": photos["coins"], "pyd": pickle.dumps(_Exploit(root / MARKER))}),
            ("ok-1", {"jpg": photos["coffee"]}),
        ],
    )
    # "a.b.jpg": WebDataset keys end at the first dot, so this is key "a" with extension "b.jpg"
    with tarfile.open(source / "samples.tar", "a") as tar:
        info = tarfile.TarInfo("a.b.jpg")
        info.size = len(photos["coffee"])
        tar.addfile(info, io.BytesIO(photos["coffee"]))
    for name in ("cut-header", "cut-boundary"):
        write_shard(str(source / f"{name}.tar"), [(n, {"jpg": photos[n]}) for n in ("astronaut", "chelsea", "coffee")])
    _cut_tar(source / "cut-header.tar", "coffee.jpg", 100)
    _cut_tar(source / "cut-boundary.tar", "coffee.jpg", 0)
    write_shard(str(source / "empty.tar"), [])
    (source / "zero-bytes.tar").write_bytes(b"")

    (root / "cwd").mkdir()
    before = _tree(root.parent)
    with contextlib.chdir(root / "cwd"):
        summary = caption_dataset(str(source), str(root / "out"), config, runtime=runtime)
    return root, summary, before


def test_every_sample_is_one_row_or_one_quarantine_row(catalogue):
    root, summary, _ = catalogue
    rows = {r["key"] for r in _rows(root / "out", "samples")}
    quarantined = [q["key"] for q in _quarantine(root / "out", "samples")]
    assert rows == {"ok-1", "png-named-jpg", "../../escape", "dir.v1/img", "pickled"}
    assert sorted(quarantined) == sorted(["meta-only", "zero", "text-named-jpg", "bomb", "bmp-jpeg", "ok-1", "a"])
    assert summary.rows == 7 and summary.quarantined == 7 + 2 + 1  # samples + two cut shards + zero-byte tar


@pytest.mark.parametrize(
    ("key", "error_type", "says"),
    [
        ("meta-only", "no_media", "found json, txt"),
        ("zero", "empty", "zero bytes"),
        ("text-named-jpg", "not_an_image", "not a readable image"),
        ("bomb", "too_large", "decompression bomb"),
        ("bmp-jpeg", "unsupported_codec", "Unsupported BMP compression"),
        ("ok-1", "duplicate_key", "came earlier"),
        ("a", "no_media", "b.jpg"),
    ],
)
def test_bad_sample_is_quarantined_with_its_reason(catalogue, key, error_type, says):
    root, *_ = catalogue
    matches = [q for q in _quarantine(root / "out", "samples") if q["key"] == key]
    assert len(matches) == 1
    assert matches[0]["error_type"] == error_type and says in matches[0]["message"]


def test_wrong_extension_with_real_image_bytes_is_captioned(catalogue):
    root, *_ = catalogue
    row = next(r for r in _rows(root / "out", "samples") if r["key"] == "png-named-jpg")
    assert row["caption"] and row["score"] is not None


def test_keys_with_dots_and_dotdot_stay_data_and_nothing_is_written_outside_the_output(catalogue, tmp_path_factory):
    root, _, before = catalogue
    keys = {r["key"] for r in _rows(root / "out", "samples")}
    assert {"../../escape", "dir.v1/img"} <= keys
    created = _tree(root.parent) - before  # the root's parent: the working directory and its parent included
    assert created and all(path == "root/out" or path.startswith("root/out/") for path in created)
    assert not list((root / "cwd").iterdir())
    assert not any("escape" in path.name for path in tmp_path_factory.getbasetemp().rglob("*"))


def test_pickle_members_are_never_unpickled(catalogue):
    root, *_ = catalogue
    assert not (root / MARKER).exists()
    assert "pickled" in {r["key"] for r in _rows(root / "out", "samples")}


@pytest.mark.parametrize(("shard", "says"), [("cut-header", "unreadable"), ("cut-boundary", "end-of-archive")])
def test_tar_cut_between_members_is_damage_not_a_clean_end(catalogue, shard, says):
    root, *_ = catalogue
    assert [r["key"] for r in _rows(root / "out", shard)] == ["astronaut"]
    (damage,) = _quarantine(root / "out", shard)
    # chelsea may have had more members after the cut: it is quarantined, never captioned half-read
    assert damage["error_type"] == "damaged_shard" and damage["key"] == "chelsea" and says in damage["message"]


def test_empty_tar_is_done_with_no_rows_and_zero_byte_tar_is_quarantined(catalogue):
    root, *_ = catalogue
    empty = json.loads((root / "out" / "_manifests" / "empty.json").read_text())
    assert empty["status"] == "done" and empty["rows"] == 0 and empty["quarantined"] == 0
    (zero,) = _quarantine(root / "out", "zero-bytes")
    assert zero["error_type"] == "damaged_shard" and "at its start" in zero["message"]


def test_output_files_follow_the_umask(runtime_and_config, tmp_path, photos):
    runtime, config = runtime_and_config
    write_shard(str(tmp_path / "in" / "s.tar"), [("coins", {"jpg": photos["coins"]})])
    previous = os.umask(0o027)
    try:
        caption_dataset(str(tmp_path / "in"), str(tmp_path / "out"), config, runtime=runtime)
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert {"data/part-s.parquet", "_manifests/s.json", "README.md"} <= set(modes)
    assert set(modes.values()) == {0o640}, {path: oct(mode) for path, mode in modes.items()}  # 0666 less the umask


def test_nan_media_embedding_is_quarantined_and_the_shard_goes_on(runtime_and_config, tmp_path, photos):
    runtime, config = runtime_and_config
    encoder = runtime.optimizer.objective.components[0].encoder
    real = encoder.scorer

    class NaNForGreyImages:  # the real scorer, with a fault injected for one image
        identity, modality, random_weights = real.identity, real.modality, real.random_weights
        device, media_batch_size, decode_options = real.device, real.media_batch_size, real.decode_options
        text_context, truncated = real.text_context, staticmethod(real.truncated)

        def embed_media(self, media):
            out = real.embed_media(media)
            for row, image in zip(out, media, strict=True):
                if len(set(image.getpixel((5, 5)))) == 1:  # the grey "camera" photo
                    row[:] = np.nan
            return out

        def embed_texts(self, texts):
            return real.embed_texts(texts)

    write_shard(str(tmp_path / "in" / "s.tar"), [(n, {"jpg": photos[n]}) for n in ("camera", "chelsea")])
    encoder.scorer = NaNForGreyImages()
    try:
        caption_dataset(str(tmp_path / "in"), str(tmp_path / "out"), config, runtime=runtime)
    finally:
        encoder.scorer = real
    assert [r["key"] for r in _rows(tmp_path / "out", "s")] == ["chelsea"]
    (bad,) = _quarantine(tmp_path / "out", "s")
    assert bad["key"] == "camera" and bad["error_type"] == "non_finite_embedding"


def test_llm_replies_with_nothing_parsable_leave_the_seed_captions(runtime_and_config, tmp_path, photos):
    runtime, config = runtime_and_config
    real = runtime.optimizer.generator

    class JunkReplies:  # the real model runs; its replies are replaced by unparsable junk
        identity = real.identity

        def generate(self, prompts, params, seeds):
            return [
                Completion("!!!\n???\n1.\n```", c.prompt_tokens, c.completion_tokens, c.finish_reason)
                for c in real.generate(prompts, params, seeds)
            ]

        def close(self):
            return None

    write_shard(str(tmp_path / "in" / "s.tar"), [(n, {"jpg": photos[n]}) for n in ("rocket", "coins")])
    runtime.optimizer.generator = JunkReplies()
    try:
        caption_dataset(str(tmp_path / "in"), str(tmp_path / "out"), config, runtime=runtime)
    finally:
        runtime.optimizer.generator = real
    rows = _rows(tmp_path / "out", "s")
    assert [r["key"] for r in rows] == ["rocket", "coins"]
    for row in rows:
        assert row["cost"]["empty_replies"] == 1 and row["rounds"] == 1
        assert all(c["round"] == 0 for c in row["candidates"])  # seeds only: nothing new was parsed
        assert row["caption"] in runtime.seed_pool.texts


def test_a_shard_that_vanishes_mid_run_fails_alone_and_a_rerun_does_only_it(runtime_and_config, tmp_path, photos):
    runtime, config = runtime_and_config
    source = tmp_path / "in"
    for i, name in enumerate(("astronaut", "chelsea", "rocket")):
        write_shard(str(source / f"s{i}.tar"), [(name, {"jpg": photos[name]})])
    kept = (source / "s1.tar").read_bytes()

    def remove_s1_when_s0_starts(what, advance, total):
        if what == "shard s0" and (source / "s1.tar").exists():
            (source / "s1.tar").unlink()

    with pytest.raises(ShardsFailedError, match="s1") as err:
        caption_dataset(str(source), str(tmp_path / "out"), config, runtime=runtime, progress=remove_s1_when_s0_starts)
    assert "does not exist" in str(err.value) and err.value.summary.rows == 2
    assert not (tmp_path / "out" / "_manifests" / "s1.json").exists()

    (source / "s1.tar").write_bytes(kept)
    summary = caption_dataset(str(source), str(tmp_path / "out"), config, runtime=runtime)
    assert summary.rows == 1 and summary.skipped == 2
    keys = pq.read_table(tmp_path / "out" / "data").column("key").to_pylist()
    assert sorted(keys) == ["astronaut", "chelsea", "rocket"]


def test_same_tar_through_another_source_root_is_refused_not_duplicated(runtime_and_config, tmp_path, photos):
    runtime, config = runtime_and_config
    write_shard(str(tmp_path / "in" / "part" / "s.tar"), [("coins", {"jpg": photos["coins"]})])
    caption_dataset(str(tmp_path / "in"), str(tmp_path / "out"), config, runtime=runtime)
    with pytest.raises(OutputError, match="already captioned"):
        caption_dataset(str(tmp_path / "in" / "part"), str(tmp_path / "out"), config, runtime=runtime)
    assert pq.read_table(tmp_path / "out" / "data").num_rows == 1


def test_another_tar_under_the_same_shard_name_is_refused_not_overwritten(runtime_and_config, tmp_path, photos):
    runtime, config = runtime_and_config
    write_shard(str(tmp_path / "a" / "s.tar"), [("coins", {"jpg": photos["coins"]})])
    write_shard(str(tmp_path / "b" / "s.tar"), [("rocket", {"jpg": photos["rocket"]})])
    caption_dataset(str(tmp_path / "a"), str(tmp_path / "out"), config, runtime=runtime)
    with pytest.raises(OutputError, match="Shard names are the shard paths"):
        caption_dataset(str(tmp_path / "b"), str(tmp_path / "out"), config, runtime=runtime)
    assert _rows(tmp_path / "out", "s")[0]["key"] == "coins"


def test_seed_pool_file_changed_under_the_same_path_is_a_new_version(runtime_and_config, tmp_path, photos):
    runtime, config = runtime_and_config
    pool_file = tmp_path / "pool.txt"
    pool_file.write_text("\n".join(runtime.seed_pool.texts[:50]) + "\n")
    by_path = config.model_copy(
        update={"seed_pool": config.seed_pool.model_copy(update={"pool": str(pool_file)})}, deep=True
    )
    write_shard(str(tmp_path / "in" / "s.tar"), [("coins", {"jpg": photos["coins"]})])
    first = build_runtime(by_path)
    try:
        caption_dataset(str(tmp_path / "in"), str(tmp_path / "out"), by_path, runtime=first)
    finally:
        first.close()
    pool_file.write_text("\n".join(runtime.seed_pool.texts[50:100]) + "\n")
    with pytest.raises(OutputError, match="seed pool"):
        caption_dataset(str(tmp_path / "in"), str(tmp_path / "out"), by_path)


def test_scorer_weights_replaced_under_the_same_path_are_a_new_version(runtime_and_config, tmp_path, photos):
    import torch

    runtime, config = runtime_and_config
    weights = tmp_path / "scorer.pt"
    model = runtime.scorer._model
    torch.save(model.state_dict(), weights)
    with_file = config.model_copy(
        update={"scorer": config.scorer.model_copy(update={"checkpoint": str(weights)})}, deep=True
    )
    write_shard(str(tmp_path / "in" / "s.tar"), [("coins", {"jpg": photos["coins"]})])
    (shard,) = list_shards(str(tmp_path / "in"))
    first = build_runtime(with_file)
    try:
        assert caption_shard(first, shard, str(tmp_path / "out")).status == "done"
    finally:
        first.close()
    torch.save({k: v + 0.01 for k, v in model.state_dict().items()}, weights)
    second = build_runtime(with_file)
    try:
        with pytest.raises(OutputError, match="scorer"):
            caption_shard(second, shard, str(tmp_path / "out"))
    finally:
        second.close()


def test_pipe_urls_are_refused_unless_allowed(runtime_and_config, tmp_path, photos, monkeypatch):
    runtime, config = runtime_and_config
    monkeypatch.setenv("MILS_ALLOW_PIPE_URLS", "true")  # the worker policy allows them; the run config decides
    write_shard(str(tmp_path / "s.tar"), [("coins", {"jpg": photos["coins"]})])
    marker = tmp_path / "command-ran"
    source = f"pipe:touch {marker} && cat {tmp_path / 's.tar'}"
    with pytest.raises(ShardReadError, match=r"storage\.allow_pipe_urls"):
        caption_dataset(source, str(tmp_path / "out"), config, runtime=runtime)
    assert not marker.exists()

    allowed = config.model_copy(update={"storage": config.storage.model_copy(update={"allow_pipe_urls": True})})
    runtime.config = allowed
    try:
        summary = caption_dataset(source, str(tmp_path / "out"), allowed, runtime=runtime)
        assert summary.rows == 1 and marker.exists()
        with pytest.raises(ShardsFailedError, match="exited with status 3"):
            caption_dataset("pipe:exit 3", str(tmp_path / "out-failing"), allowed, runtime=runtime)
        # stdout closed well before the exit: the status is still the reason, not "empty tar"
        with pytest.raises(ShardsFailedError, match="exited with status 4"):
            caption_dataset("pipe:exec >&-; sleep 0.5; exit 4", str(tmp_path / "out-late"), allowed, runtime=runtime)
    finally:
        runtime.config = config


def test_leftover_temporaries_of_a_killed_writer_are_removed_and_never_read(runtime_and_config, tmp_path, photos):
    import datasets

    runtime, config = runtime_and_config
    source, out = tmp_path / "in", tmp_path / "out"
    write_shard(str(source / "s0.tar"), [("coins", {"jpg": photos["coins"]})])
    caption_dataset(str(source), str(out), config, runtime=runtime)
    leftover = out / "data" / ".part-s1.parquet.abc123.tmp"  # a writer of shard s1 killed before its rename
    leftover.write_bytes(b"PAR1 half a file")
    with pytest.raises(pa.ArrowInvalid):
        pq.read_table(leftover)  # any reader that opened it would fail

    assert pq.read_table(out / "data").column("key").to_pylist() == ["coins"]
    card = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    pattern = card["configs"][0]["data_files"][0]["path"]
    loaded = datasets.load_dataset("parquet", data_files=str(out / pattern), split="train", cache_dir=str(tmp_path))
    assert loaded["key"] == ["coins"]
    assert leftover.exists()

    write_shard(str(source / "s1.tar"), [("rocket", {"jpg": photos["rocket"]})])
    summary = caption_dataset(str(source), str(out), config, runtime=runtime)
    assert summary.skipped == 1 and summary.rows == 1
    assert not leftover.exists()
    assert sorted(pq.read_table(out / "data").column("key").to_pylist()) == ["coins", "rocket"]
