"""Parquet shards (builder.format.shards): naming, rollover, atomicity, determinism, features, memory."""

from __future__ import annotations

import gc
import hashlib
import io
import random
import re
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, Features, Image, Value, load_dataset
from PIL import Image as PILImage

from builder.files import file_digest
from builder.format.shards import ShardWriter, arrow_schema

FEATURES = Features({"id": Value("string"), "image": Image(), "n": Value("int64")})
SHARD_NAME = re.compile(r"^(?P<split>[a-z]+)-(?P<k>\d{5})-of-(?P<n>\d{5})\.parquet$")


def _png(i: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (size, size), (i % 256, (i * 7) % 256, (i * 13) % 256)).save(buf, format="PNG")
    return buf.getvalue()


def _rows(count: int, payload: int = 1000, seed: int = 0):
    """Rows with incompressible `image.bytes` of `payload` bytes (the writer does not decode images)."""
    rng = random.Random(seed)
    for i in range(count):
        yield {"id": f"row-{i}", "image": {"bytes": rng.randbytes(payload), "path": f"{i}.bin"}, "n": i}


def _image_rows(count: int):
    for i in range(count):
        yield {"id": f"img-{i}", "image": {"bytes": _png(i), "path": f"{i}.png"}, "n": i}


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _check_names(shards, split: str) -> int:
    names = [s.path.name for s in shards]
    ms = [SHARD_NAME.match(n) for n in names]
    assert all(ms), names
    ns = {int(m["n"]) for m in ms}
    assert ns == {len(shards)}, names  # every file states the same N, and it is the real count
    assert [int(m["k"]) for m in ms] == list(range(len(shards)))
    assert {m["split"] for m in ms} == {split}
    return len(shards)


# --- naming and rollover ---------------------------------------------------------------------------

def test_rollover_by_size(tmp_path):
    max_bytes, rg = 15_000, 10
    with ShardWriter(tmp_path, "train", FEATURES, max_shard_bytes=max_bytes, row_group_rows=rg) as w:
        for row in _rows(100):
            w.write(row)
    shards = w.shards
    n = _check_names(shards, "train")
    assert n > 1
    assert _files(tmp_path) == sorted(s.path.name for s in shards)  # nothing else in the directory
    assert sum(s.rows for s in shards) == 100 == w.rows
    assert all(s.rows > 0 for s in shards)  # no trailing empty shard
    one_group = max(s.num_bytes for s in shards) // max(1, min(s.rows for s in shards)) * rg
    for s in shards[:-1]:
        assert s.num_bytes >= max_bytes  # rolled over only once the limit was reached
    for s in shards:
        assert s.num_bytes < max_bytes + 2 * one_group  # ...and not long after


def test_shard_records_match_files(tmp_path):
    with ShardWriter(tmp_path, "validation", FEATURES, max_shard_bytes=20_000, row_group_rows=7) as w:
        for row in _rows(60):
            w.write(row)
    ids = []
    for s in w.shards:
        assert s.path.parent == tmp_path
        data = s.path.read_bytes()
        assert s.sha256 == hashlib.sha256(data).hexdigest() == file_digest(s.path)
        assert s.bytes == len(data)
        table = pq.read_table(s.path)
        assert s.rows == table.num_rows == pq.ParquetFile(s.path).metadata.num_rows
        ids += table.column("id").to_pylist()
    assert ids == [f"row-{i}" for i in range(60)]  # order kept across shards
    assert w.num_bytes == sum(s.num_bytes for s in w.shards)


def test_row_groups_bounded(tmp_path):
    with ShardWriter(tmp_path, "train", FEATURES, row_group_rows=8) as w:
        for row in _rows(30, payload=10):
            w.write(row)
    (s,) = w.shards
    md = pq.ParquetFile(s.path).metadata
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [8, 8, 8, 6]


def test_invalid_options(tmp_path):
    with pytest.raises(ValueError):
        ShardWriter(tmp_path, "train", FEATURES, max_shard_bytes=0)
    with pytest.raises(ValueError):
        ShardWriter(tmp_path, "train", FEATURES, row_group_rows=0)


def test_close_is_idempotent(tmp_path):
    w = ShardWriter(tmp_path, "train", FEATURES)
    for row in _rows(3, payload=10):
        w.write(row)
    first = w.close()
    assert w.close() == first
    assert len(_files(tmp_path)) == 1


# --- determinism -----------------------------------------------------------------------------------

def test_byte_identical_for_same_rows(tmp_path):
    out = []
    for name in ("a", "b"):
        with ShardWriter(tmp_path / name, "train", FEATURES, max_shard_bytes=12_000, row_group_rows=5) as w:
            for row in _rows(40, seed=3):
                w.write(row)
        out.append(w.shards)
    a, b = out
    assert len(a) == len(b) > 1
    for sa, sb in zip(a, b):
        assert sa.path.name == sb.path.name
        assert sa.path.read_bytes() == sb.path.read_bytes()
        assert (sa.sha256, sa.bytes, sa.rows) == (sb.sha256, sb.bytes, sb.rows)
    # different rows give different bytes
    with ShardWriter(tmp_path / "c", "train", FEATURES, max_shard_bytes=12_000, row_group_rows=5) as w:
        for row in _rows(40, seed=4):
            w.write(row)
    assert w.shards[0].sha256 != a[0].sha256


def test_write_table_matches_write(tmp_path):
    rows = list(_rows(25, payload=50))
    with ShardWriter(tmp_path / "rows", "train", FEATURES, row_group_rows=10) as w1:
        for row in rows:
            w1.write(row)
    # columns in another order: the writer selects and casts to its schema
    table = pa.Table.from_pylist(rows, schema=arrow_schema(FEATURES)).select(["n", "image", "id"])
    with ShardWriter(tmp_path / "table", "train", FEATURES, row_group_rows=10) as w2:
        w2.write_table(table)
    assert pq.read_table(w2.shards[0].path).equals(pq.read_table(w1.shards[0].path))
    assert w2.shards[0].rows == 25


# --- empty splits and atomicity ----------------------------------------------------------------------

def test_empty_split_writes_no_file(tmp_path):
    """`datasets` cannot load a declared split with no rows, so an empty split leaves no shard."""
    with ShardWriter(tmp_path / "d", "harm", FEATURES) as w:
        pass
    assert w.shards == []
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_exception_leaves_no_files(tmp_path):
    d = tmp_path / "d"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(d, "train", FEATURES, max_shard_bytes=5_000, row_group_rows=4) as w:
            for row in _rows(30):
                w.write(row)
            assert len([p for p in d.iterdir() if p.is_file()]) > 1  # several parts were on disk
            raise RuntimeError("boom")
    assert [p for p in d.rglob("*") if p.is_file()] == []
    assert w.shards == []


def test_abort_removes_parts(tmp_path):
    w = ShardWriter(tmp_path, "train", FEATURES, row_group_rows=2)
    for row in _rows(5, payload=10):
        w.write(row)
    assert _files(tmp_path)
    w.abort()
    assert _files(tmp_path) == []


def test_no_final_names_before_close(tmp_path):
    w = ShardWriter(tmp_path, "train", FEATURES, max_shard_bytes=6_000, row_group_rows=3)
    seen = set()
    for i, row in enumerate(_rows(40)):
        w.write(row)
        names = _files(tmp_path)
        seen.update(names)
        assert not any(SHARD_NAME.match(n) for n in names), names
        assert not any(n.endswith(".parquet") for n in names), names  # no glob `train-*` can pick up a part
        assert not any(n.startswith("train-") for n in names), names
    assert len(seen) > 1  # there really were several parts on disk mid-write
    shards = w.close()
    assert _files(tmp_path) == sorted(s.path.name for s in shards)
    _check_names(shards, "train")


# --- features in the schema metadata -----------------------------------------------------------------

def test_features_in_metadata_decode_images(tmp_path):
    with ShardWriter(tmp_path / "data", "train", FEATURES, row_group_rows=4) as w:
        for row in _image_rows(10):
            w.write(row)
    path = w.shards[0].path
    # without the metadata, struct<bytes, path> would load as a plain dict
    assert b"huggingface" in pq.read_schema(path).metadata
    ds = Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "c1"))
    assert ds.features == FEATURES
    img = ds[3]["image"]
    assert isinstance(img, PILImage.Image)
    assert img.size == (8, 8) and img.getpixel((0, 0)) == (3, 21, 39)
    dd = load_dataset("parquet", data_files={"train": str(tmp_path / "data" / "train-*")},
                      cache_dir=str(tmp_path / "c2"))
    assert dd["train"].features == FEATURES
    assert isinstance(dd["train"][0]["image"], PILImage.Image)
    assert dd["train"]["id"] == [f"img-{i}" for i in range(10)]


def test_arrow_schema_roundtrip():
    schema = arrow_schema(FEATURES)
    assert Features.from_arrow_schema(schema) == FEATURES
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])


# --- memory bound -------------------------------------------------------------------------------------

def test_buffer_never_exceeds_row_group(tmp_path):
    w = ShardWriter(tmp_path, "train", FEATURES, row_group_rows=16)
    most = 0
    for row in _rows(200, payload=10):
        w.write(row)
        most = max(most, len(w._buffer))
    w.close()
    assert most < 16
    assert w.shards[0].rows == 200


def test_peak_memory_bounded_by_row_group(tmp_path):
    """2,000 rows of 20 kB images (40 MB): the writer must not keep them."""
    count, payload = 2000, 20_000
    total = count * payload
    arrow_peak = 0
    gc.collect()
    base_arrow = pa.total_allocated_bytes()
    tracemalloc.start()
    try:
        with ShardWriter(tmp_path, "train", FEATURES, row_group_rows=50) as w:
            for row in _rows(count, payload=payload):
                w.write(row)
                arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - base_arrow)
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert w.rows == count and sum(s.rows for s in w.shards) == count
    assert sum(s.bytes for s in w.shards) > total  # the images really are in the files
    assert traced_peak < total / 8, traced_peak  # Python objects: one row group's worth, not the split
    assert arrow_peak < total / 8, arrow_peak  # Arrow buffers likewise
