"""Upstream's ``train/meta.json``: where each train row's harm labels are written down.

A JSON list; entry ``k`` belongs to the train row whose ``image_name`` is ``k.jpg`` and holds
``image`` (the path ``class1/class2/class3/<n>.jpg`` in the image tree) and the row's ``question``,
``chosen`` and ``rejected``. The file is streamed entry by entry, and only what the join needs is
kept: the label path and a 128-bit hash of the three texts' exact bytes (the whole list of texts
would be hundreds of MB)::

    meta = MetaIndex.read(stream, source="train.zip member train/meta.json")
    meta.lookup(k, text_key(question, chosen, rejected))   # (class path, None) or (None, reason)
"""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import IO, Iterator

from builder.errors import DataError

TEXTS = ("question", "chosen", "rejected")
CHUNK = 1 << 20

# Why a row's meta.json entry did not label it: the reasons the import's summary counts.
NO_INDEX = "image_name is not k.jpg"
NO_ENTRY = "no meta.json entry k"
MALFORMED = "meta.json entry k is malformed"
TEXTS_DIFFER = "texts differ from meta.json entry k"


def text_key(question, chosen, rejected) -> bytes:
    """A hash of the three texts' exact bytes (str or bytes), length-prefixed so no two splits hash alike."""
    h = hashlib.blake2b(digest_size=16)
    for part in (question, chosen, rejected):
        data = part if isinstance(part, bytes) else str(part).encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.digest()


def meta_index(image_name) -> int | None:
    """``"170.jpg"`` -> 170; None for anything that is not a non-negative integer file stem."""
    if isinstance(image_name, bytes):
        image_name = image_name.decode("utf-8", "replace")
    if not isinstance(image_name, str):
        return None
    stem = PurePosixPath(image_name).stem
    return int(stem) if stem.isascii() and stem.isdigit() else None


@dataclass
class MetaIndex:
    """meta.json reduced to what the join needs: per entry, a class path and the texts' key."""

    source: str  # what errors and the report name, e.g. "train.zip member train/meta.json"
    paths: list[tuple[str, str, str]] = field(default_factory=list)  # distinct class paths
    entries: list[tuple[int, bytes] | None] = field(default_factory=list)  # (index into paths, text key); None: malformed

    @classmethod
    def read(cls, stream: IO[bytes], *, source: str) -> "MetaIndex":
        index = cls(source)
        path_ids: dict[tuple[str, str, str], int] = {}
        for k, entry in iter_json_array(stream, source=source):
            labels = _labels(entry)
            if labels is None:
                index.entries.append(None)
                continue
            if labels not in path_ids:
                path_ids[labels] = len(index.paths)
                index.paths.append(labels)
            index.entries.append((path_ids[labels], text_key(*(entry[t] for t in TEXTS))))
        return index

    def lookup(self, k: int | None, key: bytes) -> tuple[tuple[str, str, str] | None, str | None]:
        """(class path, None) when entry ``k`` exists, is well formed and has the same texts; else (None, reason)."""
        if k is None:
            return None, NO_INDEX
        if k >= len(self.entries):
            return None, NO_ENTRY
        entry = self.entries[k]
        if entry is None:
            return None, MALFORMED
        if entry[1] != key:
            return None, TEXTS_DIFFER
        return self.paths[entry[0]], None


def _labels(entry) -> tuple[str, str, str] | None:
    """The (class1, class2, class3) of a well-formed entry: the folders above the file in ``image``."""
    if not isinstance(entry, dict) or not all(isinstance(entry.get(t), str) for t in TEXTS):
        return None
    image = entry.get("image")
    parts = PurePosixPath(image.replace("\\", "/")).parts if isinstance(image, str) else ()
    if len(parts) < 4 or not all(p.strip() for p in parts[-4:]):
        return None
    return parts[-4], parts[-3], parts[-2]


def iter_json_array(stream: IO[bytes], *, source: str, chunk: int = CHUNK) -> Iterator[tuple[int, object]]:
    """(index, value) of each entry of a JSON list, read from a binary stream a chunk at a time.

    Memory holds one chunk and the entry being parsed, however long the list. Bad JSON or bad UTF-8 is a
    DataError naming ``source`` and, where known, the entry.
    """
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof, consumed = "", 0, False, 0

    def more() -> bool:
        nonlocal buf, pos, eof, consumed
        if eof:
            return False
        data = stream.read(chunk)
        held = len(utf8.getstate()[0])  # bytes of a character the last chunk cut in two
        try:
            text = utf8.decode(data, final=not data)
        except UnicodeDecodeError as e:
            raise DataError(f"not valid UTF-8 at byte {consumed - held + e.start:,}: {e.reason}", file=source) from None
        consumed += len(data)
        eof = not data
        buf, pos = buf[pos:] + text, 0
        return True

    def skip_space() -> str:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n\ufeff":
                pos += 1
            if pos < len(buf) or not more():
                return buf[pos] if pos < len(buf) else ""

    if skip_space() != "[":
        raise DataError("expected a JSON list of entries", file=source)
    pos += 1
    k = 0
    if skip_space() == "]":
        return
    while True:
        while True:
            try:
                value, end = decoder.raw_decode(buf, pos)
                if end < len(buf) or eof:  # a value that ends with the buffer may go on in the next chunk
                    break
            except json.JSONDecodeError as e:
                cut = e.pos >= len(buf) - 1 or e.msg.startswith("Unterminated")  # the entry goes on, or it is bad
                if not cut or not more():
                    raise DataError(f"not valid JSON: {e.msg} (entry {k})", file=source, row=k) from None
                continue
            more()
        pos = end
        yield k, value
        k += 1
        sep = skip_space()
        if sep == "]":
            return
        if sep != ",":
            raise DataError(f"expected ',' or ']' after entry {k - 1}, got {sep!r}" if sep else
                            "the list is cut short (no closing ']')", file=source, row=k - 1 if sep else None)
        pos += 1
        skip_space()
