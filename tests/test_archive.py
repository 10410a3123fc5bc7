"""builder.upstream.archive.SafeZip: hostile archives are refused from their central directory, before any member is read."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import pytest

import builder.upstream.archive as archive
from builder.upstream.archive import SafeZip
from builder.errors import DataError

JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9"


def _zip(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def no_member_opened(monkeypatch):
    """Fails the test if any member of any zip is opened (decompressed)."""
    real_open = zipfile.ZipFile.open

    def refuse(self, name, mode="r", *args, **kwargs):
        if mode == "r":
            raise AssertionError(f"member {name} was opened for reading")
        return real_open(self, name, mode, *args, **kwargs)
    monkeypatch.setattr(zipfile.ZipFile, "open", refuse)


def _refused(path: Path) -> DataError:
    with pytest.raises(DataError) as info:
        SafeZip(path, label="train.zip")
    assert info.value.file == "train.zip"
    return info.value


def test_a_sound_archive_reads_back(tmp_path):
    members = {"train/meta.json": b'[{"a": 1}]' * 1000, "train/A/B/c/0.jpg": JPEG, "train/A/B/c/1.jpg": JPEG[::-1]}
    with SafeZip(_zip(tmp_path / "t.zip", members, zipfile.ZIP_DEFLATED)) as z:
        assert z.names() == list(members)
        assert {n: z.size(n) for n in members} == {n: len(d) for n, d in members.items()}
        assert {n: z.read(n) for n in members} == members
        with z.open("train/meta.json") as f:
            assert f.read(5) == b'[{"a"' and len(f.read()) == len(members["train/meta.json"]) - 5
        with pytest.raises(DataError, match="no member 'nope'"):
            z.read("nope")


def test_a_member_that_expands_too_much_is_refused_unread(tmp_path, no_member_opened):
    path = _zip(tmp_path / "bomb.zip", {"train/a/b/c/0.jpg": JPEG, "train/zeros.jpg": bytes(20 * 2**20)},
                zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 100_000  # 20 MiB of zeros deflate to about 20 kB
    err = _refused(path)
    assert "member 'train/zeros.jpg' expands" in err.message and "over the 100x limit" in err.message


def _patch_central(data: bytes, index: int, offset: int, fmt: str, value: int) -> bytes:
    """Overwrite one field of the ``index``-th central directory header."""
    pos = -1
    for _ in range(index + 1):
        pos = data.index(b"PK\x01\x02", pos + 1)
    out = bytearray(data)
    struct.pack_into(fmt, out, pos + offset, value)
    return bytes(out)


def test_a_member_that_declares_gigabytes_is_refused_unread(tmp_path, no_member_opened):
    data = _zip(tmp_path / "t.zip", {"a/b/c/0.jpg": JPEG, "a/b/c/1.jpg": JPEG}).read_bytes()
    (tmp_path / "big.zip").write_bytes(_patch_central(data, 1, 24, "<I", 0xFFFF_FFF0))  # uncompressed size
    err = _refused(tmp_path / "big.zip")
    assert err.message.startswith("member 'a/b/c/1.jpg' declares 4,294,967,280 bytes uncompressed, over the ")


def _overlapping(n: int, size: int) -> bytes:
    """A Fifield-style zip: one compressed stream of ``size`` zero bytes, and ``n`` central entries all pointing at it."""
    body = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = body.compress(bytes(size)) + body.flush()
    crc = zlib.crc32(bytes(size))
    local = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(packed), size, len(b"k.jpg"), 0)
    head = local + b"k.jpg" + packed
    central = b""
    for i in range(n):
        name = f"train/a/b/c/{i}.jpg".encode()
        central += struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(packed), size,
                               len(name), 0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, n, n, len(central), len(head), 0)
    return head + central + end


def test_overlapping_members_are_refused_unread(tmp_path, no_member_opened, monkeypatch):
    monkeypatch.setattr(archive, "MAX_RATIO", 10**6)  # so that the overlap, not the ratio, is what refuses it
    # 20,000 entries over one 50 MiB stream: 1 TB declared by a zip of about 1.2 MB (ratio under the limit)
    path = tmp_path / "overlap.zip"
    path.write_bytes(_overlapping(20_000, 50 * 2**20))
    assert path.stat().st_size < 2 * 2**20
    with zipfile.ZipFile(path) as zf:  # zipfile itself lists it happily
        assert sum(i.file_size for i in zf.infolist()) > 10**12
    err = _refused(path)
    assert "member 'train/a/b/c/0.jpg' overlaps the next member" in err.message


def test_a_repeated_name_and_an_encrypted_member_are_refused(tmp_path, no_member_opened):
    data = _overlapping(2, 10)
    twice = data.replace(b"train/a/b/c/1.jpg", b"train/a/b/c/0.jpg")
    (tmp_path / "twice.zip").write_bytes(twice)
    assert "appears twice" in _refused(tmp_path / "twice.zip").message

    plain = _zip(tmp_path / "t.zip", {"a/b/c/0.jpg": JPEG}).read_bytes()
    (tmp_path / "locked.zip").write_bytes(_patch_central(plain, 0, 8, "<H", 0x1))  # general purpose flag: encrypted
    assert "member 'a/b/c/0.jpg' is encrypted" in _refused(tmp_path / "locked.zip").message


def test_a_damaged_member_is_a_located_error_when_read(tmp_path):
    data = bytearray(_zip(tmp_path / "t.zip", {"a/b/c/0.jpg": JPEG, "a/b/c/1.jpg": JPEG}).read_bytes())
    data[data.index(bytes(range(256))) + 3] ^= 0xFF  # one byte of the first member's data
    (tmp_path / "bad.zip").write_bytes(bytes(data))
    with SafeZip(tmp_path / "bad.zip", label="train.zip") as z:
        assert z.read("a/b/c/1.jpg") == JPEG
        with pytest.raises(DataError, match="member 'a/b/c/0.jpg' is damaged: BadZipFile: Bad CRC-32") as info:
            z.read("a/b/c/0.jpg")
    assert info.value.file == "train.zip"


def test_not_a_zip_is_a_located_error(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"PK\x03\x04 and nothing else")
    assert "not a readable zip file" in _refused(tmp_path / "x.zip").message


def test_a_member_never_returns_more_than_it_declares():
    stream = archive._Bounded(io.BytesIO(b"abcdef"), 4, "t.zip", "m")
    assert stream.read(4) == b"abcd"
    with pytest.raises(DataError, match="holds more bytes than it declares"):
        stream.read(10)
