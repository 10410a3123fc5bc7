"""The row checks, one record batch at a time.

labels, text and chosen_rejected run vectorised on the batch's Arrow columns; images, duplicates and
leakage are the one per-row Python loop, each distinct image decoded once (rows that repeat the previous
row's bytes reuse its hash). Memory holds a few dozen bytes per distinct image and per row (hashes and
keys, never images), whatever the size of the folder.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from builder.errors import DataError
from builder.format.layout import TEST_CONFIG, UNATTRIBUTED
from builder.format.schema import QUESTION_TYPES, REQUIRED_TEXT, check_image, invalid_utf8
from builder.taxonomy import Taxonomy

# A single image above 20 MiB is a mistake (a raw scan, a frame dump): upstream SPA-VL rows average
# about 40 kB (3.8 GB of train shards for 93k rows), and `datasets` keeps image bytes in 100-row
# groups, so one such image bloats a row group that every reader of the shard pays for.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
_SEP = "\x1f"  # joins class1/class2/class3 into one string for a vectorised taxonomy lookup


@dataclass
class ScannedShard:
    rel: str  # path relative to the root, posix
    path: Path
    folder: str | None = None  # the folder under data/: a domain slug, unattributed or test
    split: str | None = None
    kind: str | None = None  # preference | eval
    rows: int | None = None  # from the parquet footer

    @property
    def split_label(self) -> str:  # the split group leakage compares: train, validation or test
        return TEST_CONFIG if self.kind == "eval" else str(self.split)


class RowChecks:
    """Fills the labels, text, chosen_rejected, images, duplicates and leakage checks, batch by batch,
    remembering across files what duplicates and leakage compare."""

    def __init__(self, checks: dict, taxonomy: Taxonomy, full_decode: bool, pool):
        self.c, self.taxonomy, self.full_decode, self.pool = checks, taxonomy, full_decode, pool
        self.files: list[str] = []  # index → rel path, so the maps below hold small ints
        # image sha256 (32 bytes) → (first split, file index, row, problem or None)
        self.images: dict[bytes, tuple[str, int, int, str | None]] = {}
        self.keys: dict[bytes, tuple[int, int]] = {}  # duplicate key → (file index, row)
        self.paths = pa.array([_SEP.join(p) for p in taxonomy.paths()], pa.string())
        self.qtypes = pa.array(list(QUESTION_TYPES), pa.string())

    def check(self, s: ScannedShard, index: int, hashed, offset: int) -> int:
        """Every row check on one batch of ``s`` (``hashed``: what ``hash_images`` gave); its rows."""
        batch, images, digests = hashed
        batch = self._valid_utf8(s, batch, offset)
        self._labels_and_text(s, batch, offset)
        self._images(s, index, images, digests, batch.column("question").to_pylist(), offset)
        return batch.num_rows

    def _valid_utf8(self, s: ScannedShard, batch: pa.RecordBatch, offset: int) -> pa.RecordBatch:
        """Fail ``text`` for every string cell that is not valid UTF-8 (parquet readers do not check it), and
        return the batch with those cells replaced, so that the other checks can read them."""
        columns = list(batch.columns)
        for i, name in enumerate(batch.schema.names):
            bad = invalid_utf8(columns[i])
            if bad:
                self.c["text"].fail(bad[0][1], file=s.rel, row=offset + bad[0][0], field=name, count=len(bad))
                cells = columns[i].cast(pa.binary()).to_pylist()
                columns[i] = pa.array([None if b is None else b.decode("utf-8", "replace") for b in cells], pa.string())
        return pa.RecordBatch.from_arrays(columns, schema=batch.schema)

    def _labels_and_text(self, s: ScannedShard, batch: pa.RecordBatch, offset: int) -> None:
        """labels, text and chosen_rejected, vectorised over the batch's Arrow columns."""
        n, col = batch.num_rows, batch.column
        labels = self.c["labels"]
        labels.checked += n
        bad = self._bad_labels(s, batch)
        failed = pc.sum(bad).as_py() or 0
        if failed:
            i = _first_true(bad)
            row = {k: col(k)[i].as_py() for k in ("class1", "class2", "class3", "question_type") if k in batch.schema.names}
            fld, msg = self._label_problem(s, row)
            labels.fail(msg, file=s.rel, row=offset + i, field=fld, count=failed)

        # text: required fields present and not blank (Unicode whitespace, like str.strip)
        text = self.c["text"]
        text.checked += n
        blank = {}
        for name in REQUIRED_TEXT[s.kind]:
            v = col(name)
            blank[name] = pc.or_(pc.is_null(v), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(v)), 0)).fill_null(True)
        any_blank = _or_all(list(blank.values()))
        failed = pc.sum(any_blank).as_py() or 0
        if failed:
            i = _first_true(any_blank)
            name = next(k for k, m in blank.items() if m[i].as_py())
            text.fail("missing text" if col(name)[i].as_py() is None else "empty or whitespace-only text",
                      file=s.rel, row=offset + i, field=name, count=failed)

        if s.kind == "preference":
            cr = self.c["chosen_rejected"]
            cr.checked += n
            same = pc.equal(pc.utf8_trim_whitespace(col("chosen")),
                            pc.utf8_trim_whitespace(col("rejected"))).fill_null(False)
            failed = pc.sum(same).as_py() or 0
            if failed:
                cr.fail("chosen and rejected are the same text", file=s.rel, row=offset + _first_true(same),
                        field="rejected", count=failed)

    def _bad_labels(self, s: ScannedShard, batch: pa.RecordBatch) -> pa.Array:
        """Rows whose labels are not a path of the taxonomy (in one lookup) or not of their folder's domain."""
        c1, c2, c3 = batch.column("class1"), batch.column("class2"), batch.column("class3")
        if s.folder == UNATTRIBUTED:
            bad = pc.or_(pc.or_(pc.is_valid(c1), pc.is_valid(c2)), pc.is_valid(c3))
        else:
            good = pc.is_in(pc.binary_join_element_wise(c1, c2, c3, _SEP), value_set=self.paths).fill_null(False)
            if s.kind == "preference":
                good = pc.and_(good, pc.equal(c1, self.taxonomy.domain(s.folder).label).fill_null(False))
            bad = pc.invert(good)
        if s.kind == "preference":
            qt = batch.column("question_type")
            bad = pc.or_(bad, pc.invert(pc.or_(pc.is_null(qt), pc.is_in(qt, value_set=self.qtypes).fill_null(False))))
        return bad

    def _images(self, s: ScannedShard, index: int, images: list, digests: list, questions: list, offset: int) -> None:
        """Images (once per distinct image), duplicates and leakage: the only per-row Python loop."""
        c_img, c_dup, c_leak = self.c["images"], self.c["duplicates"], self.c["leakage"]
        fresh: dict[bytes, memoryview] = {}  # distinct images not seen before, in row order
        for data, h in zip(images, digests):
            if h is not None and h not in self.images and h not in fresh:
                fresh[h] = data
        problems = dict(zip(fresh, self._map(image_problem, fresh.values())))

        split, kind = s.split_label, s.kind
        c_img.checked += len(images)
        for i, (h, q) in enumerate(zip(digests, questions)):
            row = offset + i
            if h is None:
                c_img.fail("image bytes missing", file=s.rel, row=row, field="image")
                continue
            seen = self.images.get(h)
            if seen is None:
                problem = problems[h]
                self.images[h] = (split, index, row, problem)
            else:
                problem = seen[3]
                if seen[0] != split:
                    c_leak.fail(f"image (sha256 {h.hex()[:12]}) is also in {seen[0]}: {self.files[seen[1]]} row {seen[2]}",
                                file=s.rel, row=row, field="image")
            if problem is not None:
                c_img.fail(problem, file=s.rel, row=row, field="image")
            if q is not None:
                self._duplicate(s, index, row, kind.encode() + h + q.encode("utf-8"), h)
        c_leak.checked += sum(h is not None for h in digests)  # every row's image is compared with all before it

    def _duplicate(self, s: ScannedShard, index: int, row: int, key: bytes, image: bytes) -> None:
        self.c["duplicates"].checked += 1
        key = hashlib.sha256(key).digest()[:16]
        first = self.keys.get(key)
        if first is None:
            self.keys[key] = (index, row)
        else:
            self.c["duplicates"].fail(f"same image (sha256 {image.hex()[:12]}) and question as "
                                      f"{self.files[first[0]]} row {first[1]}", file=s.rel, row=row, field="question")

    def _map(self, fn, items):
        items = list(items)
        if self.full_decode and len(items) > 1:  # PIL decodes without the GIL: use the cores
            return list(self.pool.map(lambda d: fn(d, "full"), items))
        mode = "full" if self.full_decode else "header"
        return [fn(d, mode) for d in items]

    def _label_problem(self, s: ScannedShard, row: dict) -> tuple[str, str]:
        """The field and message of a row the vectorised label check rejected."""
        labels = [row.get("class1"), row.get("class2"), row.get("class3")]
        if s.folder == UNATTRIBUTED:
            for name, v in zip(("class1", "class2", "class3"), labels):
                if v is not None:
                    return name, f"rows under data/{UNATTRIBUTED}/ carry no labels, got {v!r}"
        else:
            for i, name in enumerate(("class1", "class2", "class3")):
                if not isinstance(labels[i], str) or not labels[i]:
                    return name, "label missing"
                if not self.taxonomy.contains(*labels[: i + 1]):
                    return name, (f"label {labels[i]!r} is not in taxonomy {self.taxonomy.name!r} under "
                                  f"{' / '.join(labels[:i]) or 'the root'}")
            if s.kind == "preference" and labels[0] != self.taxonomy.domain(s.folder).label:
                return "class1", (f"class1 {labels[0]!r} belongs under data/{self.taxonomy.slug_for(labels[0])}/, "
                                  f"not data/{s.folder}/")
        qt = row.get("question_type")
        return "question_type", f"question_type must be one of {QUESTION_TYPES} or null, got {qt!r}"


def image_problem(data: bytes, decode: str) -> str | None:
    if len(data) > MAX_IMAGE_BYTES:
        return f"image is {len(data):,} bytes, over the {MAX_IMAGE_BYTES:,}-byte limit"
    try:
        check_image({"bytes": data}, decode=decode)
    except DataError as e:
        return e.message
    return None


def _first_true(mask: pa.Array) -> int:
    return pc.index(mask, True).as_py()


def _or_all(masks: list[pa.Array]) -> pa.Array:
    out = masks[0]
    for m in masks[1:]:
        out = pc.or_(out, m)
    return out


def hash_images(batch: pa.RecordBatch) -> tuple[pa.RecordBatch, list, list]:
    """The batch, its images (zero-copy memoryviews into the batch) and their sha256 digests (None: no image).

    The rows of one image usually sit together, so a row whose bytes equal the previous row's (one
    vectorised comparison) reuses that digest: each distinct image is hashed once per run of rows.
    """
    arr = pc.struct_field(batch.column("image"), "bytes")
    n = len(arr)
    valid = arr.is_valid().to_pylist()
    repeat = [False] + (pc.equal(arr.slice(1), arr.slice(0, n - 1)).fill_null(False).to_pylist() if n > 1 else [])
    width = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=width)[arr.offset: arr.offset + n + 1].tolist() if n else []
    data = memoryview(arr.buffers()[2] or b"")
    images, digests, digest = [], [], None
    for i in range(n):
        if not valid[i]:
            images.append(None)
            digests.append(None)
            continue
        view = data[offsets[i]:offsets[i + 1]]
        if not repeat[i]:
            digest = hashlib.sha256(view).digest()
        images.append(view)
        digests.append(digest)
    return batch, images, digests


def prefetch(batches, depth: int = 2):
    """Read and hash the next batches in a thread (pyarrow and hashlib release the GIL) while one is checked."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for b in batches:
                if not put(hash_images(b)):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(e)

    thread = threading.Thread(target=produce, name="validate-prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
