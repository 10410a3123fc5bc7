"""A dataset folder carries the taxonomy it was built with (taxonomy.yaml); every command that reads labels uses it."""

from __future__ import annotations

import json
import shutil

import pytest
from custom_taxonomy import custom_folder

from builder.errors import DataError
from builder.format.manifest import folder_taxonomy
from builder.taxonomy import Taxonomy
from builder.validate import validate
from builder.versioning import bump


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    return custom_folder(tmp_path_factory.mktemp("custom") / "folder")


def test_the_folder_holds_its_taxonomy_byte_for_byte(custom):
    tax = folder_taxonomy(custom)
    manifest = json.loads((custom / "manifest.json").read_text())
    assert manifest["taxonomy"] == {"name": "custom", "sha256": tax.sha256, "file": "taxonomy.yaml"}
    assert tax.slugs == ["heists", "forgery"] and tax.source == str((custom / "taxonomy.yaml").resolve())


def test_a_custom_taxonomy_folder_validates_with_no_flag(custom):
    report = validate(custom, progress=False)
    assert report.ok, report.format_table()
    assert not report.notes
    shipped = validate(custom, taxonomy=Taxonomy.load(), progress=False)  # what validate used to check against
    assert not shipped.ok and not shipped.check("labels").ok


def test_an_edited_taxonomy_file_fails_validation(custom, tmp_path):
    root = tmp_path / "edited"
    shutil.copytree(custom, root)
    with open(root / "taxonomy.yaml", "a") as f:
        f.write("# a comment changes the file the rows were checked against\n")
    with pytest.raises(DataError, match="differs from the taxonomy the folder was built with") as e:
        folder_taxonomy(root)
    assert e.value.file == str(root / "taxonomy.yaml")
    report = validate(root, progress=False)
    manifest = report.check("manifest")
    assert not manifest.ok and manifest.first["file"] == "taxonomy.yaml" and manifest.first["field"] == "taxonomy"


def test_a_folder_written_before_it_carried_its_taxonomy_uses_the_shipped_one(fixture_folder, tmp_path):
    root = tmp_path / "legacy"
    shutil.copytree(fixture_folder, root)
    (root / "taxonomy.yaml").unlink()
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["taxonomy"]["file"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert folder_taxonomy(root).sha256 == Taxonomy.load().sha256
    assert validate(root, load_configs=False, progress=False).check("labels").ok


def test_version_renders_the_card_with_the_folders_labels(custom, tmp_path):
    root = tmp_path / "v"
    shutil.copytree(custom, root)
    bump(root, "minor")
    card = (root / "README.md").read_text()
    assert "Heist Harms" in card and "config_name: heists" in card
    for label in (d.label for d in Taxonomy.load().domains):  # none of the shipped domains
        assert label not in card
