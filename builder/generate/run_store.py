"""The run store: everything a pipeline run has paid for, in one sqlite file under the run directory.

``RUN_DIR/run.sqlite`` holds the request cache (``requests``, with the run session that stored each reply)
and stage markers (``marks``), the collected images (``images``) and one record per work unit (``units``).
Every write commits on its own (WAL), so a SIGKILL loses at most the call in flight, and re-running the
same command resumes from here.

Example::

    store = RunStore("runs/r1")
    store.put_unit({"id": sha, "status": "done", ...})
    [u["status"] for u in store.units()]
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from builder.generate.request_cache import RequestCache


class RunStore(RequestCache):
    def __init__(self, run_dir, session: str | None = None):
        """``session``: the run this connection stores replies for (a Ray actor shares the driver's)."""
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        super().__init__(self.dir / "run.sqlite", session=session)
        db = self._db
        db.execute("CREATE TABLE IF NOT EXISTS images (sha256 TEXT PRIMARY KEY, ord INTEGER, meta TEXT, data BLOB)")
        db.execute("CREATE TABLE IF NOT EXISTS units (id TEXT PRIMARY KEY, status TEXT, record TEXT)")

    # --- images (the work units' inputs) ------------------------------------------------------------
    def add_images(self, images: list, tag: str) -> None:
        """Store collected images (``builder.generate.images.CollectedImage``) of one collection ``tag``, in one transaction."""
        with self._db:
            self._db.execute("BEGIN")
            for img in images:
                meta = {**{k: v for k, v in asdict(img).items() if k != "data"}, "tag": tag}
                self._db.execute("INSERT OR REPLACE INTO images VALUES (?, NULL, ?, ?)", (img.sha256, json.dumps(meta), img.data))

    def tagged(self, tag: str) -> list[dict]:
        """Metadata (no bytes) of the images stored under ``tag``."""
        rows = self._db.execute("SELECT meta FROM images").fetchall()
        return [m for m in (json.loads(r[0]) for r in rows) if m.get("tag") == tag]

    def set_order(self, shas: list[str]) -> None:
        """These images, in this order, are the run's work units; any other stored image is not."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("UPDATE images SET ord = NULL")
            self._db.executemany("UPDATE images SET ord = ? WHERE sha256 = ?", [(i, sha) for i, sha in enumerate(shas)])

    def images(self) -> list[dict]:
        """The work units' image metadata (without the bytes), in work-unit order."""
        rows = self._db.execute("SELECT meta FROM images WHERE ord IS NOT NULL ORDER BY ord").fetchall()
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

