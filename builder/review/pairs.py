"""The pairs a review shows: read from a dataset folder, or from a run directory before ``spa-vl build``.

A pair is what the judge decided: an image, a question and two answers, ``chosen`` being the judge's
pick. Sampling and the report need only the light fields (``PairLabels``); the page needs the texts
of the sampled pairs and their images, read on demand so that memory stays bounded by the sample::

    source = open_source("out/spa_vl")          # or a run directory: runs/r1
    labels = source.labels()                      # every preference pair of train + validation
    source.texts([labels[0].id]), source.image(labels[0].id)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from tqdm.auto import tqdm

from builder.errors import DataError
from builder.format.layout import DEFAULT_CONFIG, PREFERENCE_SPLITS, TEST_CONFIG
from builder.format.manifest import DatasetFolder
from builder.taxonomy import Taxonomy

_LABEL_COLUMNS = ("id", "class1", "class2", "class3", "question_type", "question",
                  "question_unsafe", "chosen_unsafe", "rejected_unsafe")


@dataclass(frozen=True)
class PairLabels:
    """What sampling and the report know of a pair: no answers, no image, no model names."""

    id: str
    class1: str | None
    class2: str | None
    class3: str | None
    question_type: str | None
    question: str
    question_unsafe: bool | None = None
    chosen_unsafe: bool | None = None
    rejected_unsafe: bool | None = None


@dataclass(frozen=True)
class PairText:
    question: str
    chosen: str
    rejected: str


def open_source(root: str | Path) -> "FolderSource | RunSource":
    """A dataset folder (``manifest.json``) or a run directory (``run.sqlite`` + ``config.yaml``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("no such folder", file=str(root))
    if (root / "manifest.json").is_file():
        return FolderSource(root)
    if (root / "run.sqlite").is_file() and (root / "config.yaml").is_file():
        return RunSource(root)
    raise DataError("neither a dataset folder (manifest.json) nor a run directory (run.sqlite, config.yaml)",
                    file=str(root))


def check_config(config: str | None, taxonomy: Taxonomy) -> str | None:
    """None or ``default`` for every domain, else a domain config of the taxonomy (a DataError otherwise)."""
    if config in (None, DEFAULT_CONFIG):
        return None
    if config not in taxonomy.slugs:
        raise DataError(f"unknown config {config!r}; expected default or one of {', '.join(taxonomy.slugs)}",
                        field="config")
    return config


class FolderSource:
    """Preference pairs (train and validation) of a dataset folder's shards, located by file and row."""

    kind = "folder"

    def __init__(self, root: Path):
        self.root = root
        self.folder = DatasetFolder.open(root)
        self.manifest, self.taxonomy = self.folder.manifest, self.folder.taxonomy
        self.version = str(self.manifest.get("version", ""))
        self._where: dict[str, tuple[str, int]] = {}  # id -> (file relative to root, row in file)
        self._files: dict[str, pq.ParquetFile] = {}
        self._lock = threading.Lock()

    def _shards(self, config: str | None) -> list[str]:
        return sorted(rel for (folder, split), rels in self.folder.shards.items() for rel in rels
                      if folder != TEST_CONFIG and split in PREFERENCE_SPLITS and config in (None, folder))

    def labels(self, config: str | None = None) -> list[PairLabels]:
        out = []
        shards = self._shards(config)
        for rel in tqdm(shards, desc="review: reading pairs", unit="shard", disable=len(shards) < 20, leave=False):
            names = set(pq.read_schema(self.root / rel).names)
            table = pq.read_table(self.root / rel, columns=[c for c in _LABEL_COLUMNS if c in names])
            for i, row in enumerate(table.to_pylist()):
                if row["id"] in self._where:
                    continue  # a duplicate row (validate reports it): review it once
                self._where[row["id"]] = (rel, i)
                out.append(PairLabels(**{c: row.get(c) for c in _LABEL_COLUMNS}))
        return out

    def texts(self, ids: list[str]) -> dict[str, PairText]:
        if not self._where:
            self.labels()  # index every pair: a sample drawn earlier may come from any config
        by_file: dict[str, list[tuple[str, int]]] = {}
        for pid in ids:
            if pid in self._where:
                rel, i = self._where[pid]
                by_file.setdefault(rel, []).append((pid, i))
        out = {}
        for rel, wanted in by_file.items():
            table = pq.read_table(self.root / rel, columns=["question", "chosen", "rejected"])
            rows = table.take([i for _, i in wanted]).to_pylist()
            out.update({pid: PairText(**row) for (pid, _), row in zip(wanted, rows)})
        return out

    def image(self, pair_id: str) -> bytes:
        rel, row = self._where[pair_id]
        with self._lock:  # one ParquetFile per shard, shared by the server's threads
            pf = self._files.get(rel) or self._files.setdefault(rel, pq.ParquetFile(self.root / rel))
            group, offset = 0, row
            while offset >= pf.metadata.row_group(group).num_rows:
                offset -= pf.metadata.row_group(group).num_rows
                group += 1
            cell = pf.read_row_group(group, columns=["image"]).column("image")[offset].as_py()
        return cell["bytes"]

    def close(self) -> None:
        self._files.clear()


class RunSource:
    """The pairs ``spa-vl build`` would write from a run store, with the ids it would give them
    (:func:`builder.generate.folder_build.iter_pairs`: the same selection, the same rows)."""

    kind = "run"

    def __init__(self, root: Path):
        from builder.generate.config import RunSnapshot
        from builder.generate.run_store import RunStore

        self.root = root
        self.snapshot = RunSnapshot.read(root)
        self.taxonomy = Taxonomy.load(self.snapshot.taxonomy)
        self.version = ""
        self._store = RunStore(root)
        self._lock = threading.Lock()
        self._pairs: dict[str, tuple[PairLabels, PairText, str]] = {}  # id -> labels, texts, unit id

    def labels(self, config: str | None = None) -> list[PairLabels]:
        from builder.generate.folder_build import iter_pairs

        self._pairs.clear()
        for unit, row in iter_pairs(self._store, self.snapshot):
            if config not in (None, self.taxonomy.slug_for(unit["class1"])):
                continue
            labels = PairLabels(row["id"], unit["class1"], unit["class2"], unit["class3"], row["question_type"],
                                row["question"], row["question_unsafe"], row["chosen_unsafe"], row["rejected_unsafe"])
            self._pairs[row["id"]] = (labels, PairText(row["question"], row["chosen"], row["rejected"]), unit["id"])
        return [labels for labels, _, _ in self._pairs.values()]

    def texts(self, ids: list[str]) -> dict[str, PairText]:
        if not self._pairs:
            self.labels()
        return {pid: self._pairs[pid][1] for pid in ids if pid in self._pairs}

    def image(self, pair_id: str) -> bytes:
        with self._lock:
            return self._store.image_data(self._pairs[pair_id][2])

    def close(self) -> None:
        self._store.close()


def describe(source: "FolderSource | RunSource") -> dict:
    """What the report says the verdicts were given on."""
    out = {"kind": source.kind}
    if source.kind == "folder":
        out.update(version=source.version, build_config_hash=source.manifest.get("build_config_hash"))
    return out
