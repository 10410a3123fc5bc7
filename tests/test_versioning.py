"""`spa-vl version`: semantic versions, and a changelog entry that counts rows added and removed by id."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from builder.errors import DataError
from builder.dev.fixture import write_fixture
from builder.format.history import ROW_IDS, recorded_ids
from builder.versioning import bump, bumped
from dataset_card.card import render_folder_card

SPA_VL = str(Path(sys.executable).with_name("spa-vl"))
DAY = dt.date(2026, 1, 2)


def _ids(root: Path) -> dict[tuple[str, str], set[str]]:
    out = {}
    for rel in json.loads((root / "manifest.json").read_text())["files"]:
        _, folder, name = rel.split("/")
        out.setdefault((folder, name.split("-")[0]), set()).update(pq.read_table(root / rel, columns=["id"])["id"].to_pylist())
    return out


def _version(root: Path) -> str:
    return json.loads((root / "manifest.json").read_text())["version"]


@pytest.mark.parametrize("part,want", [("patch", "1.2.4"), ("minor", "1.3.0"), ("major", "2.0.0")])
def test_bumped(part, want):
    assert bumped("1.2.3", part) == want


def test_bad_part_and_bad_version_are_data_errors():
    with pytest.raises(DataError, match="patch, minor, major"):
        bumped("1.2.3", "huge")
    with pytest.raises(DataError, match="semantic version"):
        bumped("1.2", "patch")


def test_first_bump_counts_every_row_as_added_and_updates_manifest_card_and_changelog(tmp_path):
    root = tmp_path / "ds"
    write_fixture(root, rows_per_domain=6, eval_rows=2, progress=False)
    r = bump(root, "minor", today=DAY)
    assert (r.version, r.previous_version) == ("0.2.0", None)
    ids = _ids(root)
    assert r.added == sum(len(v) for v in ids.values()) and r.removed == 0
    assert _version(root) == "0.2.0"
    assert "\nVersion 0.2.0 · " in (root / "README.md").read_text()
    log = (root / "CHANGELOG.md").read_text()
    assert log.startswith("# Changelog") and "## 0.2.0 (2026-01-02)" in log and "First recorded version" in log
    manifest = json.loads((root / "manifest.json").read_text())
    assert f"`{manifest['build_config_hash']}`" in log
    assert recorded_ids(root)[0] == "0.2.0" and recorded_ids(root)[1] == ids


def test_rebuild_over_the_folder_keeps_history_and_the_next_bump_diffs_by_row_id(tmp_path):
    root = tmp_path / "ds"
    write_fixture(root, rows_per_domain=12, eval_rows=4, progress=False)
    bump(root, "minor", today=DAY)
    before = _ids(root)
    old_hash = json.loads((root / "manifest.json").read_text())["build_config_hash"]

    # a rebuild with fewer rows per domain and more eval rows: rows go and come
    write_fixture(root, rows_per_domain=6, eval_rows=6, progress=False, overwrite=True)
    assert _version(root) == "0.2.0"  # a rebuild never takes the version back
    assert (root / "CHANGELOG.md").exists() and (root / ROW_IDS).exists()
    after = _ids(root)

    r = bump(root, "patch", today=DAY)
    assert (r.version, r.previous_version) == ("0.2.1", "0.2.0")
    for key in set(before) | set(after):
        c = r.changes[key]
        assert (c.rows, c.added, c.removed) == (len(after.get(key, set())), len(after.get(key, set()) - before.get(key, set())),
                                                len(before.get(key, set()) - after.get(key, set())))
    assert r.removed > 0 and r.added > 0
    log = (root / "CHANGELOG.md").read_text()
    assert log.index("## 0.2.1") < log.index("## 0.2.0")  # newest first
    new_hash = json.loads((root / "manifest.json").read_text())["build_config_hash"]
    assert f"`{new_hash}` (was `{old_hash}`)" in log
    mu = r.changes[("malicious_use", "train")]
    assert f"| `malicious_use` | train | {mu.rows:,} | {mu.added:,} | {mu.removed:,} |" in log


def test_previous_folder_is_the_baseline_when_given(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    write_fixture(old, rows_per_domain=6, eval_rows=2, progress=False)
    write_fixture(new, rows_per_domain=12, eval_rows=2, progress=False)
    r = bump(new, "minor", previous=old, today=DAY)
    assert r.previous_version == "0.1.0" and r.baseline == str(old)
    added = sum(len(v - _ids(old).get(k, set())) for k, v in _ids(new).items())
    assert r.added == added > 0 and r.removed == 0


def test_a_version_never_goes_back(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    write_fixture(old, rows_per_domain=6, eval_rows=2, progress=False)
    bump(old, "major", today=DAY)  # 1.0.0
    write_fixture(new, rows_per_domain=6, eval_rows=2, progress=False)  # 0.1.0
    with pytest.raises(DataError, match="not above the previous version 1.0.0"):
        bump(new, "minor", previous=old)
    assert _version(new) == "0.1.0" and not (new / "CHANGELOG.md").exists()


def test_card_render_is_stable_after_a_bump(tmp_path):
    root = tmp_path / "ds"
    write_fixture(root, rows_per_domain=6, eval_rows=2, progress=False)
    bump(root, "patch", today=DAY)
    assert render_folder_card(root).changed == []


def test_cli_version(tmp_path):
    root = tmp_path / "ds"
    write_fixture(root, rows_per_domain=6, eval_rows=2, progress=False)
    proc = subprocess.run([SPA_VL, "version", str(root), "--bump", "major"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("version: (none recorded) -> 1.0.0: +40 / -0 rows")
    bad = subprocess.run([SPA_VL, "version", str(root), "--bump", "huge"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "patch, minor, major" in bad.stderr


def test_a_bump_that_crashed_after_the_manifest_is_finished_not_repeated(tmp_path, monkeypatch):
    import builder.versioning as versioning

    root = tmp_path / "ds"
    write_fixture(root, rows_per_domain=12, eval_rows=4, progress=False)
    bump(root, "minor", today=DAY)  # 0.2.0, recorded
    write_fixture(root, rows_per_domain=6, eval_rows=4, progress=False, overwrite=True)

    real = versioning.record_ids
    monkeypatch.setattr(versioning, "record_ids", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        bump(root, "patch", today=DAY)
    assert _version(root) == "0.2.1" and recorded_ids(root)[0] == "0.2.0"  # manifest written, ids not
    monkeypatch.setattr(versioning, "record_ids", real)

    again = bump(root, "patch", today=DAY)
    assert again.finished_interrupted and again.version == "0.2.1" and _version(root) == "0.2.1"
    assert recorded_ids(root)[0] == "0.2.1" and recorded_ids(root)[1] == _ids(root)
    assert (root / "CHANGELOG.md").read_text().count("## 0.2.1 ") == 1
    nxt = bump(root, "patch", today=DAY)
    assert nxt.version == "0.2.2" and nxt.previous_version == "0.2.1" and nxt.added == nxt.removed == 0
