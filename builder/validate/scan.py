"""One pass over a dataset folder's files: the manifest and schema checks, and every shard's rows.

Each shard is read from disk once: it is memory-mapped, its sha256 is taken from the mapping (in a
thread, while the rows are scanned) and pyarrow reads its record batches from the same mapping, which
``builder.validate.rows`` checks. A shard whose schema is wrong is left out of the row checks (the
report's notes say so).
"""

from __future__ import annotations

import hashlib
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features

from builder.errors import DataError
from builder.format.layout import (
    DATA_DIR,
    EVAL_SPLITS,
    FORMAT,
    MANIFEST,
    PREFERENCE_SPLITS,
    TAXONOMY_FILE,
    TEST_CONFIG,
    UNATTRIBUTED,
    shard_place,
)
from builder.format.manifest import DatasetFolder, parse_version
from builder.format.schema import EVAL_FEATURES, PREFERENCE_FEATURES, REQUIRED_TEXT, check_table_schema
from builder.validate.report import ValidationReport
from builder.validate.rows import RowChecks, ScannedShard, prefetch

BATCH_ROWS = 256  # rows per record batch: ~12 MB of image bytes at SPA-VL sizes
_FEATURES = {"preference": PREFERENCE_FEATURES, "eval": EVAL_FEATURES}
_EXPECTED = {kind: {name: f.arrow_schema.field(name).type for name in f} for kind, f in _FEATURES.items()}
_WHERE = "data/<domain>/<train|validation>-*, data/unattributed/train-* or data/test/<harm|help>-*"


class FolderScan:
    """Fills the manifest and schema checks, and through ``RowChecks`` the row checks."""

    def __init__(self, folder: DatasetFolder, checks: dict, report: ValidationReport, taxonomy, full_decode, pool):
        self.folder, self.root, self.c, self.report, self.taxonomy = folder, folder.root, checks, report, taxonomy
        self.pool = pool
        self.rows = RowChecks(checks, taxonomy, full_decode, pool)
        self.manifest_files: dict[str, dict] = {}
        self.file_rows: dict[str, int] = {}  # rel path → rows, for every parquet file read

    # --- manifest -------------------------------------------------------------------------
    def check_manifest(self) -> None:
        check = self.c["manifest"]
        check.checked += 1
        if MANIFEST in self.folder.problems:
            check.fail(self.folder.problems[MANIFEST].message, file=MANIFEST)
            return
        manifest = self.folder.manifest
        missing = [k for k in ("format", "version", "files") if k not in manifest]
        if missing:
            check.fail(f"manifest has no {', '.join(missing)}", file=MANIFEST, field=missing[0])
        elif manifest["format"] != FORMAT:
            check.fail(f"format {manifest['format']!r} is not {FORMAT!r}", file=MANIFEST, field="format")
        else:
            try:
                parse_version(manifest["version"])
            except DataError:
                check.fail(f"version {manifest['version']!r} is not a semantic version X.Y.Z (publish tags vX.Y.Z)",
                           file=MANIFEST, field="version")
        self._note_taxonomy(manifest.get("taxonomy"))
        files = manifest.get("files")
        if not isinstance(files, dict):
            if not missing:
                check.fail("files must map each path to {sha256, bytes, rows}", file=MANIFEST, field="files")
            return
        for rel, entry in files.items():
            if not isinstance(entry, dict) or not {"sha256", "bytes"} <= set(entry):
                check.fail("entry needs sha256 and bytes (and rows for a parquet file)", file=MANIFEST,
                           field=f"files.{rel}")
                continue
            self.manifest_files[rel] = entry

    def _note_taxonomy(self, built_with) -> None:
        if isinstance(built_with, dict) and built_with.get("sha256") not in (None, self.taxonomy.sha256):
            self.report.notes.append(
                f"built with taxonomy {built_with.get('name')!r} (sha256 {str(built_with['sha256'])[:12]}), checked against "
                f"{self.taxonomy.name!r} (sha256 {self.taxonomy.sha256[:12]}, {self.taxonomy.source}): the folder has no "
                f"{TAXONOMY_FILE} (written before folders carried their taxonomy); rebuild it to check its own labels")

    # --- shards: manifest entries, schema, and every row check ---------------------------------
    def scan_shards(self, progress: bool) -> None:
        data = self.root / DATA_DIR
        on_disk = {p.relative_to(self.root).as_posix() for p in data.rglob("*.parquet") if p.is_file()} \
            if data.is_dir() else set()
        for rel in sorted(on_disk - set(self.manifest_files)):
            self.c["manifest"].checked += 1
            self.c["manifest"].fail("parquet file under data/ is not listed in manifest.json (stray shard)", file=rel)
        listed = sorted(self.manifest_files)
        for rel in listed:
            if not (self.root / rel).is_file():
                self.c["manifest"].checked += 1
                self.c["manifest"].fail("listed in manifest.json but missing", file=rel)
        present = on_disk | {r for r in listed if (self.root / r).is_file()}
        shards = [ScannedShard(rel, self.root / rel) for rel in sorted(present)]

        # footers first: the bar's total, and a schema verdict before any row is read
        for s in shards:
            if s.rel.endswith(".parquet"):
                self._classify(s)
        bar = _bar(sum(s.rows or 0 for s in shards if s.kind), progress)
        try:
            for s in shards:
                self._scan(s, bar)
        finally:
            bar.close()

    def _classify(self, s: ScannedShard) -> None:
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
        folder, split = shard_place(s.rel)
        kind = self._kind(folder, split)
        if kind is None:
            if folder not in (None, TEST_CONFIG, UNATTRIBUTED) and folder not in self.taxonomy.slugs:
                msg = f"folder {folder!r} is not a domain of taxonomy {self.taxonomy.name!r}; expected {_WHERE}"
            else:
                msg = f"shard is outside the layout; expected {_WHERE}"
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

    def _kind(self, folder: str | None, split: str | None) -> str | None:
        """preference or eval for a shard at ``data/<folder>/<split>-*``; None for a place outside the layout."""
        if folder == TEST_CONFIG and split in EVAL_SPLITS:
            return "eval"
        if (folder in self.taxonomy.slugs and split in PREFERENCE_SPLITS) or (folder == UNATTRIBUTED and split == "train"):
            return "preference"
        return None

    def _skip(self, s: ScannedShard, why: str) -> None:
        rows = f"{s.rows:,} rows" if s.rows is not None else "its rows"
        self.report.notes.append(f"{s.rel}: {rows} not row-checked ({why}; see schema)")

    def _scan(self, s: ScannedShard, bar) -> None:
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
            self._scan_rows(s, buf, bar)
        if entry is not None:
            self._check_entry(s, entry, digest.result())

    def _scan_rows(self, s: ScannedShard, buf, bar) -> None:
        index, offset = len(self.rows.files), 0
        self.rows.files.append(s.rel)
        try:
            reader = pq.ParquetFile(pa.BufferReader(buf))
            for hashed in prefetch(reader.iter_batches(batch_size=BATCH_ROWS, columns=_columns(s.kind))):
                n = self.rows.check(s, index, hashed, offset)
                offset += n
                bar.update(n)
        except Exception as e:  # noqa: BLE001 - a corrupt page: report where, go on with the next file
            self.c["schema"].fail(f"rows from {offset} on could not be read or checked: {type(e).__name__}: {e}",
                                  file=s.rel, row=offset)
            self.report.notes.append(f"{s.rel}: rows from {offset} on not row-checked (read error)")
        self.report.rows += offset

    def _check_entry(self, s: ScannedShard, entry: dict, sha256: str) -> None:
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


def _columns(kind: str) -> list[str]:
    cols = ["image", "question", "class1", "class2", "class3", *REQUIRED_TEXT[kind]]
    if kind == "preference":
        cols.append("question_type")
    return list(dict.fromkeys(cols))


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


def _bar(total: int, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="validate", unit="row", unit_scale=True, disable=not progress,
                file=sys.stderr, leave=False)
