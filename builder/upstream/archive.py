"""Read a zip archive that may be hostile: every member is checked in the central directory first.

Before a single member is read, ``SafeZip`` refuses an archive whose members declare more than a
size cap, expand more than ``MAX_RATIO`` times their compressed size, overlap one another or the
central directory (how a 1 MB zip can expand to terabytes: many entries over one compressed
stream), repeat a name, or are encrypted. Reading a member then stops at its declared size, and a
damaged one (bad CRC) is an error that names it. So a zip bomb is a located error in the time it
takes to read the central directory, and only the members a caller asks for are ever decompressed::

    with SafeZip(root / "train.zip", label="train.zip") as z:
        z.names()                            # every file member, in archive order
        z.size("train/meta.json")            # its declared uncompressed size
        data = z.read("train/Malicious Use/Security threats/weapon/0.jpg")
        with z.open("train/meta.json") as f: ...
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import IO

from builder.errors import DataError

MAX_MEMBER_BYTES = 64 * 2**20  # an image: SPA-VL's average about 40 kB; 64 MiB is a scan, not a photo
MAX_TEXT_MEMBER_BYTES = 8 * 2**30  # a .json member (train/meta.json: 93,258 entries of texts)
MAX_RATIO = 100  # JPEGs barely compress and JSON text about 4-10x; a bomb's streams expand ~1000x
RATIO_FLOOR = 1 * 2**20  # below this a member may be as compressible as it likes (a small text of spaces)
_LOCAL_HEADER = 30  # fixed bytes of a local file header, before its name and extra field
# What zipfile raises for a damaged archive, a bad member, or an encrypted or unsupported one.
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, RuntimeError, NotImplementedError)


def member_cap(name: str) -> int:
    return MAX_TEXT_MEMBER_BYTES if name.lower().endswith(".json") else MAX_MEMBER_BYTES


class SafeZip:
    """A zip file opened for reading, its central directory checked. Use as a context manager."""

    def __init__(self, path: str | Path, *, label: str | None = None):
        self.path = Path(path)
        self.label = label or self.path.name  # what errors name
        try:
            self._zf = zipfile.ZipFile(self.path)
        except ZIP_ERRORS as e:
            raise DataError(f"not a readable zip file: {type(e).__name__}: {e}", file=self.label) from None
        try:
            self._infos = self._checked_members()
        except BaseException:
            self._zf.close()
            raise

    def __enter__(self) -> "SafeZip":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._zf.close()

    # --- the central directory ------------------------------------------------------------------
    def _checked_members(self) -> dict[str, zipfile.ZipInfo]:
        infos: dict[str, zipfile.ZipInfo] = {}
        for info in self._zf.infolist():
            name = info.filename
            if name in infos:
                self._refuse(name, "appears twice in the archive")
            if info.flag_bits & 0x1:
                self._refuse(name, "is encrypted")
            cap = member_cap(name)
            if info.file_size > cap:
                self._refuse(name, f"declares {info.file_size:,} bytes uncompressed, over the {cap:,}-byte limit")
            if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
                self._refuse(name, f"expands {info.file_size / max(info.compress_size, 1):,.0f} times "
                                   f"({info.compress_size:,} -> {info.file_size:,} bytes), over the {MAX_RATIO}x limit")
            infos[name] = info
        self._check_no_overlap(list(infos.values()))
        return infos

    def _check_no_overlap(self, infos: list[zipfile.ZipInfo]) -> None:
        """Each member's local header and data must end before the next member (and the central directory) begins."""
        ordered = sorted(infos, key=lambda i: i.header_offset)
        ends = [i.header_offset for i in ordered[1:]] + [self._zf.start_dir]
        for info, next_start in zip(ordered, ends):
            encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
            name_bytes = len(info.orig_filename.encode(encoding, "replace"))
            end = info.header_offset + _LOCAL_HEADER + name_bytes + info.compress_size  # a lower bound
            if info.header_offset < 0 or end > next_start:
                self._refuse(info.filename, f"overlaps the next member or the central directory (its data ends at "
                                            f"byte {end:,} or later, the next entry starts at {next_start:,})")

    def _refuse(self, name: str, why: str):
        raise DataError(f"member {name!r} {why}; refusing the whole archive (a zip bomb or a damaged file)",
                        file=self.label)

    # --- members -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """File members (not folders), in archive order."""
        return [name for name, info in self._infos.items() if not info.is_dir()]

    def size(self, name: str) -> int:
        return self._info(name).file_size

    def _info(self, name: str) -> zipfile.ZipInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise DataError(f"no member {name!r}", file=self.label) from None

    def open(self, name: str) -> IO[bytes]:
        """A stream of the member's bytes that stops at its declared size and checks its CRC at the end."""
        info = self._info(name)
        try:
            return _Bounded(self._zf.open(info), info.file_size, self.label, name)
        except ZIP_ERRORS as e:
            raise DataError(f"member {name!r} cannot be read: {type(e).__name__}: {e}", file=self.label) from None

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()


class _Bounded:
    """A member's stream: never returns more than the declared size, and turns zipfile errors into DataErrors."""

    def __init__(self, stream: IO[bytes], limit: int, label: str, name: str):
        self._stream, self._left, self._label, self._name = stream, limit, label, name

    def read(self, n: int = -1) -> bytes:
        want = self._left + 1 if n is None or n < 0 else min(n, self._left + 1)
        try:
            data = self._stream.read(want) if n is not None and n >= 0 else self._read_all(want)
        except ZIP_ERRORS as e:
            raise DataError(f"member {self._name!r} is damaged: {type(e).__name__}: {e}", file=self._label) from None
        self._left -= len(data)
        if self._left < 0:
            raise DataError(f"member {self._name!r} holds more bytes than it declares", file=self._label)
        return data

    def _read_all(self, limit: int) -> bytes:
        chunks, total = [], 0
        while total < limit and (block := self._stream.read(min(1 << 20, limit - total))):
            chunks.append(block)
            total += len(block)
        return b"".join(chunks)

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> "_Bounded":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

