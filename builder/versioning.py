"""Versions of a dataset folder: bump the semantic version, say what changed row by row.

``spa-vl version DIR --bump minor`` sets the new version in ``manifest.json`` and the card, and puts an
entry on top of ``CHANGELOG.md`` with the rows added and removed per config and split, compared by row
id with the previous version, and the build config hash. The previous version's row ids come from
``--previous OTHER_FOLDER`` if given, else from ``DIR/.spa_vl/row_ids.parquet``: the ids recorded at
the last ``version`` or ``publish`` of this folder (a rebuild over the folder keeps that record)::

    result = bump(DatasetFolder.open("out/spa_vl"), "minor")
    result.version, result.previous_version   # "0.2.0", "0.1.0"
    result.changes[("malicious_use", "train")]   # Change(rows=1204, added=120, removed=3)
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

from builder.errors import DataError
from builder.files import atomic_write
from builder.format.history import ROW_IDS, RowIds, record_ids, recorded_ids, row_ids
from builder.format.layout import CHANGELOG, DEFAULT_CONFIG, MANIFEST, PREFERENCE_SPLITS, TEST_CONFIG, UNATTRIBUTED, \
    config_folders
from builder.format.manifest import DatasetFolder, parse_version
PARTS = ("patch", "minor", "major")
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


def diff(current: RowIds, previous: RowIds) -> dict[tuple[str, str], Change]:
    """Per config and split: rows now, rows added and removed. Domain configs and ``test`` are their folders;
    ``default`` is every preference folder together (``unattributed`` included)."""
    out = {}
    for key in sorted(set(current) | set(previous)):
        if key[0] == UNATTRIBUTED:  # not a config: its rows count in `default` only
            continue
        now, before = current.get(key, set()), previous.get(key, set())
        out[key] = Change(len(now), len(now - before), len(before - now))
    for split in PREFERENCE_SPLITS:
        now = _union(current, DEFAULT_CONFIG, split)
        before = _union(previous, DEFAULT_CONFIG, split)
        if now or before:
            out[(DEFAULT_CONFIG, split)] = Change(len(now), len(now - before), len(before - now))
    return out


def _union(ids: RowIds, config: str, split: str) -> set[str]:
    """The row ids of one config's split: those of the folders the config reads."""
    return set().union(*(ids[(f, split)] for f in config_folders(config, (f for f, _ in ids)) if (f, split) in ids))


def bump(folder: DatasetFolder | str | Path, part: str, *, previous: DatasetFolder | str | Path | None = None,
         today: _dt.date | None = None, render_card: bool = True) -> VersionResult:
    """Bump the version of a dataset folder; see the module docstring. ``previous``: the folder of the
    previous version to compare with (default: the row ids recorded in this folder)."""
    folder = DatasetFolder.of(folder)
    root = folder.root
    old = folder.version
    new = bumped(old, part)
    current = row_ids(folder)
    if previous is None and _unfinished(folder):
        # Finish the interrupted bump instead of bumping twice: record its row ids, render its card.
        record_ids(folder, old, current)
        if render_card:
            _render_card(folder)
        return VersionResult(root, old, None, "finished an interrupted bump", {}, "", finished_interrupted=True)

    prev_version, prev_ids, baseline, prev_hash = _baseline(folder, previous)
    if prev_version is not None and parse_version(new) <= parse_version(prev_version):
        raise DataError(f"new version {new} is not above the previous version {prev_version}; bump a larger part",
                        file=str(root / MANIFEST), field="version")

    changes = diff(current, prev_ids)
    result = VersionResult(root, new, prev_version, baseline, changes)
    result.entry = _entry(result, folder.manifest, prev_hash, today or _dt.date.today())

    # Changelog, then manifest, then the row ids (the baseline of the next bump) last. A crash before the
    # manifest is redone by the next run (the entry for the same version is replaced); a crash after it is
    # finished by the next run (see `_unfinished`).
    _prepend_changelog(root / CHANGELOG, new, result.entry)
    folder = folder.write_manifest({**folder.manifest, "version": new})
    record_ids(folder, new, current)
    if render_card:
        _render_card(folder)
    return result


def _baseline(folder: DatasetFolder, previous: DatasetFolder | str | Path | None
              ) -> tuple[str | None, RowIds, str, str | None]:
    """(version, row ids, where they came from, build config hash) of the version before this one."""
    if previous is not None:
        prev = DatasetFolder.of(previous)
        return str(prev.manifest.get("version")), row_ids(prev), str(prev.root), prev.manifest.get("build_config_hash")
    rec = recorded_ids(folder.root)
    if rec is not None:
        return rec[0], rec[1], f"{ROW_IDS} (version {rec[0]})", rec[2]
    return None, {}, "none: no earlier version recorded", None


def _render_card(folder: DatasetFolder) -> None:
    from dataset_card.card import render_folder_card  # imports datasets and matplotlib: only when a bump renders

    render_folder_card(folder)


def _unfinished(folder: DatasetFolder) -> bool:
    """A bump that wrote its changelog entry and the manifest but not the row ids (it crashed there)."""
    version = str(folder.manifest.get("version"))
    log = folder.root / CHANGELOG
    if not log.is_file() or not log.read_text(encoding="utf-8").split("\n## ", 1)[-1].startswith(f"{version} "):
        return False
    rec = recorded_ids(folder.root)
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
    atomic_write(path, head.rstrip("\n") + "\n\n" + entry + ("\n" + rest if rest else ""))

