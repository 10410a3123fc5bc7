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
    text, decoder = _ChunkedText(stream, source, chunk), json.JSONDecoder()
    if text.skip_space() != "[":
        raise DataError("expected a JSON list of entries", file=source)
    text.pos += 1
    if text.skip_space() == "]":
        return
    k = 0
    while True:
        yield k, text.value(decoder, k)
        k += 1
        sep = text.skip_space()
        if sep == "]":
            return
        if sep != ",":
            raise DataError(f"expected ',' or ']' after entry {k - 1}, got {sep!r}" if sep else
                            "the list is cut short (no closing ']')", file=source, row=k - 1 if sep else None)
        text.pos += 1
        text.skip_space()


class _ChunkedText:
    """A binary stream's text, decoded a chunk at a time: ``buf[pos:]`` is what is read and not parsed yet."""

    def __init__(self, stream: IO[bytes], source: str, chunk: int):
        self.stream, self.source, self.chunk = stream, source, chunk
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.eof, self.consumed = "", 0, False, 0

    def more(self) -> bool:
        """Read the next chunk onto the unparsed text; False at the end of the stream."""
        if self.eof:
            return False
        data = self.stream.read(self.chunk)
        held = len(self.utf8.getstate()[0])  # bytes of a character the last chunk cut in two
        try:
            text = self.utf8.decode(data, final=not data)
        except UnicodeDecodeError as e:
            raise DataError(f"not valid UTF-8 at byte {self.consumed - held + e.start:,}: {e.reason}",
                            file=self.source) from None
        self.consumed += len(data)
        self.eof = not data
        self.buf, self.pos = self.buf[self.pos:] + text, 0
        return True

    def skip_space(self) -> str:
        """Skip white space (reading on as needed); the next character, or "" at the end."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n\ufeff":
                self.pos += 1
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def value(self, decoder: json.JSONDecoder, k: int) -> object:
        """Parse entry ``k``, reading on while it may go on in the next chunk."""
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:  # a value that ends with the buffer may go on in the next chunk
                    break
            except json.JSONDecodeError as e:
                cut = e.pos >= len(self.buf) - 1 or e.msg.startswith("Unterminated")  # the entry goes on, or it is bad
                if not cut or not self.more():
                    raise DataError(f"not valid JSON: {e.msg} (entry {k})", file=self.source, row=k) from None
                continue
            self.more()
        self.pos = end
        return value
