"""What the card says about a dataset folder, read from the folder itself.

Files, rows, sizes, version, build config and card options come from the folder's manifest (the
``DatasetFolder`` value); the rest from the shards: a few small columns (labels, question type,
models, safety labels) read with column projection, the image column a few hundred rows at a time
(hashed, to count distinct images per category), and the first row of each kind (the card's example
row)::

    stats = FolderStats.read(DatasetFolder.open("out/spa_vl"))
    stats.rows_by_category[("Malicious Use", "Fraud or deceptive action", "train")]   # 1,204
    stats.unsafe["Malicious Use", "Fraud or deceptive action"]  # UnsafeRates(questions=..., ...)
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image as PILImage

from builder.errors import DataError
from builder.format.layout import PREFERENCE_SPLITS
from builder.format.manifest import DatasetFolder

_PREFERENCE_COLUMNS = ("class1", "class2", "question_type", "chosen_model", "rejected_model",
                       "question_unsafe", "chosen_unsafe", "rejected_unsafe")
_EVAL_COLUMNS = ("class1", "class2")
IMAGE_BATCH_ROWS = 256  # images in memory at a time while counting distinct images (~10 MB at SPA-VL sizes)


@dataclass
class UnsafeRates:
    """Safety-label counts of preference rows (train and validation), where labels exist."""

    labelled: int = 0  # rows whose three labels are all present
    question: int = 0
    chosen: int = 0
    rejected: int = 0

    def add(self, q: bool, c: bool, r: bool) -> None:
        self.labelled += 1
        self.question += bool(q)
        self.chosen += bool(c)
        self.rejected += bool(r)

    def rate(self, which: str) -> float:
        return getattr(self, which) / self.labelled if self.labelled else 0.0


@dataclass
class FolderStats:
    folder: DatasetFolder  # files, rows, sizes, version, build config and card options come from its manifest
    rows_by_category: Counter = field(default_factory=Counter)  # (class1, class2, split) → rows
    # (class1, class2) → distinct images (by content) of train + validation
    images_by_category: Counter = field(default_factory=Counter)
    examples: dict[str, dict] = field(default_factory=dict)  # "preference" / "eval" → the first row of that kind
    question_types: Counter = field(default_factory=Counter)  # (question_type, split) → rows
    unsafe: dict[tuple[str, str], UnsafeRates] = field(default_factory=dict)  # (class1, class2) → counts
    chosen_models: Counter = field(default_factory=Counter)
    rejected_models: Counter = field(default_factory=Counter)

    @property
    def has_safety_labels(self) -> bool:
        return any(u.labelled for u in self.unsafe.values())

    @classmethod
    def read(cls, folder: DatasetFolder) -> "FolderStats":
        """Count what the card shows from the shards the folder's manifest lists."""
        stats = cls(folder=folder)
        images: dict[tuple[str, str], set] = {}
        for (_, split), rels in folder.shards.items():
            for rel in rels:
                path = folder.root / rel
                try:
                    stats._count(path, split)
                    if split in PREFERENCE_SPLITS:
                        _count_images(path, images)
                    stats._keep_example(path, split)
                except (OSError, pa.ArrowException) as e:
                    raise DataError(f"cannot read the shard: {e}; run `spa-vl validate`", file=rel) from None
        for key, names in images.items():
            stats.images_by_category[key] = len(names)
        return stats

    def _count(self, path: Path, split: str) -> None:
        preference = split in PREFERENCE_SPLITS
        wanted = _PREFERENCE_COLUMNS if preference else _EVAL_COLUMNS
        pf = pq.ParquetFile(path)
        columns = [c for c in wanted if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(columns=columns, batch_size=65_536):
            cols = batch.to_pydict()
            n = batch.num_rows
            get = lambda name: cols.get(name) or [None] * n  # noqa: E731 - a column absent from old files
            c1, c2 = get("class1"), get("class2")
            self.rows_by_category.update(zip(c1, c2, [split] * n))
            if not preference:
                continue
            self.question_types.update((qt, split) for qt in get("question_type") if qt)
            self.chosen_models.update(m for m in get("chosen_model") if m)
            self.rejected_models.update(m for m in get("rejected_model") if m)
            for a, b, q, c, r in zip(c1, c2, get("question_unsafe"), get("chosen_unsafe"), get("rejected_unsafe")):
                if q is not None and c is not None and r is not None:
                    self.unsafe.setdefault((a, b), UnsafeRates()).add(q, c, r)

    def _keep_example(self, path: Path, split: str) -> None:
        kind = "preference" if split in PREFERENCE_SPLITS else "eval"
        if kind in self.examples:
            return
        with pq.ParquetFile(path) as pf:
            if pf.metadata.num_rows == 0:
                return
            row = pf.read_row_group(0).slice(0, 1).to_pylist()[0]
        self.examples[kind] = {**row, "image": describe_image((row.get("image") or {}).get("bytes"))}


def _count_images(path: Path, images: dict) -> None:
    """Add each row's image (an 8-byte hash of its bytes) to the set of its (class1, class2).

    The rows of one image usually sit together: a row whose bytes equal the previous row's (one
    vectorised comparison per batch) is not hashed again.
    """
    with pq.ParquetFile(path) as pf:
        for batch in pf.iter_batches(batch_size=IMAGE_BATCH_ROWS, columns=["class1", "class2", "image"]):
            data = pc.struct_field(batch.column("image"), "bytes")
            n = len(data)
            if n == 0:
                continue
            repeat = [False] + pc.equal(data.slice(1), data.slice(0, n - 1)).fill_null(False).to_pylist()
            valid = data.is_valid().to_pylist()
            width = np.int64 if pa.types.is_large_binary(data.type) else np.int32
            offsets = np.frombuffer(data.buffers()[1], dtype=width)[data.offset: data.offset + n + 1].tolist()
            body, digest = memoryview(data.buffers()[2] or b""), None
            for i, (a, b) in enumerate(zip(batch.column("class1").to_pylist(), batch.column("class2").to_pylist())):
                if not valid[i]:
                    continue
                if not repeat[i] or digest is None:
                    digest = hashlib.blake2b(body[offsets[i]:offsets[i + 1]], digest_size=8).digest()
                images.setdefault((a, b), set()).add(digest)


def describe_image(data: bytes | None) -> str:
    """``JPEG, 64×64 px, 2,113 bytes``: what the card shows of an image cell."""
    if not data:
        return "null"
    try:
        with PILImage.open(io.BytesIO(data)) as im:
            return f"{im.format}, {im.width}×{im.height} px, {len(data):,} bytes"
    except Exception:  # noqa: BLE001 - the card describes, validate judges
        return f"{len(data):,} bytes (not a readable image)"
