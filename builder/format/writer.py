"""Write a dataset folder from rows, atomically: ``DatasetFolderWriter``.

Every row passes ``check_row`` first and goes to the shards of its domain folder (``builder.format.layout``
says where). The folder is assembled in a temporary sibling (``builder.files.built_beside``) and renamed
into place only when complete, so bad input leaves no output folder behind. The writer writes files and
renders nothing: a command that wants the card passes the renderer as ``finish``, which runs on the
finished temporary folder before the swap::

    with DatasetFolderWriter("out/spa_vl", build_config={"source": "fixture"}, finish=render_folder_card) as w:
        w.add(row, "train")
    w.summary   # FolderSummary(rows={('malicious_use', 'train'): 120, ...}, ...)
    w.summary.folder   # the DatasetFolder at out/spa_vl
"""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from builder.errors import DataError
from builder.files import built_beside
from builder.format.layout import (
    CHANGELOG,
    DATA_DIR,
    EVAL_SPLITS,
    FORMAT,
    HISTORY_DIR,
    MANIFEST,
    PREFERENCE_SPLITS,
    REVIEW_DIR,
    TAXONOMY_FILE,
    TEST_CONFIG,
    UNATTRIBUTED,
)
from builder.format.manifest import DatasetFolder, build_config_hash, manifest_bytes, parse_version, read_manifest
from builder.format.output import prepare_output, raise_write_error
from builder.format.schema import EVAL_FEATURES, PREFERENCE_FEATURES, check_row
from builder.format.shards import DEFAULT_MAX_SHARD_BYTES, DEFAULT_ROW_GROUP_ROWS, ShardWriter
from builder.taxonomy import Taxonomy


@dataclass
class FolderSummary:
    root: Path
    rows: dict[tuple[str, str], int]  # (folder under data/, split) → rows
    config_rows: dict[str, dict[str, int]]  # config → split → rows, as `load_dataset` returns them
    files: int
    bytes: int
    by_category: Counter = field(default_factory=Counter)  # (class1, class2, split) → rows
    question_types: Counter = field(default_factory=Counter)
    folder: DatasetFolder | None = None  # the folder written, at ``root``

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


class DatasetFolderWriter:
    """Write a dataset folder atomically. Use as a context manager; ``add`` rows, in any order."""

    def __init__(
        self,
        out: str | Path,
        *,
        taxonomy: Taxonomy | None = None,
        build_config: dict | None = None,
        version: str = "0.1.0",
        card: dict | None = None,
        overwrite: bool = False,
        inputs: tuple = (),
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
        decode: str | None = "header",
        finish: Callable[[DatasetFolder], object] | None = None,
    ):
        """``inputs``: the paths the rows come from; ``--overwrite`` never replaces a folder that holds one.
        ``card``: the card's options (title, description, ...), kept in the manifest. ``finish``: called with
        the finished folder (still at its temporary root) before it is renamed into place, e.g. the card
        renderer; what it raises leaves no folder."""
        self.out = Path(out)
        self.taxonomy = taxonomy or Taxonomy.load()
        self.build_config = build_config or {}
        self.version = version
        self.card = card or {}
        self.decode = decode
        self.finish = finish
        self._shard_opts = {"max_shard_bytes": max_shard_bytes, "row_group_rows": row_group_rows}
        prepare_output(self.out, kind="dataset", inputs=(*inputs, self.taxonomy.source), overwrite=overwrite)
        previous = _existing_version(self.out)
        if previous and previous > parse_version(self.version):
            self.version = ".".join(map(str, previous))  # a rebuild over a released folder keeps its version; `spa-vl version` bumps it
        self._building = built_beside(self.out)
        self._tmp: Path | None = None
        self._writers: dict[tuple[str, str], ShardWriter] = {}
        self._by_category: Counter = Counter()
        self._question_types: Counter = Counter()
        self.summary: FolderSummary | None = None

    # --- rows ------------------------------------------------------------------------------
    def add(self, row: dict, split: str, *, file: str | None = None, index: int | None = None) -> None:
        """Check a row and route it to its domain folder. ``file``/``index`` locate errors in the input."""
        if split in PREFERENCE_SPLITS:
            kind, features = "preference", PREFERENCE_FEATURES
        elif split in EVAL_SPLITS:
            kind, features = "eval", EVAL_FEATURES
        else:
            raise ValueError(f"unknown split {split!r}; expected one of {PREFERENCE_SPLITS + EVAL_SPLITS}")
        try:
            check_row(row, kind, self.taxonomy, allow_unattributed=(split == "train"), decode=self.decode)
        except DataError as e:
            raise e.located(file=file, row=index) from None
        if kind == "eval":
            folder = TEST_CONFIG
        else:
            folder = self.taxonomy.slug_for(row.get("class1")) or UNATTRIBUTED
            if row.get("question_type"):
                self._question_types[(row["question_type"], split)] += 1
        self._by_category[(row.get("class1"), row.get("class2"), split)] += 1
        self._writer(folder, split, features).write(row)

    def _writer(self, folder: str, split: str, features) -> ShardWriter:
        key = (folder, split)
        if key not in self._writers:
            self._writers[key] = ShardWriter(self._tmp / DATA_DIR / folder, split, features, **self._shard_opts)
        return self._writers[key]

    # --- finishing ---------------------------------------------------------------------------
    def __enter__(self) -> "DatasetFolderWriter":
        try:
            self._tmp = self._building.__enter__()
        except OSError as e:
            raise DataError(f"cannot create the output folder: {e.strerror or e}", file=str(self.out)) from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            for w in self._writers.values():
                w.abort()
            self._building.__exit__(exc_type, exc, tb)  # removes the temporary folder
            raise_write_error(exc, self.out)
            return
        try:
            folder = self._finish()
        except BaseException as e:
            self._building.__exit__(type(e), e, e.__traceback__)
            raise_write_error(e, self.out)
            raise
        try:
            self._building.__exit__(None, None, None)  # the swap into place
        except BaseException as e:
            raise_write_error(e, self.out)
            raise
        self.summary = self._summary(folder.moved_to(self.out))

    def _finish(self) -> DatasetFolder:
        """Close the shards, write the manifest and the taxonomy, carry the history over, run ``finish``."""
        files = {}
        for key in sorted(self._writers):
            for s in self._writers[key].close():
                files[s.path.relative_to(self._tmp).as_posix()] = {
                    "sha256": s.sha256, "bytes": s.bytes, "rows": s.rows, "num_bytes": s.num_bytes}
        if not files:
            raise DataError("no rows to write", file=str(self.out))
        manifest = {
            "format": FORMAT,
            "version": self.version,
            "build_config_hash": build_config_hash(self.build_config),
            "build_config": self.build_config,
            "card": self.card,
            "taxonomy": {"name": self.taxonomy.name, "sha256": self.taxonomy.sha256, "file": TAXONOMY_FILE},
            "files": dict(sorted(files.items())),
        }
        self._write_taxonomy()
        raw = manifest_bytes(manifest)
        (self._tmp / MANIFEST).write_bytes(raw)
        self._carry_over_history()
        folder = DatasetFolder(self._tmp, manifest, self.taxonomy, raw)
        if self.finish is not None:
            self.finish(folder)
        return folder

    def _summary(self, folder: DatasetFolder) -> FolderSummary:
        return FolderSummary(
            root=self.out,
            rows={k: v["rows"] for k, v in folder.shard_totals.items()},
            config_rows={c: {s: v["rows"] for s, v in splits.items()} for c, splits in folder.config_splits().items()},
            files=len(folder.files),
            bytes=sum(f["bytes"] for f in folder.files.values()),
            by_category=self._by_category,
            question_types=self._question_types,
            folder=folder,
        )

    def _write_taxonomy(self) -> None:
        """The taxonomy's file byte for byte, so that its sha256 is the manifest's."""
        data = Path(self.taxonomy.source).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.taxonomy.sha256:
            raise DataError("the taxonomy file changed while the folder was written", file=self.taxonomy.source)
        (self._tmp / TAXONOMY_FILE).write_bytes(data)

    def _carry_over_history(self) -> None:
        """Rebuilding over a folder keeps its history: ``CHANGELOG.md``, the released row ids under
        ``.spa_vl/`` (what ``spa-vl version`` diffs against), its review, and its version, which never goes back."""
        if not (self.out / MANIFEST).is_file():
            return
        for name in (CHANGELOG, HISTORY_DIR, REVIEW_DIR):
            src = self.out / name
            if src.is_dir():
                shutil.copytree(src, self._tmp / name)
            elif src.is_file():
                shutil.copy2(src, self._tmp / name)


def _existing_version(root: Path) -> tuple[int, int, int] | None:
    try:
        return parse_version(read_manifest(root)["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
