"""The folder's owner (builder.format.layout, builder.format.manifest): shard names, the DatasetFolder value
and its views, one manifest serialization, lenient opening for validate."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil

import pytest

from builder.errors import DataError
from builder.format.layout import (
    MANIFEST,
    TAXONOMY_FILE,
    config_data_files,
    config_folders,
    shard_key,
    shard_name,
    shard_place,
)
from builder.format.manifest import DatasetFolder, manifest_bytes, read_manifest
from builder.taxonomy import Taxonomy


def test_shard_names_are_made_and_read_in_one_place():
    assert shard_name("train", 2, 5) == "train-00002-of-00005.parquet"
    assert shard_key(f"data/malicious_use/{shard_name('validation', 0, 1)}") == ("malicious_use", "validation")
    assert shard_key("data/test/harm-00000-of-00001.parquet") == ("test", "harm")
    for bad in ("data/test/harm.parquet", "train-00000-of-00001.parquet", "data/a/b/train-0.parquet"):
        with pytest.raises(DataError, match="not a shard path"):
            shard_key(bad)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        shard_key("data/malicious_use/dev-00000-of-00001.parquet")
    assert shard_place("data/foo/train.parquet") == ("foo", "train.parquet")  # validate names what is wrong
    assert shard_place("elsewhere/train-0.parquet")[0] is None


def test_which_folders_make_which_config():
    folders = ["malicious_use", "unattributed", "test", "socioeconomic"]
    assert config_folders("default", folders) == ["malicious_use", "unattributed", "socioeconomic"]
    assert config_folders("malicious_use", folders) == ["malicious_use"]
    assert config_folders("test", folders) == ["test"]
    assert config_folders("misinformation", folders) == []


def test_the_folder_value_gives_every_view_from_one_read(fixture_folder):
    folder = DatasetFolder.open(fixture_folder)
    manifest = json.loads((fixture_folder / MANIFEST).read_bytes())
    assert folder.manifest == manifest and folder.raw == (fixture_folder / MANIFEST).read_bytes()
    assert folder.version == manifest["version"] and folder.build_config == manifest["build_config"]
    assert folder.card_options == manifest["card"] and folder.taxonomy.sha256 == Taxonomy.load().sha256
    assert sorted(r for rels in folder.shards.values() for r in rels) == sorted(manifest["files"])
    assert folder.total_rows == sum(e["rows"] for e in manifest["files"].values())
    globs = config_data_files(folder.taxonomy.slugs)
    configs = folder.config_splits()
    assert list(configs) == ["default", *folder.taxonomy.slugs, "test"]
    for config, splits in configs.items():
        for split, v in splits.items():
            matched = [r for r in manifest["files"] if fnmatch.fnmatchcase(r, globs[config][split] + ".parquet")]
            assert sorted(v["files"]) == sorted(matched), (config, split)
            assert v["rows"] == sum(manifest["files"][r]["rows"] for r in matched)
            assert v["bytes"] == sum(manifest["files"][r]["bytes"] for r in matched)


def test_the_manifest_is_written_one_way_and_only_when_it_changes(fixture_folder, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(fixture_folder, root)
    folder = DatasetFolder.open(root)
    assert manifest_bytes(folder.manifest) == folder.raw  # what the writer wrote is the one serialization
    stat = (root / MANIFEST).stat()
    same = folder.write_manifest(dict(folder.manifest))
    assert (root / MANIFEST).stat().st_mtime_ns == stat.st_mtime_ns and same.raw == folder.raw
    bumped = folder.write_manifest({**folder.manifest, "version": "9.9.9"})
    assert bumped.version == "9.9.9" and bumped.raw == (root / MANIFEST).read_bytes()
    assert read_manifest(root)["version"] == "9.9.9" and folder.version != "9.9.9"  # the old value is unchanged


def test_a_broken_folder_opens_leniently_for_validate_and_not_otherwise(fixture_folder, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(fixture_folder, root)
    (root / TAXONOMY_FILE).write_text((root / TAXONOMY_FILE).read_text() + "\n# edited\n")
    with pytest.raises(DataError, match="differs from the taxonomy the folder was built with"):
        DatasetFolder.open(root)
    lenient = DatasetFolder.open(root, lenient=True)
    assert set(lenient.problems) == {TAXONOMY_FILE} and lenient.taxonomy.sha256 == Taxonomy.load().sha256
    (root / MANIFEST).write_text("[1, 2]")
    with pytest.raises(DataError, match="manifest must be a JSON object, got list"):
        DatasetFolder.open(root)
    lenient = DatasetFolder.open(root, lenient=True)
    assert lenient.manifest == {} and lenient.problems[MANIFEST].file == str(root / MANIFEST)
    with pytest.raises(DataError, match="dataset folder not found"):
        DatasetFolder.open(tmp_path / "absent", lenient=True)
    assert DatasetFolder.of(lenient) is lenient


def test_the_writer_renders_nothing_and_finish_runs_on_the_finished_temporary_folder(tmp_path):
    from builder.dev.fixture import FixtureImage, draw_image, eval_row
    from builder.format.schema import image_sha256
    from builder.format.writer import DatasetFolderWriter

    path = Taxonomy.load().paths()[0]
    data = draw_image("w", path[2])
    row = eval_row(FixtureImage(0, *path, data, image_sha256(data)), "harm")
    seen = []

    def finish(folder):
        seen.append((folder.root.name, sorted(p.name for p in folder.root.iterdir()), folder.total_rows))

    out = tmp_path / "out"
    with DatasetFolderWriter(out, finish=finish) as w:
        w.add(row, "harm")
    assert seen == [(f".out.tmp-{os.getpid()}", ["data", MANIFEST, TAXONOMY_FILE], 1)]
    assert not (out / "README.md").exists()  # no card unless the command asks for one
    assert w.summary.folder.root == out and w.summary.folder.manifest == read_manifest(out)

    def broken(folder):
        raise RuntimeError("card failed")

    with pytest.raises(RuntimeError, match="card failed"):
        with DatasetFolderWriter(tmp_path / "other", finish=broken) as w:
            w.add(row, "harm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing half-written
