"""The run store: everything a pipeline run has paid for, in one sqlite file under the run directory.

``RUN_DIR/run.sqlite`` holds the request cache (``requests``), the collected images (``images``), one
record per work unit (``units``) and stage markers (``marks``). Every write commits on its own (WAL),
so a SIGKILL loses at most the call in flight, and re-running the same command resumes from here.

Example::

    store = RunStore("runs/r1")
    store.put_unit({"id": sha, "status": "done", ...})
    [u["status"] for u in store.units()]
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from builder.llm import RequestCache


class RunStore(RequestCache):
    def __init__(self, run_dir):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        super().__init__(self.dir / "run.sqlite")
        db = self._db
        db.execute("CREATE TABLE IF NOT EXISTS images (sha256 TEXT PRIMARY KEY, ord INTEGER, meta TEXT, data BLOB)")
        db.execute("CREATE TABLE IF NOT EXISTS units (id TEXT PRIMARY KEY, status TEXT, record TEXT)")
        db.execute("CREATE TABLE IF NOT EXISTS marks (name TEXT PRIMARY KEY, value TEXT)")

    # --- stage markers ------------------------------------------------------------------------------
    def mark(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM marks WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_mark(self, name: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO marks VALUES (?, ?)", (name, value))

    # --- images (the work units' inputs) ------------------------------------------------------------
    def replace_images(self, images: list) -> None:
        """Store the collected images (``builder.images.CollectedImage``) in work-unit order, in one transaction."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM images")
            for i, img in enumerate(images):
                meta = {k: v for k, v in asdict(img).items() if k != "data"}
                self._db.execute("INSERT INTO images VALUES (?, ?, ?, ?)", (img.sha256, i, json.dumps(meta), img.data))

    def images(self) -> list[dict]:
        """Image metadata in work-unit order (without the bytes)."""
        rows = self._db.execute("SELECT meta FROM images ORDER BY ord").fetchall()
        return [json.loads(r[0]) for r in rows]

    def image_data(self, sha256: str) -> bytes:
        return self._db.execute("SELECT data FROM images WHERE sha256 = ?", (sha256,)).fetchone()[0]

    # --- unit records ------------------------------------------------------------------------------
    def put_unit(self, record: dict) -> None:
        self._db.execute("INSERT OR REPLACE INTO units VALUES (?, ?, ?)",
                         (record["id"], record["status"], json.dumps(record, sort_keys=True)))

    def units(self, ids: list[str] | None = None) -> list[dict]:
        rows = self._db.execute("SELECT record FROM units ORDER BY id").fetchall()
        records = [json.loads(r[0]) for r in rows]
        if ids is not None:
            keep = set(ids)
            records = [r for r in records if r["id"] in keep]
        return records
