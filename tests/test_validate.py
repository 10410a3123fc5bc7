"""builder.validate: a clean folder passes every check; each planted defect fails exactly its check.

Every defect is planted in a copy of one small clean folder. Row defects rewrite one shard with
pyarrow and then update its manifest entry, so that only the intended check can fail.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard

import builder.format.schema
import builder.validate.rows
import builder.validate.run
import builder.validate.scan
from builder.errors import DataError
from builder.dev.fixture import write_fixture
from builder.taxonomy import Taxonomy
from builder.validate import CHECKS, ValidationReport, validate
from builder.validate.rows import MAX_IMAGE_BYTES

TAX = Taxonomy.load()
MALICIOUS_TRAIN = "data/malicious_use/train-00000-of-00001.parquet"
HARM = "data/test/harm-00000-of-00001.parquet"
HELP = "data/test/help-00000-of-00001.parquet"


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("validate") / "clean"
    write_fixture(root, rows_per_domain=12, eval_rows=4, seed=0, progress=False)
    return root


@pytest.fixture(scope="module")
def clean_report(clean) -> ValidationReport:
    return validate(clean, progress=False)


@pytest.fixture
def folder(clean, tmp_path) -> Path:
    """A copy of the clean folder to plant a defect in."""
    root = tmp_path / "ds"
    shutil.copytree(clean, root)
    return root


def failing(report: ValidationReport) -> set[str]:
    return {c.name for c in report.checks if not c.ok}


def first(report: ValidationReport, name: str) -> tuple:
    f = report.check(name).first
    return f["file"], f["row"], f["field"]


def manifest_entry(root: Path, rel: str, **changes) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"].setdefault(rel, {}).update(changes)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def rewrite(root: Path, rel: str, table: pa.Table) -> None:
    """Write a shard back with its schema and bring its manifest entry up to date."""
    path = root / rel
    pq.write_table(table, path, row_group_size=100)
    data = path.read_bytes()
    manifest_entry(root, rel, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), rows=table.num_rows)


def set_cells(root: Path, rel: str, row: int, **values) -> None:
    table = pq.read_table(root / rel)
    for name, value in values.items():
        idx = table.schema.get_field_index(name)
        cells = table.column(name).to_pylist()
        cells[row] = value
        table = table.set_column(idx, table.schema.field(idx), pa.array(cells, table.schema.field(idx).type))
    rewrite(root, rel, table)


def cell(root: Path, rel: str, name: str, row: int):
    return pq.read_table(root / rel, columns=[name]).column(name)[row].as_py()


def edit_card(root: Path, fn) -> None:
    card = DatasetCard.load(root / "README.md")
    fn({c["config_name"]: c for c in card.data["configs"]}, {i["config_name"]: i for i in card.data["dataset_info"]})
    card.save(root / "README.md")


# --- the clean folder ----------------------------------------------------------------------------

def test_clean_folder_passes_every_check(clean_report, clean):
    r = clean_report
    assert [c.name for c in r.checks] == list(CHECKS)
    assert r.ok and failing(r) == set()
    assert all(c.status == "PASS" and c.first is None for c in r.checks)
    manifest = json.loads((clean / "manifest.json").read_text())
    total = sum(f["rows"] for f in manifest["files"].values())
    eval_rows = sum(f["rows"] for k, f in manifest["files"].items() if k.startswith("data/test/"))
    assert r.rows == total == 80
    assert r.check("manifest").checked == len(manifest["files"]) + 1  # + manifest.json itself
    assert r.check("schema").checked == len(manifest["files"])
    for name in ("labels", "images", "text", "duplicates", "leakage"):
        assert r.check(name).checked == total, name
    assert r.check("chosen_rejected").checked == total - eval_rows
    assert r.check("card_counts").checked == r.check("configs_load").checked == 2 + len(TAX.slugs)
    assert r.seconds > 0 and r.rows_per_second == pytest.approx(r.rows / r.seconds)


def test_report_json_and_table(clean_report):
    d = json.loads(json.dumps(clean_report.to_dict()))
    assert d["ok"] is True and d["rows"] == 80 and d["full_decode"] is False
    assert [c["name"] for c in d["checks"]] == list(CHECKS)
    assert {c["status"] for c in d["checks"]} == {"PASS"}
    lines = clean_report.format_table().splitlines()
    assert lines[0].split() == ["check", "status", "checked", "failed", "first", "offence"]
    assert [ln.split()[:2] for ln in lines[1:11]] == [[n, "PASS"] for n in CHECKS]
    assert lines[-1].startswith("80 rows in ") and lines[-1].endswith("rows/s): all checks passed")


def test_progress_bar_goes_to_stderr(clean, capsys):
    validate(clean, load_configs=False, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "validate" in err


def test_missing_root_raises(tmp_path):
    with pytest.raises(DataError) as e:
        validate(tmp_path / "nope", progress=False)
    assert e.value.file == str(tmp_path / "nope")


def test_no_manifest_no_readme_still_reports(folder):
    (folder / "manifest.json").unlink()
    (folder / "README.md").unlink()
    r = validate(folder, progress=False)
    assert failing(r) == {"manifest", "card_counts"}
    assert first(r, "manifest") == ("manifest.json", None, None)
    assert first(r, "card_counts") == ("README.md", None, None)
    assert r.check("configs_load").status == "SKIP"
    assert r.rows == 80  # the rows were still checked
    assert r.format_table().splitlines()[-1].endswith("2 of 9 checks failed (1 skipped)")


def test_load_configs_false_skips(clean):
    r = validate(clean, load_configs=False, progress=False)
    c = r.check("configs_load")
    assert r.ok and c.status == "SKIP" and c.skipped_reason == "load_configs=False" and c.checked == 0
    assert "skipped: load_configs=False" in r.format_table()


# --- 1. manifest ---------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["sha256", "bytes", "rows"])
def test_manifest_entry_mismatch(folder, field):
    entry = json.loads((folder / "manifest.json").read_text())["files"][HARM]
    manifest_entry(folder, HARM, **{field: "0" * 64 if field == "sha256" else entry[field] + 1})
    r = validate(folder, load_configs=False, progress=False)
    assert failing(r) == {"manifest"}
    assert first(r, "manifest") == (HARM, None, field)
    assert r.check("manifest").failed == 1


def test_manifest_stray_shard(folder):
    stray = "data/malicious_use/train-00001-of-00002.parquet"  # left over from an older build: no rows, not listed
    pq.write_table(pq.read_table(folder / MALICIOUS_TRAIN).slice(0, 0), folder / stray)
    r = validate(folder, load_configs=False, progress=False)
    assert failing(r) == {"manifest"}
    assert first(r, "manifest") == (stray, None, None)
    assert "not listed" in r.check("manifest").first["message"]


def test_manifest_lists_a_missing_file(folder):
    (folder / HELP).unlink()
    manifest_entry(folder, HELP)  # unchanged: the file is simply gone
    r = validate(folder, load_configs=False, progress=False)
    assert "manifest" in failing(r)
    assert first(r, "manifest") == (HELP, None, None)


# --- 2. schema -----------------------------------------------------------------------------------

def test_schema_wrong_column_type(folder):
    table = pq.read_table(folder / MALICIOUS_TRAIN)
    idx = table.schema.get_field_index("chosen_unsafe")
    as_int = table.column(idx).cast(pa.int64())  # what a pandas round trip with NaN-free ints does
    rewrite(folder, MALICIOUS_TRAIN, table.set_column(idx, pa.field("chosen_unsafe", pa.int64()), as_int))
    r = validate(folder, load_configs=False, progress=False)
    assert failing(r) == {"schema"}
    assert first(r, "schema") == (MALICIOUS_TRAIN, None, "chosen_unsafe")
    assert r.rows == 80 - table.num_rows  # its rows were skipped by the row checks, with a note
    assert any(MALICIOUS_TRAIN in n and "not row-checked" in n for n in r.notes)


def test_schema_metadata_disagrees_with_columns(folder):
    table = pq.read_table(folder / HARM)
    meta = json.loads(table.schema.metadata[b"huggingface"])
    meta["info"]["features"]["question"] = {"_type": "Value", "dtype": "int64"}
    rewrite(folder, HARM, table.replace_schema_metadata({"huggingface": json.dumps(meta)}))
    r = validate(folder, load_configs=False, progress=False)
    assert failing(r) == {"schema"}
    assert first(r, "schema") == (HARM, None, "question")


def test_schema_shard_outside_layout(folder):
    rel = "data/not_a_domain/train-00000-of-00001.parquet"
    (folder / rel).parent.mkdir()
    shutil.move(folder / MALICIOUS_TRAIN, folder / rel)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][rel] = manifest["files"].pop(MALICIOUS_TRAIN)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    r = validate(folder, load_configs=False, progress=False)
    assert "schema" in failing(r) and first(r, "schema") == (rel, None, None)
    assert "not a domain" in r.check("schema").first["message"]


# --- 3. labels -----------------------------------------------------------------------------------

def test_labels_class1_of_another_domain(folder):
    other = next(p for p in TAX.paths() if p[0] == TAX.domain("misinformation").label)  # a full, valid path
    set_cells(folder, MALICIOUS_TRAIN, 4, class1=other[0], class2=other[1], class3=other[2])
    r = validate(folder, load_configs=False, progress=False)
    assert failing(r) == {"labels"}
    assert first(r, "labels") == (MALICIOUS_TRAIN, 4, "class1")
    assert "data/misinformation/" in r.check("labels").first["message"]
    assert r.check("labels").failed == 1


def test_labels_class3_not_in_taxonomy(folder):
    set_cells(folder, HARM, 2, class3="not a subcategory")
    r = validate(folder, load_configs=False, progress=False)
    assert failing(r) == {"labels"}
    assert first(r, "labels") == (HARM, 2, "class3")


def test_labels_unknown_question_type(folder):
    set_cells(folder, MALICIOUS_TRAIN, 1, question_type="medium")
    r = validate(folder, load_configs=False, progress=False)
    assert failing(r) == {"labels"}
    assert first(r, "labels") == (MALICIOUS_TRAIN, 1, "question_type")


def test_labels_unattributed_rows_must_be_unlabelled(folder):
    rel = "data/unattributed/train-00000-of-00001.parquet"
    (folder / rel).parent.mkdir()
    table = pq.read_table(folder / MALICIOUS_TRAIN).slice(0, 3)
    rewrite(folder, rel, table)  # labelled rows where only unlabelled ones belong (and duplicates of malicious_use)
    r = validate(folder, load_configs=False, progress=False)
    assert "labels" in failing(r)
    assert first(r, "labels") == (rel, 0, "class1")


# --- 4. images -----------------------------------------------------------------------------------

def test_images_garbage_bytes(folder):
    set_cells(folder, MALICIOUS_TRAIN, 2, image={"bytes": b"this is not an image", "path": "x.jpg"})
    r = validate(folder, load_configs=False, progress=False)
    assert failing(r) == {"images"}
    assert first(r, "images") == (MALICIOUS_TRAIN, 2, "image")
    assert "does not decode" in r.check("images").first["message"]


def test_images_cut_jpeg_tail_fails_in_the_default_mode(folder):
    data = cell(folder, HELP, "image", 3)["bytes"]
    set_cells(folder, HELP, 3, image={"bytes": data[: len(data) * 2 // 3], "path": "cut.jpg"})
    for full_decode in (False, True):  # the header is intact, the end marker is gone: both modes see it
        r = validate(folder, load_configs=False, full_decode=full_decode, progress=False)
        assert failing(r) == {"images"} and r.full_decode == full_decode
        assert first(r, "images") == (HELP, 3, "image")
        assert "truncated" in r.check("images").first["message"]
    assert "cut short (the JPEG end marker FFD9 missing)" in validate(
        folder, load_configs=False, progress=False).check("images").first["message"]


def test_images_byte_and_pixel_limits(clean, monkeypatch):
    monkeypatch.setattr(builder.validate.rows, "MAX_IMAGE_BYTES", 100)
    r = validate(clean, load_configs=False, progress=False)
    assert failing(r) == {"images"} and r.check("images").failed == 80
    assert first(r, "images")[1:] == (0, "image") and "100-byte limit" in r.check("images").first["message"]
    monkeypatch.setattr(builder.validate.rows, "MAX_IMAGE_BYTES", MAX_IMAGE_BYTES)
    monkeypatch.setattr(builder.format.schema, "MAX_IMAGE_PIXELS", 64 * 64 - 1)  # the fixture's images are 64 x 64
    r = validate(clean, load_configs=False, progress=False)
    assert failing(r) == {"images"} and "outside limits" in r.check("images").first["message"]


# --- 5. text, 6. chosen_rejected ---------------------------------------------------------------------

def test_text_whitespace_only_question(folder):
    set_cells(folder, HELP, 1, question=" \t\n ")
    r = validate(folder, load_configs=False, progress=False)
    assert failing(r) == {"text"}
    assert first(r, "text") == (HELP, 1, "question")


def _with_raw_bytes(root: Path, rel: str, name: str, row: int, raw: bytes) -> None:
    """Put bytes that are not UTF-8 into one cell of a string column (pyarrow writes them unchecked)."""
    table = pq.read_table(root / rel)
    cells = table.column(name).cast(pa.binary()).to_pylist()
    cells[row] = raw
    binary = pa.array(cells, pa.binary())
    text = pa.StringArray.from_buffers(len(binary), binary.buffers()[1], binary.buffers()[2], binary.buffers()[0])
    idx = table.schema.get_field_index(name)
    rewrite(root, rel, table.set_column(idx, table.schema.field(idx), text))


def test_text_invalid_utf8_is_located(folder):
    question = cell(folder, MALICIOUS_TRAIN, "question", 4).encode()
    _with_raw_bytes(folder, MALICIOUS_TRAIN, "question", 4, question[:5] + b"\xff\xfe" + question[5:])
    _with_raw_bytes(folder, MALICIOUS_TRAIN, "chosen", 7, b"caf\xe9")  # Latin-1, not UTF-8
    r = validate(folder, load_configs=False, progress=False)
    assert failing(r) == {"text"}  # the other checks read the rest of the batch as before
    assert first(r, "text") == (MALICIOUS_TRAIN, 4, "question") and r.check("text").failed == 2
    assert r.check("text").first["message"] == "not valid UTF-8: byte 0xff at offset 5 (invalid start byte)"
    assert r.check("images").checked == validate(folder, load_configs=False, progress=False).check("images").checked


def test_text_empty_chosen(folder):
    set_cells(folder, MALICIOUS_TRAIN, 5, chosen="")
    r = validate(folder, load_configs=False, progress=False)
    assert failing(r) == {"text"}
    assert first(r, "text") == (MALICIOUS_TRAIN, 5, "chosen")


def test_chosen_equals_rejected(folder):
    chosen = cell(folder, MALICIOUS_TRAIN, "chosen", 1)
    set_cells(folder, MALICIOUS_TRAIN, 1, rejected=f"  {chosen}\n")
    r = validate(folder, load_configs=False, progress=False)
    assert failing(r) == {"chosen_rejected"}
    assert first(r, "chosen_rejected") == (MALICIOUS_TRAIN, 1, "rejected")


# --- 7. duplicates, 8. leakage -------------------------------------------------------------------------

def test_duplicate_row(folder):
    table = pq.read_table(folder / MALICIOUS_TRAIN)
    rows = table.to_pylist()
    rows[4] = rows[0]  # another image's row becomes a copy of row 0: same image bytes, same question
    rewrite(folder, MALICIOUS_TRAIN, pa.Table.from_pylist(rows, schema=table.schema))
    r = validate(folder, load_configs=False, progress=False)
    assert failing(r) == {"duplicates"}
    assert first(r, "duplicates") == (MALICIOUS_TRAIN, 4, "question")
    assert f"{MALICIOUS_TRAIN} row 0" in r.check("duplicates").first["message"]


def test_leakage_train_image_in_test(folder):
    image = cell(folder, MALICIOUS_TRAIN, "image", 0)
    set_cells(folder, HARM, 1, image=image)
    r = validate(folder, load_configs=False, progress=False)
    assert failing(r) == {"leakage"}
    assert first(r, "leakage") == (HARM, 1, "image")
    msg = r.check("leakage").first["message"]
    assert "also in train" in msg and f"{MALICIOUS_TRAIN} row 0" in msg


# --- 9. card_counts, 10. configs_load ---------------------------------------------------------------

def test_card_count_off_by_one(folder):
    def bump(configs, infos):
        infos["malicious_use"]["splits"][0]["num_examples"] += 1  # the train split
    edit_card(folder, bump)
    r = validate(folder, progress=False)
    # a user's load_dataset checks the card's counts too, so configs_load fails along with card_counts
    assert failing(r) == {"card_counts", "configs_load"}
    assert first(r, "card_counts") == ("README.md", None, "dataset_info.malicious_use.train.num_examples")
    assert first(r, "configs_load") == ("README.md", None, "configs.malicious_use")
    assert "NonMatchingSplitsSizesError" in r.check("configs_load").first["message"]
    assert r.check("configs_load").failed == 1


def test_card_yaml_broken(folder):
    text = (folder / "README.md").read_text()
    (folder / "README.md").write_text(text.replace("configs:\n", "configs: [\n", 1))
    r = validate(folder, progress=False)
    assert failing(r) == {"card_counts"}
    assert first(r, "card_counts") == ("README.md", None, None)
    assert "does not parse" in r.check("card_counts").first["message"]
    assert r.check("configs_load").status == "SKIP"


def test_card_config_without_dataset_info(folder):
    card = DatasetCard.load(folder / "README.md")
    card.data["dataset_info"] = [i for i in card.data["dataset_info"] if i["config_name"] != "test"]
    card.save(folder / "README.md")
    r = validate(folder, load_configs=False, progress=False)
    assert failing(r) == {"card_counts"}
    assert first(r, "card_counts") == ("README.md", None, "dataset_info.test")


def test_config_glob_matches_nothing(folder):
    def break_glob(configs, infos):
        configs["malicious_use"]["data_files"][0]["path"] = "data/malicious_use/trian-*"
    edit_card(folder, break_glob)
    r = validate(folder, progress=False)
    assert failing(r) == {"card_counts", "configs_load"}
    assert first(r, "card_counts") == ("README.md", None, "configs.malicious_use.train")
    assert first(r, "configs_load") == ("README.md", None, "configs.malicious_use")
    assert r.check("configs_load").failed == 1  # the other configs still loaded


def test_config_that_does_not_load(folder):
    # the counts agree, but the card declares features the shards cannot be cast to: only a real load sees it
    def bad_features(configs, infos):
        infos["test"]["features"] = [{"name": "question", "dtype": "int64"}]
    edit_card(folder, bad_features)
    r = validate(folder, progress=False)
    assert failing(r) == {"configs_load"}
    assert first(r, "configs_load") == ("README.md", None, "configs.test")
    assert "CastError" in r.check("configs_load").first["message"]


# --- robustness --------------------------------------------------------------------------------------

def test_unattributed_rows_pass(tmp_path):
    from builder.dev.fixture import FixtureImage, draw_image, eval_row, preference_rows
    from builder.format.writer import DatasetFolderWriter
    from dataset_card.card import render_folder_card
    from builder.format.schema import image_sha256

    def image(key, labels):
        data = draw_image(key, key)
        return FixtureImage(0, *labels, data, image_sha256(data))

    root = tmp_path / "un"
    with DatasetFolderWriter(root, finish=render_folder_card) as w:
        for d in TAX.domains:
            class2, sub = d.subcategories[0]
            for row in preference_rows(image(d.slug, (d.label, class2, sub.label)), f"{d.slug}.jpg"):
                w.add(row, "train")
        for row in preference_rows(image("unattributed", ("", "", "")), "u.jpg"):
            w.add(row | {"class1": None, "class2": None, "class3": None}, "train")
        for split in ("harm", "help"):
            w.add(eval_row(image(split, TAX.paths()[0]), split), split)
    assert (root / "data/unattributed/train-00000-of-00001.parquet").is_file()
    r = validate(root, progress=False)
    assert r.ok, r.format_table()
    assert r.rows == 3 * len(TAX.domains) + 3 + 2


def test_a_check_that_breaks_does_not_stop_the_others(clean, monkeypatch):
    def boom(*args):
        raise RuntimeError("bug in the card check")
    monkeypatch.setattr(builder.validate.run, "check_card_counts", boom)
    r = validate(clean, progress=False)
    assert failing(r) == {"card_counts"}
    assert r.check("card_counts").first["message"] == "check stopped: RuntimeError: bug in the card check"
    assert r.check("configs_load").status == "SKIP" and r.rows == 80


def test_corrupt_parquet_is_reported_not_raised(folder):
    (folder / HELP).write_bytes(b"PAR1 this is not a parquet file PAR1")
    r = validate(folder, load_configs=False, progress=False)
    assert {"manifest", "schema", "card_counts"} <= failing(r)
    assert first(r, "schema") == (HELP, None, None)
    assert "not a readable parquet file" in r.check("schema").first["message"]
    assert first(r, "manifest") == (HELP, None, "sha256")
    assert not {"labels", "images", "text", "duplicates", "leakage"} & failing(r)


def test_rows_are_located_across_batches(folder, monkeypatch):
    # defects past the first batch, and a duplicate of a row in an earlier batch
    other = next(p for p in TAX.paths() if p[0] == TAX.domain("misinformation").label)
    set_cells(folder, MALICIOUS_TRAIN, 7, class1=other[0], class2=other[1], class3=other[2])
    table = pq.read_table(folder / MALICIOUS_TRAIN)
    rows = table.to_pylist()
    rows[5] = rows[0]
    rewrite(folder, MALICIOUS_TRAIN, pa.Table.from_pylist(rows, schema=table.schema))
    whole = validate(folder, load_configs=False, progress=False)
    monkeypatch.setattr(builder.validate.scan, "BATCH_ROWS", 2)
    batched = validate(folder, load_configs=False, progress=False)
    assert failing(batched) == failing(whole) == {"labels", "duplicates"}
    assert first(batched, "labels") == first(whole, "labels") == (MALICIOUS_TRAIN, 7, "class1")
    assert first(batched, "duplicates") == first(whole, "duplicates") == (MALICIOUS_TRAIN, 5, "question")
    assert [c.to_dict() for c in batched.checks] == [c.to_dict() for c in whole.checks]


def test_card_data_files_outside_the_folder_layout(folder):
    # datasets would quietly load test rows into a domain config (missing columns become nulls), and the
    # counts can agree: only comparing the globs with the folder format catches it
    def point_at_test(configs, infos):
        configs["malicious_use"]["data_files"][1]["path"] = "data/test/harm-*"
        infos["malicious_use"]["splits"][1]["num_examples"] = 10
    edit_card(folder, point_at_test)
    r = validate(folder, load_configs=False, progress=False)
    assert failing(r) == {"card_counts"}
    assert first(r, "card_counts") == ("README.md", None, "configs.malicious_use.validation")
    assert "data/malicious_use/validation-*" in r.check("card_counts").first["message"]


def test_harm_and_help_may_share_an_image(folder):
    # test/harm and test/help are one evaluation split: `spa-vl build` asks a harm and a help question of each test image
    image = cell(folder, HARM, "image", 0)
    set_cells(folder, "data/test/help-00000-of-00001.parquet", 0, image=image)
    r = validate(folder, load_configs=False, progress=False)
    assert r.ok, r.format_table()


def test_manifest_version_must_be_semantic(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["version"] = "abc"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    r = validate(folder, load_configs=False, progress=False)
    assert failing(r) == {"manifest"}
    assert first(r, "manifest") == ("manifest.json", None, "version")
