"""A dataset folder's ``manifest.json``, and ``DatasetFolder``: the folder as one value, read once.

The manifest lists every data file (sha256, bytes, rows, Arrow bytes), the version, the build config
and its hash, the card's options and the taxonomy the folder was built with. It is written one way
only (``manifest_bytes``). ``DatasetFolder`` is what validate, the card, version, publish, pull, the
importer and build take and pass on: the root, the parsed manifest, the folder's taxonomy, and the
views of them every consumer needs, so that nobody reads ``manifest.json`` a second time::

    folder = DatasetFolder.open("out/spa_vl")
    folder.version, folder.shards[("malicious_use", "train")]   # "0.1.0", ["data/malicious_use/train-..."]
    folder.config_splits()["test"]["harm"]["rows"]              # 265
    folder = folder.write_manifest({**folder.manifest, "version": "0.2.0"})
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from builder.errors import DataError
from builder.files import atomic_write
from builder.format.layout import (
    DEFAULT_CONFIG,
    EVAL_SPLITS,
    MANIFEST,
    PREFERENCE_SPLITS,
    TAXONOMY_FILE,
    TEST_CONFIG,
    config_folders,
    shard_key,
)
from builder.taxonomy import Taxonomy

_TOTALS = ("rows", "bytes", "num_bytes")


def manifest_bytes(manifest: dict) -> bytes:
    """The one serialization of a manifest: sorted keys, two-space indent, a final newline."""
    return (json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n").encode()


def parse_manifest(data: bytes, path: str) -> dict:
    """The manifest in ``data`` (the bytes of ``path``); a DataError naming ``path`` unless it is a JSON object."""
    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise DataError(f"manifest is not valid JSON: {e}", file=path) from None
    if not isinstance(manifest, dict):
        raise DataError(f"manifest must be a JSON object, got {type(manifest).__name__}", file=path)
    return manifest


def read_manifest(root: str | Path) -> dict:
    """``root/manifest.json``, parsed; a DataError when it is missing or not a JSON object."""
    return parse_manifest(_manifest_data(Path(root)), str(Path(root) / MANIFEST))


def _manifest_data(root: Path) -> bytes:
    try:
        return (root / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise DataError("not a spa-vl dataset folder: manifest.json missing", file=str(root / MANIFEST)) from None


def build_config_hash(build_config: dict) -> str:
    return hashlib.sha256(json.dumps(build_config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parse_version(text: str) -> tuple[int, int, int]:
    """``"1.2.3"`` (or ``"v1.2.3"``) → (1, 2, 3); a DataError for anything else."""
    parts = str(text).removeprefix("v").split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise DataError(f"not a semantic version X.Y.Z: {text!r}", field="version")
    return tuple(int(p) for p in parts)


def folder_taxonomy(root: str | Path, manifest: dict | None = None) -> Taxonomy:
    """The taxonomy a folder was built with: its ``taxonomy.yaml``, which must be the file the manifest names
    (same sha256). A folder written before folders carried their taxonomy gets the shipped one.
    ``manifest``: the folder's, parsed; without it the manifest is read (an unreadable one names nothing)."""
    path = Path(root) / TAXONOMY_FILE
    if not path.is_file():
        return Taxonomy.load()
    taxonomy = Taxonomy.load(path)
    if manifest is None:
        try:
            manifest = read_manifest(root)
        except DataError:
            manifest = {}  # the command that reads the manifest reports it
    recorded = manifest.get("taxonomy")
    if isinstance(recorded, dict) and recorded.get("sha256") not in (None, taxonomy.sha256):
        raise DataError(f"differs from the taxonomy the folder was built with (sha256 {str(recorded['sha256'])[:12]} "
                        f"in manifest.json, {taxonomy.sha256[:12]} on disk); restore it or rebuild the folder",
                        file=str(path), field="taxonomy")
    return taxonomy


@dataclass(frozen=True, eq=False)
class DatasetFolder:
    """A dataset folder as one value: its root, its parsed manifest and its taxonomy, read once.

    ``raw`` is ``manifest.json`` byte for byte as read (or as written by this value), so that hashing or
    uploading it needs no second read. ``problems`` (only from ``open(..., lenient=True)``, which
    ``validate`` uses to report a broken folder instead of stopping): file name → the error that file
    gave; the manifest is then ``{}`` and the taxonomy the shipped one.
    """

    root: Path
    manifest: dict
    taxonomy: Taxonomy
    raw: bytes = b""
    problems: dict[str, DataError] = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | Path, *, lenient: bool = False) -> "DatasetFolder":
        """Read ``root/manifest.json`` and the folder's taxonomy; a DataError for a folder that is not one
        (with ``lenient``, only for a missing root: the rest is kept in ``problems``)."""
        root = Path(root)
        if not root.is_dir():
            raise DataError("dataset folder not found" if not root.exists() else "not a folder", file=str(root))
        problems, manifest, raw = {}, {}, b""
        try:
            raw = _manifest_data(root)
            manifest = parse_manifest(raw, str(root / MANIFEST))
        except DataError as e:
            if not lenient:
                raise
            problems[MANIFEST] = e
        try:
            taxonomy = folder_taxonomy(root, manifest)
        except DataError as e:
            if not lenient:
                raise
            problems[TAXONOMY_FILE], taxonomy = e, Taxonomy.load()
        return cls(root, manifest, taxonomy, raw, problems)

    @classmethod
    def of(cls, folder: "DatasetFolder | str | Path", *, lenient: bool = False) -> "DatasetFolder":
        """``folder`` itself, or the folder at that path opened (for callers that hold only a path)."""
        return folder if isinstance(folder, DatasetFolder) else cls.open(folder, lenient=lenient)

    def write_manifest(self, manifest: dict) -> "DatasetFolder":
        """Make ``manifest`` this folder's ``manifest.json`` (written only when its bytes change); the folder
        with it."""
        data = manifest_bytes(manifest)
        if data != self.raw:
            atomic_write(self.root / MANIFEST, data)
        return replace(self, manifest=manifest, raw=data)

    def moved_to(self, root: str | Path) -> "DatasetFolder":
        """The same folder at ``root`` (once renamed into place)."""
        return replace(self, root=Path(root))

    # --- what the manifest says ---------------------------------------------------------------------
    @property
    def version(self) -> str:
        return str(self.manifest.get("version", "0.0.0"))

    @property
    def build_config(self) -> dict:
        return self.manifest.get("build_config") or {}

    @property
    def build_config_hash(self) -> str:
        return str(self.manifest.get("build_config_hash", ""))

    @property
    def card_options(self) -> dict:
        return self.manifest.get("card") or {}

    @property
    def files(self) -> dict[str, dict]:
        """Every listed data file: path relative to the root → {sha256, bytes, rows, num_bytes}."""
        files = self.manifest.get("files")
        return files if isinstance(files, dict) else {}

    # --- derived views --------------------------------------------------------------------------------
    @cached_property
    def shards(self) -> dict[tuple[str, str], list[str]]:
        """(folder under data/, split) → its shards (paths relative to the root), in name order."""
        out: dict[tuple[str, str], list[str]] = {}
        for rel in sorted(self.files):
            out.setdefault(shard_key(rel), []).append(rel)
        return out

    @cached_property
    def shard_totals(self) -> dict[tuple[str, str], dict[str, int]]:
        """(folder under data/, split) → {rows, bytes, num_bytes} summed over its shards, from the manifest."""
        return {key: {k: sum(int(self.files[rel].get(k, 0)) for rel in rels) for k in _TOTALS}
                for key, rels in self.shards.items()}

    @property
    def total_rows(self) -> int:
        return sum(v["rows"] for v in self.shard_totals.values())

    def config_splits(self) -> dict[str, dict[str, dict]]:
        """config → split → {rows, bytes, num_bytes, files} for the configs (of the folder's taxonomy) and
        splits that hold rows. Empty splits and configs are left out: ``datasets`` cannot load a declared
        split with no rows."""
        folders = [f for f, _ in self.shard_totals]
        out: dict[str, dict[str, dict]] = {}
        for config in (DEFAULT_CONFIG, *self.taxonomy.slugs, TEST_CONFIG):
            for split in EVAL_SPLITS if config == TEST_CONFIG else PREFERENCE_SPLITS:
                keys = [(f, split) for f in config_folders(config, folders) if (f, split) in self.shard_totals]
                total = {k: sum(self.shard_totals[key][k] for key in keys) for k in _TOTALS}
                if total["rows"]:
                    out.setdefault(config, {})[split] = {**total, "files": [r for key in keys for r in self.shards[key]]}
        return out
