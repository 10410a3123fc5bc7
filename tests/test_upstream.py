"""Importing the upstream sqrti/SPA-VL layout: labels, counts, configs, the Hub, and bad input."""

from __future__ import annotations

import csv
import json
import shutil
import socket
import zipfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_server import HubServer, hub_env

from builder.errors import DataError
from builder.fixture import write_fixture
from builder.taxonomy import Taxonomy
from builder.upstream import import_upstream

ROWS = dict(rows_per_domain=36, eval_rows=4, seed=0, progress=False)  # 12 images per domain, 2 train shards
TRAIN = "data/train-00000-of-00002.parquet"
TRAIN_2 = "data/train-00001-of-00002.parquet"
VALIDATION = "validation/validation-00000-of-00001.parquet"
HARM, HELP = "test/harm-00000-of-00001.parquet", "test/help-00000-of-00001.parquet"
LABELS = ("class1", "class2", "class3")
UNATTRIBUTED = (None, None, None)


# --- fixtures and helpers ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """(folder in the upstream layout, its row counts per split). Tests copy it before changing it."""
    root = tmp_path_factory.mktemp("upstream") / "SPA-VL"
    counts = write_fixture(root, layout="upstream", max_shard_bytes=1, **ROWS)
    assert sorted(p.name for p in (root / "data").iterdir()) == [Path(TRAIN).name, Path(TRAIN_2).name]
    return root, counts


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    """The same synthetic data written in our layout, labels and all: the ground truth."""
    root = tmp_path_factory.mktemp("truth") / "spa_vl"
    write_fixture(root, **ROWS)
    return root


@pytest.fixture(scope="module")
def expected_labels(truth):
    """id → (class1, class2, class3) of every row of the ground truth."""
    return labels_by_id(truth)


@pytest.fixture(scope="module")
def imported(upstream, tmp_path_factory):
    """The upstream fixture imported with labels from train.zip."""
    out = tmp_path_factory.mktemp("imported") / "spa_vl"
    return out, import_upstream(upstream[0], out, progress=False)


@pytest.fixture
def src(upstream, tmp_path):
    """A private copy of the upstream fixture, free to change."""
    copy = tmp_path / "SPA-VL"
    shutil.copytree(upstream[0], copy)
    return copy


def labels_by_id(folder: Path, *, test: bool = True) -> dict[str, tuple]:
    """id → (class1, class2, class3) of every row of a dataset folder (``test=False``: train and validation)."""
    out = {}
    for path in sorted((folder / "data").rglob("*.parquet")):
        if not test and path.parent.name == "test":
            continue
        table = pq.read_table(path, columns=["id", *LABELS])
        for r in table.to_pylist():
            out[r["id"]] = (r["class1"], r["class2"], r["class3"])
    return out


def write_class_map(zip_path: Path, path: Path) -> Path:
    """A class map (CSV or JSONL, by suffix) keyed by image_sha256, made from a train.zip's folder tree."""
    from builder.schema import image_sha256

    with zipfile.ZipFile(zip_path) as zf:
        entries = [{"image_sha256": image_sha256(zf.read(name)), **dict(zip(LABELS, name.split("/")[:3]))}
                   for name in zf.namelist()]
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, ["image_sha256", *LABELS])
            writer.writeheader()
            writer.writerows(entries)
    else:
        path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def rewrite(path: Path, change) -> None:
    """Rewrite a parquet file with ``change(rows)`` applied to its rows (as dicts), keeping its schema."""
    table = pq.read_table(path)
    rows = table.to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def load(out: Path, config: str, tmp_path: Path):
    from datasets import load_dataset

    return load_dataset(str(out), config, cache_dir=str(tmp_path / "ds_cache"))


# --- good input ---------------------------------------------------------------------------------------------
def test_import_from_train_zip_keeps_every_row_and_labels_all_train_rows(upstream, imported, expected_labels):
    _, counts = upstream
    out, report = imported
    assert report.rows_in == report.rows_out == counts
    assert report.attributed_by == {"class_map": 0, "image_hash": counts["train"], "image_name": 0}
    assert report.unattributed == 0 and report.commit is None and report.source == "SPA-VL"
    assert labels_by_id(out) == expected_labels  # same ids (content hashes) and the right labels
    assert report.line().startswith(f"imported {sum(counts.values())} rows (train {counts['train']}, ")
    assert report.line().endswith(f"every train row attributed (image_hash {counts['train']})")
    assert not (out / "data" / "unattributed").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert "imported from sqrti/SPA-VL" in (out / "README.md").read_text() and manifest["files"]


def test_domain_config_of_an_import_has_only_its_domain(imported, truth, tmp_path):
    out, _ = imported
    ds = load(out, "malicious_use", tmp_path)
    domains = Counter(labels[0] for labels in labels_by_id(truth, test=False).values())
    assert ds["train"].num_rows + ds["validation"].num_rows == domains["Malicious Use"]
    for split in ("train", "validation"):
        assert ds[split].num_rows > 0 and set(ds[split]["class1"]) == {"Malicious Use"}
        assert set(ds[split]["question_type"]) == {None}  # upstream does not record it


def test_import_from_extracted_tree_matches_by_hash_then_by_unique_name(src, upstream, expected_labels, tmp_path):
    # Extract train.zip below a top-level folder, as unzipping into train/ often does.
    with zipfile.ZipFile(src / "train.zip") as zf:
        zf.extractall(src / "train" / "SPA-VL-images")
    (src / "train.zip").unlink()
    # One image's bytes differ from the parquet's, and its name is made unique in the tree: that
    # image's 3 rows can only be matched by name.
    twos = sorted((src / "train").rglob("2.jpg"))
    changed, *others = twos
    changed.write_bytes(changed.read_bytes() + b"\0")
    for p in others:
        p.rename(p.with_name("2-renamed.jpg"))

    report = import_upstream(src, tmp_path / "out", progress=False)
    train = upstream[1]["train"]
    assert report.attributed_by == {"class_map": 0, "image_hash": train - 3, "image_name": 3}
    assert report.unattributed == 0 and report.rows_out == report.rows_in == upstream[1]
    assert labels_by_id(tmp_path / "out") == expected_labels


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_import_with_class_map_file(src, upstream, expected_labels, tmp_path, fmt):
    class_map = write_class_map(src / "train.zip", tmp_path / f"labels.{fmt}")
    (src / "train.zip").unlink()  # the class map alone labels the rows
    report = import_upstream(src, tmp_path / "out", class_map=class_map, progress=False)
    assert report.attributed_by == {"class_map": upstream[1]["train"], "image_hash": 0, "image_name": 0}
    assert labels_by_id(tmp_path / "out") == expected_labels


def test_rows_missing_from_train_zip_are_kept_unattributed_in_default_only(src, upstream, expected_labels, tmp_path):
    # Drop two images named 0.jpg: that name is in many folders, so the name cannot attribute them.
    with zipfile.ZipFile(src / "train.zip") as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    dropped = [n for n in members if n.endswith("/0.jpg")][:2]
    with zipfile.ZipFile(src / "train.zip", "w") as zf:
        for name, data in members.items():
            if name not in dropped:
                zf.writestr(name, data)

    out = tmp_path / "out"
    report = import_upstream(src, out, progress=False)
    assert report.unattributed == 6 and len(report.unattributed_examples) == 6  # 3 questions per image
    assert report.rows_out == report.rows_in == upstream[1]
    assert report.line().endswith("; 6 train rows unattributed (kept in default config only)")
    got = labels_by_id(out)
    lost = {i for i, labels in got.items() if labels == UNATTRIBUTED}
    assert len(lost) == 6 and {i: v for i, v in got.items() if i not in lost} == {
        i: v for i, v in expected_labels.items() if i not in lost}
    assert {expected_labels[i] for i in lost} == {tuple(n.split("/")[:3]) for n in dropped}

    default = load(out, "default", tmp_path)
    assert default["train"].num_rows == upstream[1]["train"]
    assert lost <= set(default["train"]["id"])
    in_domains = sum(load(out, slug, tmp_path)["train"].num_rows for slug in Taxonomy.load().slugs)
    assert in_domains == upstream[1]["train"] - 6


def test_import_from_the_hub_at_a_revision(upstream, expected_labels, tmp_path, monkeypatch):
    import huggingface_hub.constants as hconst

    root, counts = upstream
    with HubServer({"sqrti/SPA-VL": {"main": root, "v1.0": root}}) as hub:
        hub_env(monkeypatch, hub, tmp_path / "hf_home")
        report = import_upstream("sqrti/SPA-VL", tmp_path / "out", revision="v1.0", progress=False)
        assert report.commit == hub.commit("sqrti/SPA-VL", "v1.0") and report.source == "sqrti/SPA-VL"
        assert ("GET", "/api/datasets/sqrti/SPA-VL/revision/v1.0") in hub.requests
    assert report.rows_out == report.rows_in == counts and report.unattributed == 0
    assert labels_by_id(tmp_path / "out") == expected_labels
    fetched = {p.rsplit("/", 1)[-1] for m, p in hub.requests if m == "GET" and "/resolve/" in p}
    assert fetched == {"train.zip", Path(TRAIN).name, Path(TRAIN_2).name, Path(VALIDATION).name,
                       Path(HARM).name, Path(HELP).name}  # README and meta files are not needed

    # The server is gone: offline, the same revision imports again from the cache.
    monkeypatch.setattr(hconst, "HF_HUB_OFFLINE", True)
    again = import_upstream("sqrti/SPA-VL", tmp_path / "again", revision="v1.0", progress=False)
    assert again.commit == report.commit and again.rows_out == counts


def test_hub_import_with_a_class_map_does_not_fetch_train_zip(upstream, tmp_path, monkeypatch):
    class_map = write_class_map(upstream[0] / "train.zip", tmp_path / "labels.csv")
    with HubServer({"sqrti/SPA-VL": {"main": upstream[0]}}) as hub:
        hub_env(monkeypatch, hub, tmp_path / "hf_home")
        report = import_upstream("sqrti/SPA-VL", tmp_path / "out", class_map=class_map, progress=False)
    assert report.attributed_by["class_map"] == upstream[1]["train"]
    assert not [p for _, p in hub.requests if p.endswith("/train.zip")]


@pytest.mark.parametrize("repo, revision, message", [
    ("org/absent", None, "no such dataset repo"),
    ("sqrti/SPA-VL", "v9", "has no revision 'v9'"),
])
def test_hub_errors_name_the_repo(upstream, tmp_path, monkeypatch, repo, revision, message):
    with HubServer({"sqrti/SPA-VL": {"main": upstream[0]}}) as hub:
        hub_env(monkeypatch, hub, tmp_path / "hf_home")
        with pytest.raises(DataError, match=message) as info:
            import_upstream(repo, tmp_path / "out", revision=revision, progress=False)
        assert info.value.file == repo and hub.endpoint in str(info.value)
    assert_no_output(tmp_path / "out")


def test_a_silent_or_absent_hub_gives_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hconst

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        port = silent.getsockname()[1]
        hub_env(monkeypatch, f"http://127.0.0.1:{port}", tmp_path / "hf_home")
        monkeypatch.setattr(hconst, "HF_HUB_ETAG_TIMEOUT", 1)
        with pytest.raises(DataError, match="did not answer within 1s"):
            import_upstream("sqrti/SPA-VL", tmp_path / "out", progress=False)
    with pytest.raises(DataError, match=f"from http://127.0.0.1:{port}: ConnectError"):  # nothing listens now
        import_upstream("sqrti/SPA-VL", tmp_path / "out", progress=False)
    assert_no_output(tmp_path / "out")


def test_a_missing_folder_that_is_no_repo_id_and_a_revision_for_a_folder_are_refused(src, tmp_path):
    with pytest.raises(DataError, match="not a Hub repo id"):
        import_upstream(tmp_path / "no" / "such" / "folder", tmp_path / "out", progress=False)
    with pytest.raises(DataError) as info:
        import_upstream(src, tmp_path / "out", revision="main", progress=False)
    assert info.value.field == "revision"
    assert_no_output(tmp_path / "out")


def test_an_image_in_two_folders_is_told_apart_by_its_name():
    from builder.upstream import Label, TrainLabels

    weapon = Label(("Malicious Use", "Security threats", "weapon"), "image_hash", "a")
    cyber = Label(("Malicious Use", "Security threats", "cyber"), "image_hash", "b")
    labels = TrainLabels(by_hash={"h": [("1.jpg", weapon), ("7.jpg", cyber)]}, by_name={"7.jpg": [cyber, weapon]})
    assert labels.lookup("h", "7.jpg") is cyber
    assert labels.lookup("h", "3.jpg") is None  # neither hash nor name decides: unattributed
    assert labels.lookup("other", "1.jpg") is None


def test_existing_output_is_refused_unless_overwrite(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        import_upstream(src, out, progress=False)
    assert (out / "keep.txt").exists()
    with pytest.raises(DataError, match="replaces only"):  # not a folder spa-vl wrote: never replaced
        import_upstream(src, out, overwrite=True, progress=False)
    (out / "keep.txt").unlink()
    import_upstream(src, out, progress=False)
    import_upstream(src, out, overwrite=True, progress=False)  # ours: replaced
    assert (out / "manifest.json").exists()


# --- bad input: a DataError naming file, row and field, and no output ------------------------------------
def _garbage(src: Path):
    (src / TRAIN_2).write_bytes(b"this is not parquet at all" * 40)


def _truncated(src: Path):
    data = (src / VALIDATION).read_bytes()
    (src / VALIDATION).write_bytes(data[: len(data) // 2])


def _scrambled_pages(src: Path):
    data = bytearray((src / TRAIN).read_bytes())  # footer intact, data pages garbage
    for i in range(len(data) // 4, len(data) // 2):
        data[i] = (data[i] * 7 + 13) % 256
    (src / TRAIN).write_bytes(bytes(data))


def _broken_zip(src: Path):
    (src / "train.zip").write_bytes(b"PK\x03\x04 and then nothing useful")


def _missing_column(src: Path):
    table = pq.read_table(src / HARM)
    pq.write_table(table.drop_columns(["question"]), src / HARM)


def _mistyped_column(src: Path):
    table = pq.read_table(src / HELP)
    i = table.schema.get_field_index("question")
    pq.write_table(table.set_column(i, "question", pa.array(range(table.num_rows), pa.int64())), src / HELP)


def _label_outside_taxonomy(src: Path):
    rewrite(src / VALIDATION, lambda rows: rows[2].update(class3="not a subcategory"))


def _image_does_not_decode(src: Path):
    rewrite(src / TRAIN_2, lambda rows: rows[5].update(image={"bytes": b"\x89PNG garbage", "path": "5.jpg"}))


def _empty_question(src: Path):
    rewrite(src / HELP, lambda rows: rows[1].update(question="   "))


@pytest.mark.parametrize("damage, file, row, field, words", [
    (_garbage, TRAIN_2, None, None, "not a readable parquet file"),
    (_truncated, VALIDATION, None, None, "not a readable parquet file"),
    (_scrambled_pages, TRAIN, None, None, "parquet data unreadable"),
    (_broken_zip, "train.zip", None, None, "not a readable zip file"),
    (_missing_column, HARM, None, "question", "missing column"),
    (_mistyped_column, HELP, None, "question", "expected type string, got int64"),
    (_label_outside_taxonomy, VALIDATION, 2, "class3", "'not a subcategory' is not in the taxonomy"),
    (_image_does_not_decode, TRAIN_2, 5, "image", "does not decode"),
    (_empty_question, HELP, 1, "question", "empty"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_bad_input_raises_a_located_error_and_writes_nothing(src, tmp_path, damage, file, row, field, words):
    damage(src)
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        import_upstream(src, out, progress=False)
    err = info.value
    assert (err.file, err.row, err.field) == (file, row, field)
    assert words in err.message and file in str(err)
    assert_no_output(out)


def test_class_map_errors_name_the_map_row_and_field(src, tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("image_sha256,class1,class2,class3\n"
                   f"{'a' * 64},Malicious Use,Security threats,weapon\n"
                   f"{'b' * 64},Malicious Use,Security threats,spoons\n")
    with pytest.raises(DataError) as info:
        import_upstream(src, tmp_path / "out", class_map=bad, progress=False)
    assert (info.value.file, info.value.row, info.value.field) == (str(bad), 1, "class3")

    ambiguous = tmp_path / "names.jsonl"
    entry = {"image_name": "0.jpg", "class1": "Malicious Use", "class2": "Security threats", "class3": "weapon"}
    ambiguous.write_text(json.dumps(entry) + "\n" + json.dumps(entry | {"class3": "cyber"}) + "\n")
    with pytest.raises(DataError, match="maps to two label paths") as info:
        import_upstream(src, tmp_path / "out", class_map=ambiguous, progress=False)
    assert (info.value.row, info.value.field) == (1, "image_name")
    assert_no_output(tmp_path / "out")
