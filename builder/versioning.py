"""Versions of a dataset folder: bump the semantic version, say what changed row by row.

``spa-vl version DIR --bump minor`` sets the new version in ``manifest.json`` and the card, and puts an
entry on top of ``CHANGELOG.md`` with the rows added and removed per config and split, compared by row
id with the previous version, and the build config hash. The previous version's row ids come from
``--previous OTHER_FOLDER`` if given, else from ``DIR/.spa_vl/row_ids.parquet``: the ids recorded at
the last ``version`` or ``publish`` of this folder (a rebuild over the folder keeps that record)::

    result = bump("out/spa_vl", "minor")
    result.version, result.previous_version   # "0.2.0", "0.1.0"
    result.changes[("malicious_use", "train")]   # Change(rows=1204, added=120, removed=3)
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from builder.errors import DataError
from builder.format.folder import (
    CHANGELOG,
    DEFAULT_CONFIG,
    HISTORY_DIR,
    TEST_CONFIG,
    UNATTRIBUTED,
    folder_taxonomy,
    parse_version,
    read_manifest,
)
from dataset_card.stats import shard_key

PARTS = ("patch", "minor", "major")
ROW_IDS = f"{HISTORY_DIR}/row_ids.parquet"
CHANGELOG_HEADER = "# Changelog\n\nEvery version of this dataset, newest first. Row counts are per config and split; added and removed rows are counted by row id.\n"


@dataclass(frozen=True)
class Change:
    rows: int
    added: int
    removed: int


@dataclass
class VersionResult:
    root: Path
    version: str
    previous_version: str | None  # None: no record of a previous version; every row counts as added
    baseline: str  # where the previous row ids came from
    changes: dict[tuple[str, str], Change] = field(default_factory=dict)  # (config, split) → change
    entry: str = ""
    finished_interrupted: bool = False  # this run only finished an earlier bump that crashed

    @property
    def added(self) -> int:
        return sum(c.added for (config, _), c in self.changes.items() if config != DEFAULT_CONFIG)

    @property
    def removed(self) -> int:
        return sum(c.removed for (config, _), c in self.changes.items() if config != DEFAULT_CONFIG)


def bumped(version: str, part: str) -> str:
    if part not in PARTS:
        raise DataError(f"--bump must be one of {', '.join(PARTS)}, not {part!r}", field="bump")
    major, minor, patch = parse_version(version)
    if part == "major":
        return f"{major + 1}.0.0"
    if part == "minor":
        return f"{major}.{minor + 1}.0"
    return f"{major}.{minor}.{patch + 1}"


def row_ids(root: str | Path, manifest: dict | None = None) -> dict[tuple[str, str], set[str]]:
    """(folder under data/, split) → the row ids of the folder's shards (the ``id`` column only)."""
    root = Path(root)
    manifest = manifest if manifest is not None else read_manifest(root)
    out: dict[tuple[str, str], set[str]] = {}
    for rel in sorted(manifest.get("files", {})):
        try:
            ids = pq.read_table(root / rel, columns=["id"]).column("id").to_pylist()
        except (OSError, KeyError, pa.ArrowException) as e:
            raise DataError(f"cannot read the id column: {e}", file=str(root / rel), field="id") from None
        out.setdefault(shard_key(rel), set()).update(ids)
    return out


def recorded_ids(root: str | Path) -> tuple[str, dict[tuple[str, str], set[str]], str | None] | None:
    """The (version, ids, build config hash) recorded at the last ``version`` or ``publish`` of this folder."""
    path = Path(root) / ROW_IDS
    if not path.is_file():
        return None
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    version = meta.get(b"spa_vl_version", b"").decode() or None
    build_hash = meta.get(b"spa_vl_build_config_hash", b"").decode() or None
    out: dict[tuple[str, str], set[str]] = {}
    for folder, split, rid in zip(*(table.column(c).to_pylist() for c in ("folder", "split", "id"))):
        out.setdefault((folder, split), set()).add(rid)
    return version, out, build_hash


def record_ids(root: str | Path, version: str, ids: dict[tuple[str, str], set[str]] | None = None,
               build_config_hash: str | None = None) -> None:
    """Record the folder's row ids as those of ``version`` (the baseline of the next bump)."""
    root = Path(root)
    ids = ids if ids is not None else row_ids(root)
    keys = sorted(ids)
    rows = [(f, s, i) for f, s in keys for i in sorted(ids[(f, s)])]
    table = pa.table({"folder": [r[0] for r in rows], "split": [r[1] for r in rows], "id": [r[2] for r in rows]})
    if build_config_hash is None:
        build_config_hash = read_manifest(root).get("build_config_hash", "")
    table = table.replace_schema_metadata({"spa_vl_version": version, "spa_vl_build_config_hash": build_config_hash})
    path = root / ROW_IDS
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def diff(current: dict[tuple[str, str], set[str]], previous: dict[tuple[str, str], set[str]]) -> dict[tuple[str, str], Change]:
    """Per config and split: rows now, rows added and removed. Domain configs and ``test`` are their folders;
    ``default`` is every preference folder together."""
    out = {}
    for key in sorted(set(current) | set(previous)):
        if key[0] == UNATTRIBUTED:  # not a config: its rows count in `default` only
            continue
        now, before = current.get(key, set()), previous.get(key, set())
        out[key] = Change(len(now), len(now - before), len(before - now))
    for split in ("train", "validation"):
        now = set().union(*(v for (f, s), v in current.items() if s == split and f != TEST_CONFIG))
        before = set().union(*(v for (f, s), v in previous.items() if s == split and f != TEST_CONFIG))
        if now or before:
            out[(DEFAULT_CONFIG, split)] = Change(len(now), len(now - before), len(before - now))
    return out


def bump(root: str | Path, part: str, *, previous: str | Path | None = None, today: _dt.date | None = None,
         render_card: bool = True) -> VersionResult:
    """Bump the version of a dataset folder; see the module docstring."""
    root = Path(root)
    manifest = read_manifest(root)
    old = str(manifest.get("version", "0.0.0"))
    new = bumped(old, part)
    current = row_ids(root, manifest)
    if previous is None and _unfinished(root, manifest):
        # Finish the interrupted bump instead of bumping twice: record its row ids, render its card.
        record_ids(root, old, current, manifest.get("build_config_hash", ""))
        if render_card:
            from dataset_card.card import render_folder_card

            render_folder_card(root, taxonomy=folder_taxonomy(root))
        return VersionResult(root, old, None, "finished an interrupted bump", {}, "", finished_interrupted=True)

    if previous is not None:
        prev_root = Path(previous)
        prev_manifest = read_manifest(prev_root)
        prev_version, prev_ids, baseline = str(prev_manifest.get("version")), row_ids(prev_root, prev_manifest), str(prev_root)
        prev_hash = prev_manifest.get("build_config_hash")
    elif (rec := recorded_ids(root)) is not None:
        prev_version, prev_ids, prev_hash = rec
        baseline = f"{ROW_IDS} (version {prev_version})"
    else:
        prev_version, prev_ids, baseline, prev_hash = None, {}, "none: no earlier version recorded", None
    if prev_version is not None and parse_version(new) <= parse_version(prev_version):
        raise DataError(f"new version {new} is not above the previous version {prev_version}; bump a larger part",
                        file=str(root / "manifest.json"), field="version")

    changes = diff(current, prev_ids)
    result = VersionResult(root, new, prev_version, baseline, changes)
    result.entry = _entry(result, manifest, prev_hash, today or _dt.date.today())

    # Changelog, then manifest, then the row ids (the baseline of the next bump) last. A crash before the
    # manifest is redone by the next run (the entry for the same version is replaced); a crash after it is
    # finished by the next run (see `_unfinished`).
    _prepend_changelog(root / CHANGELOG, new, result.entry)
    manifest["version"] = new
    from dataset_card.card import manifest_bytes, render_folder_card, write_if_changed

    write_if_changed(root / "manifest.json", manifest_bytes(manifest))
    record_ids(root, new, current, manifest.get("build_config_hash", ""))
    if render_card:
        render_folder_card(root, taxonomy=folder_taxonomy(root))
    return result


def _unfinished(root: Path, manifest: dict) -> bool:
    """A bump that wrote its changelog entry and the manifest but not the row ids (it crashed there)."""
    version = str(manifest.get("version"))
    log = root / CHANGELOG
    if not log.is_file() or not log.read_text(encoding="utf-8").split("\n## ", 1)[-1].startswith(f"{version} "):
        return False
    rec = recorded_ids(root)
    return rec is None or rec[0] != version


def _entry(result: VersionResult, manifest: dict, prev_hash: str | None, today: _dt.date) -> str:
    build_hash = manifest.get("build_config_hash", "unknown")
    lines = [f"## {result.version} ({today.isoformat()})", ""]
    if result.previous_version is None:
        lines.append("First recorded version: every row counts as added.")
    else:
        lines.append(f"Compared with {result.previous_version} by row id: **+{result.added:,}** added, "
                     f"**-{result.removed:,}** removed.")
    hash_line = f"Build config hash: `{build_hash}`"
    if prev_hash and prev_hash != build_hash:
        hash_line += f" (was `{prev_hash}`)"
    lines += ["", hash_line + ".", "", "| config | split | rows | added | removed |", "|---|---|---:|---:|---:|"]
    order = {DEFAULT_CONFIG: 0, TEST_CONFIG: 2}
    for (config, split), c in sorted(result.changes.items(), key=lambda kv: (order.get(kv[0][0], 1), kv[0])):
        lines.append(f"| `{config}` | {split} | {c.rows:,} | {c.added:,} | {c.removed:,} |")
    return "\n".join(lines) + "\n"


def _prepend_changelog(path: Path, version: str, entry: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else CHANGELOG_HEADER
    if not text.startswith("# Changelog"):
        text = CHANGELOG_HEADER + "\n" + text
    head, sep, rest = text.partition("\n## ")
    rest = sep.lstrip("\n") + rest if sep else ""
    # A re-run after a crash between the changelog and the manifest replaces its own entry.
    if rest.startswith(f"## {version} "):
        nxt = rest.find("\n## ", 1)
        rest = rest[nxt + 1:] if nxt >= 0 else ""
    new = head.rstrip("\n") + "\n\n" + entry + ("\n" + rest if rest else "")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)

