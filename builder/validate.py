"""Validate a dataset folder before it is published: ``spa-vl validate DIR [--json] [--full_decode]``.

Ten checks (``CHECKS``: manifest, schema, labels, images, text, chosen_rejected, duplicates, leakage,
card_counts, configs_load), always in that order, each counted and each naming its first offence:
file relative to the root, 0-based row within that file, field. A bad folder gives a report with
failed checks, never an exception; one check's error does not stop the others, and a shard whose
schema is wrong is left out of the row checks (the report's notes say so).

Each shard is read from disk once: it is memory-mapped, its sha256 is taken from the mapping (in a
thread, while the rows are scanned) and pyarrow reads its record batches from the same mapping. Row
checks run on Arrow columns; only images go through Python one by one, decoded once per distinct
image (rows that repeat the previous row's bytes reuse its hash). Memory holds a few batches of
``BATCH_ROWS`` rows in flight plus a few dozen bytes per distinct image and per row (hashes and
keys, never images), whatever the size of the folder.

    report = validate("out/spa_vl")
    print(report.format_table())
    report.ok, report.to_dict()
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import Features

from builder.errors import DataError
from builder.format.folder import (
    EVAL_SPLITS,
    FORMAT,
    PREFERENCE_SPLITS,
    TAXONOMY_FILE,
    TEST_CONFIG,
    UNATTRIBUTED,
    config_data_files,
    folder_taxonomy,
    parse_version,
    read_manifest,
)
from builder.format.schema import (
    EVAL_FEATURES,
    MAX_IMAGE_PIXELS,
    PREFERENCE_FEATURES,
    QUESTION_TYPES,
    REQUIRED_TEXT,
    check_image,
    check_table_schema,
    invalid_utf8,
)
from builder.taxonomy import Taxonomy

# A single image above 20 MiB is a mistake (a raw scan, a frame dump): upstream SPA-VL rows average
# about 40 kB (3.8 GB of train shards for 93k rows), and `datasets` keeps image bytes in 100-row
# groups, so one such image bloats a row group that every reader of the shard pays for.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
BATCH_ROWS = 256  # rows per record batch: ~12 MB of image bytes at SPA-VL sizes

CHECKS = {
    "manifest": "manifest.json parses and has format/version/files; every listed file exists with its "
                "sha256, bytes and parquet rows; every parquet under data/ is listed",
    "schema": "every shard sits at data/<domain|unattributed>/<train|validation>-* or data/test/<harm|help>-* "
              "and has exactly the columns and types of its kind",
    "labels": "class1/class2/class3 is a taxonomy path and class1 is the domain of its folder; rows under "
              "data/unattributed/ carry no labels; question_type is one of easy/hardq/hards or null",
    "images": f"every image decodes (header; every pixel with full_decode), at most {MAX_IMAGE_PIXELS:,} pixels "
              f"and {MAX_IMAGE_BYTES // 2**20} MiB",
    "text": "every string is valid UTF-8; required text fields (id, image_name, question; chosen, rejected for "
            "preference rows) are not empty or whitespace-only",
    "chosen_rejected": "chosen differs from rejected (after stripping whitespace)",
    "duplicates": "no two rows with the same image (sha256) and question; preference and eval rows apart",
    "leakage": "no image (sha256) in two of train, validation and test (test/harm and test/help together: "
               "an evaluation image may carry a harm and a help question)",
    "card_counts": "README.md's YAML parses; every config has a dataset_info entry and vice versa; each "
                   "split's num_examples equals the rows in the files its data_files globs match",
    "configs_load": "every config declared in the card loads with datasets.load_dataset and gives the "
                    "row counts of its files",
}
_SEP = "\x1f"  # joins class1/class2/class3 into one string for a vectorised taxonomy lookup
_FEATURES = {"preference": PREFERENCE_FEATURES, "eval": EVAL_FEATURES}
_EXPECTED = {kind: {name: f.arrow_schema.field(name).type for name in f} for kind, f in _FEATURES.items()}


@dataclass
class Check:
    name: str
    description: str
    checked: int = 0
    failed: int = 0
    first: dict | None = None  # {"file", "row", "field", "message"} of the first offence
    skipped_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.failed == 0

    @property
    def status(self) -> str:
        return "SKIP" if self.skipped_reason is not None else ("PASS" if self.ok else "FAIL")

    def fail(self, message: str, *, file: str | None = None, row: int | None = None, field: str | None = None,
             count: int = 1) -> None:
        self.failed += count
        if self.first is None:
            self.first = {"file": file, "row": row, "field": field, "message": message}

    def first_line(self) -> str:
        if self.skipped_reason is not None:
            return f"skipped: {self.skipped_reason}"
        return "" if self.first is None else str(DataError(
            self.first["message"], file=self.first["file"], row=self.first["row"], field=self.first["field"]))

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "status": self.status, "ok": self.ok,
                "checked": self.checked, "failed": self.failed, "first": self.first,
                "skipped_reason": self.skipped_reason}


@dataclass
class ValidationReport:
    root: Path
    checks: list[Check]
    rows: int = 0  # rows scanned by the row checks
    seconds: float = 0.0
    full_decode: bool = False
    notes: list[str] = field(default_factory=list)  # e.g. shards the row checks skipped, and why

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check {name!r}; checks: {', '.join(CHECKS)}")

    def to_dict(self) -> dict:
        """What ``spa-vl validate --json`` prints."""
        return {"root": str(self.root), "ok": self.ok, "rows": self.rows, "seconds": round(self.seconds, 3),
                "rows_per_second": round(self.rows_per_second, 1), "full_decode": self.full_decode,
                "checks": [c.to_dict() for c in self.checks], "notes": list(self.notes)}

    def format_table(self) -> str:
        head = ("check", "status", "checked", "failed", "first offence")
        lines = [(c.name, c.status, f"{c.checked:,}", f"{c.failed:,}", c.first_line()) for c in self.checks]
        widths = [max(len(r[i]) for r in [head, *lines]) for i in range(4)]
        out = []
        for r in [head, *lines]:
            out.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}".rstrip())
        out.extend(f"note: {n}" for n in self.notes)
        ran = [c for c in self.checks if c.skipped_reason is None]
        bad = sum(not c.ok for c in self.checks)
        skipped = len(self.checks) - len(ran)
        verdict = "all checks passed" if bad == 0 else f"{bad} of {len(ran)} checks failed"
        if skipped:
            verdict += f" ({skipped} skipped)"
        out.append(f"{self.rows:,} rows in {self.seconds:.2f} s ({self.rows_per_second:,.0f} rows/s): {verdict}")
        return "\n".join(out)


def validate(
    root: str | Path,
    *,
    full_decode: bool = False,
    taxonomy: Taxonomy | None = None,
    load_configs: bool = True,
    progress: bool = True,
) -> ValidationReport:
    """Run every check on the dataset folder at ``root``; never raises for a bad folder, only for a missing one."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("dataset folder not found" if not root.exists() else "not a folder", file=str(root))
    started = time.perf_counter()
    checks = {name: Check(name, desc) for name, desc in CHECKS.items()}
    report = ValidationReport(root=root, checks=list(checks.values()), full_decode=full_decode)
    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 1))) as pool:
        scan = _FolderScan(root, checks, report, taxonomy or _built_with(root, checks["manifest"]), full_decode, pool)
        _guard(checks["manifest"], scan.read_manifest)
        _guard(checks["schema"], lambda: scan.scan_shards(progress))
        expected = _guard(checks["card_counts"], scan.card_counts)
    if not load_configs:
        checks["configs_load"].skipped_reason = "load_configs=False"
    elif expected is None:
        checks["configs_load"].skipped_reason = "no configs: the card did not parse (see card_counts)"
    else:
        _guard(checks["configs_load"], lambda: _load_configs(root, expected, checks["configs_load"], progress))
    report.seconds = time.perf_counter() - started
    return report


def _built_with(root: Path, check: Check) -> Taxonomy:
    """The folder's own taxonomy (``taxonomy.yaml``); when that is unreadable or not the one the manifest
    names, the manifest check fails and labels are checked against the shipped taxonomy."""
    try:
        return folder_taxonomy(root)
    except DataError as e:
        check.checked += 1
        check.fail(e.message, file=TAXONOMY_FILE, field="taxonomy")
        return Taxonomy.load()


def _guard(check: Check, fn):
    """Run one phase; a bug or an unexpected error fails its check instead of stopping the others."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported, not swallowed
        check.fail(f"check stopped: {type(e).__name__}: {e}")
        return None


@dataclass
class _Shard:
    rel: str  # path relative to the root, posix
    path: Path
    folder: str | None = None  # the folder under data/: a domain slug, unattributed or test
    split: str | None = None
    kind: str | None = None  # preference | eval
    rows: int | None = None  # from the parquet footer

    @property
    def split_label(self) -> str:  # the split group leakage compares: train, validation or test
        return TEST_CONFIG if self.kind == "eval" else str(self.split)


class _FolderScan:
    """One pass over the folder's files; fills the manifest, schema and row checks."""

    def __init__(self, root, checks, report, taxonomy, full_decode, pool):
        self.root, self.c, self.report, self.taxonomy = root, checks, report, taxonomy
        self.full_decode, self.pool = full_decode, pool
        self.manifest_files: dict[str, dict] = {}
        self.file_rows: dict[str, int] = {}  # rel path → rows, for every parquet file read
        self.files: list[str] = []  # index → rel path, so the maps below hold small ints
        # image sha256 (32 bytes) → (first split, file index, row, problem or None)
        self.images: dict[bytes, tuple[str, int, int, str | None]] = {}
        self.keys: dict[bytes, tuple[int, int]] = {}  # duplicate key → (file index, row)
        self.paths = pa.array([_SEP.join(p) for p in taxonomy.paths()], pa.string())
        self.qtypes = pa.array(list(QUESTION_TYPES), pa.string())

    # --- manifest -------------------------------------------------------------------------
    def read_manifest(self) -> None:
        check = self.c["manifest"]
        try:
            manifest = read_manifest(self.root)
        except DataError as e:
            check.checked += 1
            check.fail(e.message, file="manifest.json")
            return
        check.checked += 1
        if not isinstance(manifest, dict):
            check.fail(f"manifest must be a JSON object, got {type(manifest).__name__}", file="manifest.json")
            return
        missing = [k for k in ("format", "version", "files") if k not in manifest]
        if missing:
            check.fail(f"manifest has no {', '.join(missing)}", file="manifest.json", field=missing[0])
        elif manifest["format"] != FORMAT:
            check.fail(f"format {manifest['format']!r} is not {FORMAT!r}", file="manifest.json", field="format")
        else:
            try:
                parse_version(manifest["version"])
            except DataError:
                check.fail(f"version {manifest['version']!r} is not a semantic version X.Y.Z (publish tags vX.Y.Z)",
                           file="manifest.json", field="version")
        built_with = manifest.get("taxonomy")
        if isinstance(built_with, dict) and built_with.get("sha256") not in (None, self.taxonomy.sha256):
            self.report.notes.append(
                f"built with taxonomy {built_with.get('name')!r} (sha256 {str(built_with['sha256'])[:12]}), checked against "
                f"{self.taxonomy.name!r} (sha256 {self.taxonomy.sha256[:12]}, {self.taxonomy.source}): the folder has no "
                f"{TAXONOMY_FILE} (written before folders carried their taxonomy); rebuild it to check its own labels")
        files = manifest.get("files")
        if not isinstance(files, dict):
            if not missing:
                check.fail("files must map each path to {sha256, bytes, rows}", file="manifest.json", field="files")
            return
        for rel, entry in files.items():
            if not isinstance(entry, dict) or not {"sha256", "bytes"} <= set(entry):
                check.fail("entry needs sha256 and bytes (and rows for a parquet file)", file="manifest.json",
                           field=f"files.{rel}")
                continue
            self.manifest_files[rel] = entry

    # --- shards: manifest entries, schema, and every row check ---------------------------------
    def scan_shards(self, progress: bool) -> None:
        on_disk = {p.relative_to(self.root).as_posix() for p in (self.root / "data").rglob("*.parquet") if p.is_file()} \
            if (self.root / "data").is_dir() else set()
        for rel in sorted(on_disk - set(self.manifest_files)):
            self.c["manifest"].checked += 1
            self.c["manifest"].fail("parquet file under data/ is not listed in manifest.json (stray shard)", file=rel)
        listed = sorted(self.manifest_files)
        for rel in listed:
            if not (self.root / rel).is_file():
                self.c["manifest"].checked += 1
                self.c["manifest"].fail("listed in manifest.json but missing", file=rel)
        shards = [_Shard(rel, self.root / rel) for rel in sorted(on_disk | {r for r in listed if (self.root / r).is_file()})]

        # footers first: the bar's total, and a schema verdict before any row is read
        for s in shards:
            if s.rel.endswith(".parquet"):
                self._classify(s)
        total = sum(s.rows or 0 for s in shards if s.kind)
        bar = _bar(total, progress)
        try:
            for s in shards:
                self._scan(s, bar)
        finally:
            bar.close()

    def _classify(self, s: _Shard) -> None:
        """Read the footer and place the shard in the layout; a shard that fails here is not row-checked."""
        check = self.c["schema"]
        check.checked += 1
        try:
            meta = pq.read_metadata(s.path)
            schema = meta.schema.to_arrow_schema()  # with the `huggingface` key-value metadata
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a broken file
            check.fail(f"not a readable parquet file: {type(e).__name__}: {e}", file=s.rel)
            self._skip(s, "unreadable")
            return
        s.rows = meta.num_rows
        self.file_rows[s.rel] = meta.num_rows
        parts = s.rel.split("/")
        folder = parts[1] if len(parts) == 3 and parts[0] == "data" else None
        split = parts[-1].split("-", 1)[0]
        if folder == TEST_CONFIG and split in EVAL_SPLITS:
            kind = "eval"
        elif folder is not None and folder in self.taxonomy.slugs and split in PREFERENCE_SPLITS:
            kind = "preference"
        elif folder == UNATTRIBUTED and split == "train":
            kind = "preference"
        else:
            where = "data/<domain>/<train|validation>-*, data/unattributed/train-* or data/test/<harm|help>-*"
            if folder not in (None, TEST_CONFIG, UNATTRIBUTED) and folder not in self.taxonomy.slugs:
                msg = f"folder {folder!r} is not a domain of taxonomy {self.taxonomy.name!r}; expected {where}"
            else:
                msg = f"shard is outside the layout; expected {where}"
            check.fail(msg, file=s.rel)
            self._skip(s, "outside the layout")
            return
        try:
            check_table_schema(schema, _EXPECTED[kind], file=s.rel)
            extra = [n for n in schema.names if n not in _EXPECTED[kind]]
            if extra:
                raise DataError(f"unexpected column for {kind} rows", file=s.rel, field=extra[0])
            _check_declared_features(schema, _FEATURES[kind])
        except DataError as e:
            check.fail(f"{e.message} ({kind} schema)", file=s.rel, field=e.field)
            self._skip(s, f"{kind} schema mismatch")
            return
        s.folder, s.split, s.kind = folder, split, kind

    def _skip(self, s: _Shard, why: str) -> None:
        rows = f"{s.rows:,} rows" if s.rows is not None else "its rows"
        self.report.notes.append(f"{s.rel}: {rows} not row-checked ({why}; see schema)")

    def _scan(self, s: _Shard, bar) -> None:
        """Hash the file and, for a shard that passed ``schema``, run every row check on its batches."""
        entry = self.manifest_files.get(s.rel)
        try:
            mapped = pa.memory_map(str(s.path)) if s.path.stat().st_size else None
        except OSError as e:
            self.c["manifest"].checked += 1
            self.c["manifest"].fail(f"cannot read: {e}", file=s.rel)
            return
        buf = mapped.read_buffer() if mapped is not None else pa.py_buffer(b"")
        digest = self.pool.submit(lambda: hashlib.sha256(buf).hexdigest()) if entry is not None else None
        if s.kind is not None:
            index, offset = len(self.files), 0
            self.files.append(s.rel)
            try:
                reader = pq.ParquetFile(pa.BufferReader(buf))
                batches = reader.iter_batches(batch_size=BATCH_ROWS, columns=self._columns(s.kind))
                for batch, images, digests in _prefetch(batches):
                    batch = self._valid_utf8(s, batch, offset)
                    self._check_batch(s, batch, offset)
                    self._check_images(s, index, images, digests, batch.column("question").to_pylist(), offset)
                    offset += batch.num_rows
                    bar.update(batch.num_rows)
            except Exception as e:  # noqa: BLE001 - a corrupt page: report where, go on with the next file
                self.c["schema"].fail(f"rows from {offset} on could not be read or checked: {type(e).__name__}: {e}",
                                      file=s.rel, row=offset)
                self.report.notes.append(f"{s.rel}: rows from {offset} on not row-checked (read error)")
            self.report.rows += offset
        if entry is not None:
            self._check_entry(s, entry, digest.result())

    def _check_entry(self, s: _Shard, entry: dict, sha256: str) -> None:
        check = self.c["manifest"]
        check.checked += 1
        size = s.path.stat().st_size
        if sha256 != entry["sha256"]:
            check.fail(f"sha256 {sha256[:16]}… differs from the manifest's {str(entry['sha256'])[:16]}…",
                       file=s.rel, field="sha256")
        elif size != entry["bytes"]:
            check.fail(f"{size} bytes on disk, manifest says {entry['bytes']}", file=s.rel, field="bytes")
        elif s.rel.endswith(".parquet") and s.rows is not None and s.rows != entry.get("rows"):
            check.fail(f"{s.rows} rows in the file, manifest says {entry.get('rows')}", file=s.rel, field="rows")

    @staticmethod
    def _columns(kind: str) -> list[str]:
        cols = ["image", "question", "class1", "class2", "class3", *REQUIRED_TEXT[kind]]
        if kind == "preference":
            cols.append("question_type")
        return list(dict.fromkeys(cols))

    # --- row checks on one record batch ---------------------------------------------------------
    def _valid_utf8(self, s: _Shard, batch: pa.RecordBatch, offset: int) -> pa.RecordBatch:
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

    def _check_batch(self, s: _Shard, batch: pa.RecordBatch, offset: int) -> None:
        """labels, text and chosen_rejected, vectorised over the batch's Arrow columns."""
        n = batch.num_rows
        col = batch.column
        names = batch.schema.names

        # labels: one string per row, looked up in the taxonomy's paths in one call
        labels = self.c["labels"]
        labels.checked += n
        c1, c2, c3 = col("class1"), col("class2"), col("class3")
        if s.folder == UNATTRIBUTED:
            bad = pc.or_(pc.or_(pc.is_valid(c1), pc.is_valid(c2)), pc.is_valid(c3))
        else:
            good = pc.is_in(pc.binary_join_element_wise(c1, c2, c3, _SEP), value_set=self.paths).fill_null(False)
            if s.kind == "preference":
                good = pc.and_(good, pc.equal(c1, self.taxonomy.domain(s.folder).label).fill_null(False))
            bad = pc.invert(good)
        if s.kind == "preference":
            qt = col("question_type")
            bad = pc.or_(bad, pc.invert(pc.or_(pc.is_null(qt), pc.is_in(qt, value_set=self.qtypes).fill_null(False))))
        failed = pc.sum(bad).as_py() or 0
        if failed:
            i = _first_true(bad)
            row = {k: col(k)[i].as_py() for k in ("class1", "class2", "class3", "question_type") if k in names}
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

    def _check_images(self, s: _Shard, index: int, images: list, digests: list, questions: list, offset: int) -> None:
        """Images (once per distinct image), duplicates and leakage: the only per-row Python loop."""
        c_img, c_dup, c_leak = self.c["images"], self.c["duplicates"], self.c["leakage"]
        fresh: dict[bytes, memoryview] = {}  # distinct images not seen before, in row order
        for data, h in zip(images, digests):
            if h is not None and h not in self.images and h not in fresh:
                fresh[h] = data
        problems = dict(zip(fresh, self._map(_image_problem, fresh.values())))

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
            if q is None:
                continue
            c_dup.checked += 1
            key = hashlib.sha256(kind.encode() + h + q.encode("utf-8")).digest()[:16]
            first = self.keys.get(key)
            if first is None:
                self.keys[key] = (index, row)
            else:
                c_dup.fail(f"same image (sha256 {h.hex()[:12]}) and question as {self.files[first[0]]} row {first[1]}",
                           file=s.rel, row=row, field="question")
        c_leak.checked += sum(h is not None for h in digests)  # every row's image is compared with all before it

    def _map(self, fn, items):
        items = list(items)
        if self.full_decode and len(items) > 1:  # PIL decodes without the GIL: use the cores
            return list(self.pool.map(lambda d: fn(d, "full"), items))
        mode = "full" if self.full_decode else "header"
        return [fn(d, mode) for d in items]

    def _label_problem(self, s: _Shard, row: dict) -> tuple[str, str]:
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

    # --- the card -------------------------------------------------------------------------------
    def card_counts(self) -> dict[str, dict[str, int] | None] | None:
        """Compare the card's dataset_info with the files; return config → split → rows from the files."""
        from datasets.data_files import resolve_pattern, sanitize_patterns
        from datasets.info import DatasetInfosDict
        from datasets.utils.metadata import MetadataConfigs
        from huggingface_hub import DatasetCard

        check = self.c["card_counts"]
        readme = self.root / "README.md"
        if not readme.is_file():
            check.checked += 1
            check.fail("README.md missing: no card, so no configs", file="README.md")
            return None
        try:
            card = DatasetCard.load(readme)
            configs = MetadataConfigs.from_dataset_card_data(card.data)
            infos = DatasetInfosDict.from_dataset_card_data(card.data)
        except Exception as e:  # noqa: BLE001 - yaml, ValueError, TypeError from the card parsers
            check.checked += 1
            check.fail(f"card YAML does not parse: {type(e).__name__}: {e}", file="README.md")
            return None
        if not configs:
            check.checked += 1
            check.fail("card YAML declares no configs", file="README.md", field="configs")
            return None
        expected: dict[str, dict[str, int] | None] = {}
        layout = config_data_files(self.taxonomy.slugs)  # what the folder format declares, config by config
        for name, config in configs.items():
            check.checked += 1
            if name not in layout:
                check.fail(f"config {name!r} is not one of the folder format's configs ({', '.join(layout)})",
                           file="README.md", field=f"configs.{name}")
            if not config.get("data_files"):
                check.fail("config declares no data_files", file="README.md", field=f"configs.{name}")
                expected[name] = None  # still loaded by configs_load, with nothing to compare
                continue
            patterns = sanitize_patterns(config["data_files"])
            expected[name] = {}
            for split, globs in patterns.items():
                want = layout.get(name, {}).get(split)
                if name in layout and globs != [want]:
                    check.fail(f"data_files of split {split!r} are {globs}, but the folder format's are "
                               f"{[want] if want else 'none (no such split)'}", file="README.md",
                               field=f"configs.{name}.{split}")
                rows, matched = 0, []
                for glob in globs:
                    try:
                        matched += resolve_pattern(glob, str(self.root))
                    except FileNotFoundError:
                        pass
                for path in dict.fromkeys(matched):
                    rows += self._rows_of(path)
                expected[name][split] = rows
                info = infos.get(name)
                got = info.splits.get(split) if info is not None and info.splits else None
                if info is None:
                    continue
                if got is None:
                    check.fail(f"dataset_info of {name!r} has no split {split!r}", file="README.md",
                               field=f"dataset_info.{name}.splits")
                elif not matched:
                    check.fail(f"data_files {globs} of split {split!r} match no file (dataset_info says "
                               f"{got.num_examples})", file="README.md", field=f"configs.{name}.{split}")
                elif got.num_examples != rows:
                    check.fail(f"num_examples {got.num_examples}, but the {len(set(matched))} files matched by "
                               f"{globs} hold {rows} rows", file="README.md",
                               field=f"dataset_info.{name}.{split}.num_examples")
            if name not in infos:
                check.fail(f"config {name!r} has no dataset_info entry", file="README.md", field=f"dataset_info.{name}")
            elif infos[name].splits and set(infos[name].splits) - set(patterns):
                extra = sorted(set(infos[name].splits) - set(patterns))
                check.fail(f"dataset_info of {name!r} lists splits {extra} that the config has no data_files for",
                           file="README.md", field=f"dataset_info.{name}.splits")
        for name in infos:
            if name not in configs:
                check.checked += 1
                check.fail(f"dataset_info entry {name!r} has no config", file="README.md", field=f"dataset_info.{name}")
        return expected

    def _rows_of(self, path: str) -> int:
        rel = Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        if rel not in self.file_rows:  # matched by a glob but never read: not under data/ or not parquet
            try:
                self.file_rows[rel] = pq.read_metadata(path).num_rows
            except Exception as e:  # noqa: BLE001 - any unreadable file counts as no rows, and says so
                self.c["card_counts"].fail(f"matched by a config's data_files but not readable parquet: "
                                           f"{type(e).__name__}: {e}", file=rel)
                self.file_rows[rel] = 0
        return self.file_rows[rel]


def _load_configs(root: Path, expected: dict[str, dict[str, int] | None], check: Check, progress: bool) -> None:
    """``load_dataset(root, name)`` for every config, as a user would, into a cache that is removed after."""
    import datasets
    from datasets import load_dataset

    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    if not progress:
        datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a failed load is reported in the check, not logged too
    cache = tempfile.mkdtemp(prefix="spa-vl-validate-")
    try:
        for name, want in expected.items():
            check.checked += 1
            try:
                ds = load_dataset(str(root), name, cache_dir=cache)
                got = {split: d.num_rows for split, d in ds.items()}
            except Exception as e:  # noqa: BLE001 - whatever stops a user's load stops the publish
                check.fail(f"load_dataset fails: {_error_text(e)}", file="README.md", field=f"configs.{name}")
                continue
            if want is not None and got != want:
                check.fail(f"load_dataset gives {got}, the files hold {want}", file="README.md", field=f"configs.{name}")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        datasets.logging.set_verbosity(verbosity)
        if bars and not datasets.is_progress_bar_enabled():
            datasets.enable_progress_bars()


def _image_problem(data: bytes, decode: str) -> str | None:
    if len(data) > MAX_IMAGE_BYTES:
        return f"image is {len(data):,} bytes, over the {MAX_IMAGE_BYTES:,}-byte limit"
    try:
        check_image({"bytes": data}, decode=decode)
    except DataError as e:
        return e.message
    return None


def _check_declared_features(schema: pa.Schema, features: Features) -> None:
    """`datasets` trusts the features stored in a shard's schema metadata over its Arrow types: they must agree."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None:
        return  # no metadata: `datasets` infers the features from the Arrow types checked above
    try:
        declared = Features.from_dict(json.loads(raw)["info"]["features"])
    except Exception as e:  # noqa: BLE001 - malformed JSON or feature dicts
        raise DataError(f"schema metadata 'huggingface' does not parse: {type(e).__name__}: {e}") from None
    for name, want in features.items():
        if declared.get(name) != want:
            raise DataError(f"schema metadata 'huggingface' declares {declared.get(name)}, expected {want}", field=name)
    extra = [n for n in declared if n not in features]
    if extra:
        raise DataError("schema metadata 'huggingface' declares an unexpected column", field=extra[0])


def _error_text(e: BaseException, limit: int = 400) -> str:
    """An exception and its causes on one line: `datasets` wraps the useful error (a CastError, say) in another."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen and len(parts) < 4:
        seen.add(id(e))
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        text = lines[0] if len(lines) <= 2 else f"{lines[0]} … {lines[-1]}"
        parts.append(f"{type(e).__name__}: {text[:limit]}")
        e = e.__cause__ or e.__context__
    return "; caused by ".join(parts)


def _first_true(mask: pa.Array) -> int:
    return pc.index(mask, True).as_py()


def _or_all(masks: list[pa.Array]) -> pa.Array:
    out = masks[0]
    for m in masks[1:]:
        out = pc.or_(out, m)
    return out


def _hash_images(batch: pa.RecordBatch) -> tuple[pa.RecordBatch, list, list]:
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


def _prefetch(batches, depth: int = 2):
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
                if not put(_hash_images(b)):
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


def _bar(total: int, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="validate", unit="row", unit_scale=True, disable=not progress,
                file=sys.stderr, leave=False)
