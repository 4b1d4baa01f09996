"""A shard's stages (samples -> unique keys -> decoded) and the tar reader's key rules."""

from __future__ import annotations

import io
import tarfile

import pytest

from mils_pipeline.io.shards import ShardInfo, iter_samples
from mils_pipeline.optimize import ItemInput, Rejection
from mils_pipeline.run.stages import shard_items

# Member names WebDataset users meet: dots in directories, several extensions, upper-case
# extensions, spaces, deep paths, keys that differ only after the first dot.
ODD_MEMBERS = [
    "plain.jpg",
    "plain.txt",
    "multi.part.seg.json",
    "multi.JPG",
    "dir.v2/photo.jpg",
    "dir.v2/photo.cls",
    "a/b/c/deep.png",
    "with space.jpg",
    "with space.txt",
    "x.1.jpg",
    "x.2.txt",
    "y-z_0001.webp",
    "y-z_0002.webp",
    "__meta__.json",
]


def _tar(names: list[str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            data = name.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_sample_keys_agree_with_webdatasets_own_grouping(tmp_path):
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    path = tmp_path / "odd.tar"
    path.write_bytes(_tar(ODD_MEMBERS))
    ours = [(s.key, sorted(s.members)) for s in iter_samples(str(path))]
    with open(path, "rb") as fh:
        files = ({**f, "__url__": str(path)} for f in tar_file_iterator(fh, skip_meta=None))
        theirs = [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in group_by_keys(files)]
    assert ours == theirs
    assert ("multi", ["JPG".lower(), "part.seg.json"]) in ours  # the key ends at the first dot of the file name
    assert ("dir.v2/photo", ["cls", "jpg"]) in ours  # dots in directories are not the key's end


def test_where_the_reader_is_stricter_than_webdataset(tmp_path):
    """A member without an extension stays in its sample (WebDataset drops it silently), and a
    repeated extension keeps both members, visibly (WebDataset raises)."""
    path = tmp_path / "strict.tar"
    path.write_bytes(_tar(["k.jpg", "k", "k.jpg"]))
    [sample] = list(iter_samples(str(path)))
    assert sorted(sample.members) == ["", "jpg", "jpg#3"]


def _shard(tmp_path, members: list[tuple[str, bytes]]) -> ShardInfo:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "shard.tar"
    path.write_bytes(buffer.getvalue())
    return ShardInfo(url=str(path), name="shard", size=path.stat().st_size, etag=None, mtime=None)


def test_stages_yield_items_and_rejections_in_order_with_their_seconds(tmp_path, photos):
    shard = _shard(
        tmp_path,
        [
            ("one.jpg", photos["coffee"]),
            ("broken.jpg", b"not a jpeg"),
            ("one.png", photos["chelsea"]),  # the key again, after another sample
            ("two.jpg", photos["rocket"]),
            ("note.txt", b"no media"),
        ],
    )
    out = list(shard_items(shard, "image", {}, include_media=False, allow_pipe=False))
    assert [(type(e).__name__, e.key) for e in out] == [
        ("ItemInput", "one"),
        ("Rejection", "broken"),
        ("Rejection", "one"),
        ("ItemInput", "two"),
        ("Rejection", "note"),
    ]
    rejections = [e for e in out if isinstance(e, Rejection)]
    assert [r.error_type for r in rejections] == ["not_an_image", "duplicate_key", "no_media"]
    items = [e for e in out if isinstance(e, ItemInput)]
    assert [i.meta["order"] for i in items] == [0, 1]
    assert all(i.meta["seconds_read"] >= 0 and i.meta["seconds_decode"] > 0 for i in items)


@pytest.mark.parametrize(
    ("cut", "expected"),
    [
        ("inside_member", [("ItemInput", "a"), ("Rejection", "b")]),
        # cut before b's header: more members of "a" may have followed, so "a" is not captioned
        ("between_members", [("Rejection", "a")]),
    ],
)
def test_a_damaged_shard_ends_its_stream_with_one_rejection(tmp_path, photos, cut, expected):
    shard = _shard(tmp_path, [("a.jpg", photos["coffee"]), ("b.jpg", photos["rocket"])])
    data = (tmp_path / "shard.tar").read_bytes()
    with tarfile.open(tmp_path / "shard.tar") as tar:
        second = tar.getmember("b.jpg")
    end = second.offset_data + 100 if cut == "inside_member" else second.offset
    (tmp_path / "shard.tar").write_bytes(data[:end])
    out = list(shard_items(shard, "image", {}, include_media=False, allow_pipe=False))
    assert [(type(e).__name__, e.key) for e in out] == expected
    assert out[-1].error_type == "damaged_shard"
