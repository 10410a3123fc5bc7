"""A folder's local history: the row ids of its last released version, in ``.spa_vl/row_ids.parquet``.

``spa-vl version`` compares the folder's rows with them by id (rows added, removed), and both ``version``
and ``publish`` record them as the baseline of the next bump. The history stays local: it is never
published, and a rebuild over the folder keeps it::

    record_ids(folder, "0.2.0")                    # the folder's row ids, as version 0.2.0's
    version, ids, build_hash = recorded_ids(root)  # ids: (folder under data/, split) → {row id, ...}
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from builder.errors import DataError
from builder.files import atomic_write
from builder.format.layout import HISTORY_DIR
from builder.format.manifest import DatasetFolder

ROW_IDS = f"{HISTORY_DIR}/row_ids.parquet"
RowIds = dict[tuple[str, str], set[str]]  # (folder under data/, split) → row ids


def row_ids(folder: DatasetFolder) -> RowIds:
    """(folder under data/, split) → the row ids of the folder's shards (the ``id`` column only)."""
    out: RowIds = {}
    for key, rels in folder.shards.items():
        for rel in rels:
            path = folder.root / rel
            try:
                ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
            except (OSError, KeyError, pa.ArrowException) as e:
                raise DataError(f"cannot read the id column: {e}", file=str(path), field="id") from None
            out.setdefault(key, set()).update(ids)
    return out


def recorded_ids(root: str | Path) -> tuple[str | None, RowIds, str | None] | None:
    """The (version, ids, build config hash) recorded at the last ``version`` or ``publish`` of this folder."""
    path = Path(root) / ROW_IDS
    if not path.is_file():
        return None
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    version = meta.get(b"spa_vl_version", b"").decode() or None
    build_hash = meta.get(b"spa_vl_build_config_hash", b"").decode() or None
    out: RowIds = {}
    for folder, split, rid in zip(*(table.column(c).to_pylist() for c in ("folder", "split", "id"))):
        out.setdefault((folder, split), set()).add(rid)
    return version, out, build_hash


def record_ids(folder: DatasetFolder, version: str, ids: RowIds | None = None) -> None:
    """Record the folder's row ids (``ids``, else read from its shards) as those of ``version``: the baseline
    of the next bump."""
    ids = ids if ids is not None else row_ids(folder)
    rows = [(f, s, i) for f, s in sorted(ids) for i in sorted(ids[(f, s)])]
    table = pa.table({"folder": [r[0] for r in rows], "split": [r[1] for r in rows], "id": [r[2] for r in rows]})
    table = table.replace_schema_metadata({"spa_vl_version": version,
                                           "spa_vl_build_config_hash": folder.build_config_hash})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    path = folder.root / ROW_IDS
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())
