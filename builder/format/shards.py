"""Parquet shards: ``<split>-0000K-of-0000N.parquet``, rolled over by size, written atomically.

A ``ShardWriter`` holds one row group in memory at a time, so memory is bounded by the row-group
size whatever the number of rows. Shards are written under temporary names and renamed to their
final ``-of-N`` names only when the split is complete: a crash never leaves a file with a final name.
The same rows in the same order give byte-identical files (no timestamps; fixed writer options).

    with ShardWriter(root / "data/malicious_use", "train", PREFERENCE_FEATURES) as w:
        for row in rows:
            w.write(row)
    w.shards   # [Shard(path=..., sha256=..., bytes=..., rows=..., num_bytes=...)]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features

from builder.files import file_digest
from builder.format.layout import shard_name

DEFAULT_MAX_SHARD_BYTES = 500 * 1024 * 1024  # upstream shards are 410-790 MB
DEFAULT_ROW_GROUP_ROWS = 100  # what `datasets` uses for image columns: keeps random access cheap


@dataclass(frozen=True)
class Shard:
    path: Path
    sha256: str
    bytes: int  # size of the parquet file
    rows: int
    num_bytes: int  # Arrow (uncompressed) size, as `datasets` reports in dataset_info


def arrow_schema(features: Features) -> pa.Schema:
    """The Arrow schema with the `datasets` features stored in its metadata, as `datasets` writes it."""
    meta = {"huggingface": json.dumps({"info": {"features": features.to_dict()}}, sort_keys=True)}
    return features.arrow_schema.with_metadata(meta)


class ShardWriter:
    """Stream rows (dicts in the features' storage form) into size-bounded parquet shards."""

    def __init__(
        self,
        directory: str | Path,
        split: str,
        features: Features,
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    ):
        if max_shard_bytes <= 0 or row_group_rows <= 0:
            raise ValueError("max_shard_bytes and row_group_rows must be positive")
        self.directory = Path(directory)
        self.split = split
        self.features = features
        self.schema = arrow_schema(features)
        self.max_shard_bytes = max_shard_bytes
        self.row_group_rows = row_group_rows
        self.shards: list[Shard] = []
        self._buffer: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._parts: list[tuple[Path, int, int]] = []  # (temp path, rows, arrow bytes)
        self._rows = self._num_bytes = 0
        self._closed = False

    # --- writing -------------------------------------------------------------------------
    def write(self, row: dict) -> None:
        self._buffer.append(row)
        if len(self._buffer) >= self.row_group_rows:
            self._flush()

    def write_table(self, table: pa.Table) -> None:
        """Write rows already in Arrow form (cast to the schema), one row group at a time."""
        self._flush()
        table = table.select(self.schema.names).cast(self.schema)
        for batch in table.to_batches(max_chunksize=self.row_group_rows):
            self._write_rows(pa.Table.from_batches([batch], schema=self.schema))

    def _flush(self) -> None:
        if self._buffer:
            table = pa.Table.from_pylist(self._buffer, schema=self.schema)
            self._buffer = []
            self._write_rows(table)

    def _write_rows(self, table: pa.Table) -> None:
        if self._writer is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f".{self.split}-{len(self._parts):05d}.parquet.tmp"
            self._writer = _open_writer(path, self.schema)
            self._parts.append((path, 0, 0))
        self._writer.write_table(table, row_group_size=self.row_group_rows)
        path, rows, nbytes = self._parts[-1]
        self._parts[-1] = (path, rows + table.num_rows, nbytes + table.nbytes)
        self._rows += table.num_rows
        self._num_bytes += table.nbytes
        if self._parts[-1][2] >= self.max_shard_bytes:
            self._writer.close()
            self._writer = None

    # --- finishing -----------------------------------------------------------------------
    def close(self) -> list[Shard]:
        """Finish the split: rename the parts to their final names and return their records.

        A split with no rows gets no file (`datasets` cannot load a declared split with no rows).
        """
        if self._closed:
            return self.shards
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        n = len(self._parts)
        for k, (tmp, rows, nbytes) in enumerate(self._parts):
            final = self.directory / shard_name(self.split, k, n)
            os.replace(tmp, final)
            self.shards.append(Shard(final, file_digest(final), final.stat().st_size, rows, nbytes))
        self._closed = True
        return self.shards

    def abort(self) -> None:
        """Drop everything written so far (temp parts included)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for tmp, _, _ in self._parts:
            tmp.unlink(missing_ok=True)
        self._parts, self._buffer, self._closed = [], [], True

    @property
    def rows(self) -> int:
        return self._rows + len(self._buffer)

    @property
    def num_bytes(self) -> int:
        return self._num_bytes

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _open_writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    # Fixed options so that output bytes depend on the rows alone. Content-defined chunking keeps
    # pages stable across versions, so the Hub's Xet storage deduplicates unchanged rows.
    return pq.ParquetWriter(
        path,
        schema,
        compression="zstd",
        write_statistics=True,
        use_content_defined_chunking=True,
        write_page_index=True,
    )
