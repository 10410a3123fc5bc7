"""Importing the upstream sqrti/SPA-VL layout: train labels from meta.json, counts, configs, the Hub, bad input.

The upstream fixture is the real layout (reference/spa_vl_facts.md §1-2): train rows without labels whose
``image_name`` ``k.jpg`` indexes ``train/meta.json`` inside ``train.zip``, a ``class1/class2/class3/<n>.jpg``
tree whose names restart per folder and whose bytes are re-encoded (no image hash matches the parquet's),
texts with upstream's leading spaces, quotes and "\\n\\n". The ground truth is the same seed written in our
layout, labels and all.
"""

from __future__ import annotations

import csv
import json
import shutil
import socket
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_server import HubServer, hub_env

import builder.upstream.archive
from builder.errors import DataError
from builder.dev.fixture import write_fixture
from builder.format.schema import image_sha256, row_id
from builder.taxonomy import Taxonomy
from builder.upstream.importer import import_upstream
from builder.upstream.meta import NO_ENTRY, NO_INDEX, TEXTS_DIFFER

ROWS = dict(rows_per_domain=36, eval_rows=4, seed=0, progress=False)  # 12 images per domain, 10 of them train
VALIDATION = "validation/validation-00000-of-00001.parquet"
HARM, HELP = "test/harm-00000-of-00001.parquet", "test/help-00000-of-00001.parquet"
META = "train/meta.json"
LABELS = ("class1", "class2", "class3")
UNATTRIBUTED = (None, None, None)
TAX = Taxonomy.load()
SPA_VL = str(Path(sys.executable).with_name("spa-vl"))
ANY = object()


# --- fixtures and helpers ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """(folder in the upstream layout, its row counts per split). Tests copy it before changing it."""
    root = tmp_path_factory.mktemp("upstream") / "SPA-VL"
    counts = write_fixture(root, layout="upstream", max_shard_bytes=1, **ROWS)
    assert len(train_files(root)) >= 2  # the join runs across shards
    return root, counts


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    """The same synthetic data written in our layout, labels and all: the ground truth."""
    root = tmp_path_factory.mktemp("truth") / "spa_vl"
    write_fixture(root, **ROWS)
    return root


@pytest.fixture(scope="module")
def expected_labels(truth):
    """id -> (class1, class2, class3) of every row of the ground truth."""
    return labels_by_id(truth)


@pytest.fixture(scope="module")
def imported(upstream, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "spa_vl"
    return out, import_upstream(upstream[0], out, progress=False)


@pytest.fixture
def src(upstream, tmp_path):
    """A private copy of the upstream fixture, free to change."""
    copy = tmp_path / "SPA-VL"
    shutil.copytree(upstream[0], copy)
    return copy


def train_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.glob("data/train-*.parquet"))


def labels_by_id(folder: Path, *, test: bool = True) -> dict[str, tuple]:
    """id -> (class1, class2, class3) of every row of a dataset folder (``test=False``: train and validation)."""
    out = {}
    for path in sorted((folder / "data").rglob("*.parquet")):
        if not test and path.parent.name == "test":
            continue
        for r in pq.read_table(path, columns=["id", *LABELS]).to_pylist():
            out[r["id"]] = (r["class1"], r["class2"], r["class3"])
    return out


def upstream_train(root: Path) -> list[dict]:
    """Every upstream train row with its id (as the importer computes it) and its file and row."""
    rows = []
    for rel in train_files(root):
        for i, r in enumerate(pq.read_table(root / rel).to_pylist()):
            sha = image_sha256(r["image"]["bytes"])
            rows.append({**r, "id": row_id(sha, r["question"], r["chosen"], r["rejected"]), "sha": sha,
                         "file": rel, "row": i})
    return rows


def read_members(zip_path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(zip_path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def write_members(zip_path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if name.endswith(".json") else zipfile.ZIP_STORED)


def edit_meta(src: Path, change) -> None:
    """Apply ``change(entries)`` to the meta.json inside the folder's train.zip."""
    members = read_members(src / "train.zip")
    entries = json.loads(members[META])
    change(entries)
    members[META] = json.dumps(entries).encode()
    write_members(src / "train.zip", members)


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


# --- the real layout, through meta.json ---------------------------------------------------------------------
def test_every_train_row_gets_its_exact_class3_through_meta_json_alone(upstream, imported, truth, expected_labels):
    root, counts = upstream
    out, report = imported
    # the tree cannot help: its bytes are re-encoded, so no tree image has a train image's hash
    tree = {image_sha256(data) for name, data in read_members(root / "train.zip").items() if name != META}
    assert tree and not tree & {r["sha"] for r in upstream_train(root)}
    assert report.rows_in == report.rows_out == counts
    assert report.attributed_by == {"meta": counts["train"], "image_hash": 0, "class_map": 0, "image_name": 0}
    assert report.unattributed == 0 and report.commit is None and report.source == "SPA-VL"
    assert report.label_sources["meta"] == "train.zip member train/meta.json"
    assert labels_by_id(out) == expected_labels  # same ids (content hashes) and the right labels
    got = Counter(labels for labels in labels_by_id(out, test=False).values())
    want = Counter(labels for labels in labels_by_id(truth, test=False).values())
    assert got == want and len(want) > 20  # rows per class path: the fixture's truth
    assert report.line().startswith(f"imported {sum(counts.values())} rows (train {counts['train']}, ")
    assert report.line().endswith(f"; train labels: meta.json {counts['train']}; every train row attributed")
    assert f"{report.images} images verified" in report.line()
    assert not (out / "data" / "unattributed").exists()
    assert "imported from sqrti/SPA-VL" in (out / "README.md").read_text()


def test_texts_round_trip_byte_for_byte(upstream, imported):
    out, _ = imported
    ours = {}
    for path in (out / "data").rglob("train-*.parquet"):
        for r in pq.read_table(path, columns=["id", "image_name", "question", "chosen", "rejected"]).to_pylist():
            ours[r["id"]] = r
    theirs = upstream_train(upstream[0])
    assert len(ours) == len(theirs)
    for r in theirs:
        mine = ours[r["id"]]
        for name in ("question", "chosen", "rejected", "image_name"):
            assert mine[name].encode() == r[name].encode(), name
    assert any(r["question"].startswith('\n\n"') for r in theirs) and any(r["question"][:1] == " " for r in theirs)


def test_domain_config_of_an_import_has_only_its_domain(imported, truth, tmp_path):
    out, _ = imported
    domain = TAX.domain("malicious_use").label
    ds = load(out, "malicious_use", tmp_path)
    domains = Counter(labels[0] for labels in labels_by_id(truth, test=False).values())
    assert ds["train"].num_rows + ds["validation"].num_rows == domains[domain]
    for split in ("train", "validation"):
        assert ds[split].num_rows > 0 and set(ds[split]["class1"]) == {domain}
        assert set(ds[split]["question_type"]) == {None}  # upstream does not record it


def test_meta_json_in_the_repo_tree_or_given_with_meta(upstream, expected_labels, tmp_path):
    tree = tmp_path / "tree"
    write_fixture(tree, layout="upstream", meta_in="tree", **ROWS)
    report = import_upstream(tree, tmp_path / "a", progress=False)
    assert report.attributed_by["meta"] == upstream[1]["train"] and report.label_sources["meta"] == META
    assert labels_by_id(tmp_path / "a") == expected_labels

    given = tmp_path / "elsewhere.json"
    shutil.move(tree / META, given)
    (tree / "train.zip").unlink()  # no tree, no meta.json in the folder: only --meta labels
    report = import_upstream(tree, tmp_path / "b", meta=given, progress=False)
    assert report.attributed_by["meta"] == upstream[1]["train"] and report.label_sources == {"meta": str(given)}
    assert labels_by_id(tmp_path / "b") == expected_labels
    with pytest.raises(DataError) as info:
        import_upstream(tree, tmp_path / "c", meta=tmp_path / "absent.json", progress=False)
    assert info.value.field == "meta"
    assert_no_output(tmp_path / "c")


def test_an_extracted_train_zip_is_read_as_the_repo_tree(src, expected_labels, tmp_path):
    with zipfile.ZipFile(src / "train.zip") as zf:
        zf.extractall(src)  # train/meta.json and train/<class1>/<class2>/<class3>/<n>.jpg
    (src / "train.zip").unlink()
    report = import_upstream(src, tmp_path / "out", progress=False)
    assert report.attributed_by["meta"] == report.rows_in["train"] and report.unattributed == 0
    assert labels_by_id(tmp_path / "out") == expected_labels


def test_meta_entries_that_do_not_match_leave_rows_unattributed_and_counted(src, upstream, expected_labels, tmp_path):
    rows = upstream_train(src)
    k_other_texts = [int(r["image_name"].removesuffix(".jpg")) for r in rows[:3]]
    last = len(rows) - 1

    def change(entries):
        for k in k_other_texts[:2]:
            entries[k]["question"] = entries[k]["question"].lstrip()  # one leading space less: not the row's text
        entries[k_other_texts[2]]["rejected"] += " "
        entries.pop()  # the row that pointed at the last entry now points past the end
    edit_meta(src, change)
    second = src / train_files(src)[1]
    rewrite(second, lambda rs: rs[0].update(image_name="IMG_0001.jpg"))  # not an index
    lost_ids = {rows[0]["id"], rows[1]["id"], rows[2]["id"]}
    lost_ids |= {r["id"] for r in rows if r["image_name"] == f"{last}.jpg"}
    lost_ids |= {r["id"] for r in upstream_train(src) if r["image_name"] == "IMG_0001.jpg"}

    out = tmp_path / "out"
    report = import_upstream(src, out, progress=False)
    assert report.rows_out == report.rows_in == upstream[1]
    assert report.unattributed == 5 == len(lost_ids)
    assert report.reasons == {TEXTS_DIFFER: 3, NO_ENTRY: 1, NO_INDEX: 1}  # never guessed from the tree
    assert report.attributed_by["meta"] == upstream[1]["train"] - 5 and report.attributed_by["image_hash"] == 0
    assert f"5 train rows unattributed ({TEXTS_DIFFER} 3, " in report.line()
    assert report.line().endswith("kept in the default config only")
    assert (train_files(src)[0], rows[0]["row"], TEXTS_DIFFER) in report.unattributed_examples
    got = labels_by_id(out)
    assert {i for i, labels in got.items() if labels == UNATTRIBUTED} == lost_ids
    assert {i: v for i, v in got.items() if i not in lost_ids} == {
        i: v for i, v in expected_labels.items() if i not in lost_ids}
    default = load(out, "default", tmp_path)
    assert default["train"].num_rows == upstream[1]["train"] and lost_ids <= set(default["train"]["id"])
    in_domains = sum(load(out, slug, tmp_path)["train"].num_rows for slug in TAX.slugs)
    assert in_domains == upstream[1]["train"] - 5


def test_a_bare_name_collision_is_used_only_when_asked(src, upstream, expected_labels, tmp_path):
    members = read_members(src / "train.zip")
    del members[META]  # no meta.json: the tree is all there is
    write_members(src / "train.zip", members)
    plain = import_upstream(src, tmp_path / "plain", progress=False)
    assert plain.unattributed == upstream[1]["train"]  # re-encoded tree: no hash matches, and names are not used
    assert plain.reasons == {"not in the image tree or class map": upstream[1]["train"]}

    asked = import_upstream(src, tmp_path / "asked", match_bare_names=True, progress=False)
    by_name = asked.attributed_by["image_name"]
    assert by_name > 0 and asked.unattributed == upstream[1]["train"] - by_name
    got = labels_by_id(tmp_path / "asked")
    wrong = [i for i, labels in got.items() if labels != UNATTRIBUTED and labels != expected_labels[i]]
    assert wrong  # why it is behind a flag: image_name is a meta.json index, and the name means nothing


def test_the_image_tree_labels_by_hash_reading_only_images_of_a_wanted_size(src, upstream, expected_labels, tmp_path,
                                                                            monkeypatch):
    # A tree cut from the parquet bytes (no re-encoding), and no meta.json: the hash decides.
    meta = json.loads(read_members(src / "train.zip")[META])
    members = {f"train/{meta[int(r['image_name'][:-4])]['image']}": r["image"]["bytes"] for r in upstream_train(src)}
    members["train/Extra/Not/Needed/0.jpg"] = b"\xff\xd8" + b"x" * 99_999 + b"\xff\xd9"  # no train image has its size
    write_members(src / "train.zip", members)
    read = []
    real_open = builder.upstream.archive.SafeZip.open
    monkeypatch.setattr(builder.upstream.archive.SafeZip, "open", lambda self, name: read.append(name) or real_open(self, name))
    report = import_upstream(src, tmp_path / "out", progress=False)
    assert report.attributed_by == {"meta": 0, "image_hash": upstream[1]["train"], "class_map": 0, "image_name": 0}
    assert labels_by_id(tmp_path / "out") == expected_labels
    assert "train/Extra/Not/Needed/0.jpg" not in read and len(read) == len(members) - 1


def test_with_meta_json_no_image_of_the_tree_is_read(src, monkeypatch, tmp_path):
    read = []
    real_open = builder.upstream.archive.SafeZip.open
    monkeypatch.setattr(builder.upstream.archive.SafeZip, "open", lambda self, name: read.append(name) or real_open(self, name))
    import_upstream(src, tmp_path / "out", progress=False)
    assert read == [META]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_class_map_labels_what_is_left(src, upstream, expected_labels, truth, tmp_path, fmt):
    (src / "train.zip").unlink()  # no meta.json, no tree: the class map alone labels the rows
    path = tmp_path / f"labels.{fmt}"
    by_id = labels_by_id(truth)
    entries = [{"image_sha256": r["sha"], **dict(zip(LABELS, by_id[r["id"]]))} for r in upstream_train(src)]
    if fmt == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, ["image_sha256", *LABELS])
            writer.writeheader()
            writer.writerows(entries)
    else:
        path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    report = import_upstream(src, tmp_path / "out", class_map=path, progress=False)
    assert report.attributed_by == {"meta": 0, "image_hash": 0, "class_map": upstream[1]["train"], "image_name": 0}
    assert labels_by_id(tmp_path / "out") == expected_labels


def test_without_any_label_source_every_train_row_is_unattributed_and_said_so(src, upstream, tmp_path):
    (src / "train.zip").unlink()
    report = import_upstream(src, tmp_path / "out", progress=False)
    assert report.unattributed == upstream[1]["train"] and report.rows_out == upstream[1]
    assert report.reasons == {"no label source (no meta.json, image tree or class map)": upstream[1]["train"]}


# --- the Hub -----------------------------------------------------------------------------------------------
def test_import_from_the_hub_at_a_revision(upstream, expected_labels, tmp_path, monkeypatch):
    import huggingface_hub.constants as hconst

    root, counts = upstream
    with HubServer({"sqrti/SPA-VL": {"main": root, "v1.0": root}}) as hub:
        hub_env(monkeypatch, hub, tmp_path / "hf_home")
        report = import_upstream("sqrti/SPA-VL", tmp_path / "out", revision="v1.0", progress=False)
        assert report.commit == hub.commit("sqrti/SPA-VL", "v1.0") and report.source == "sqrti/SPA-VL"
        assert ("GET", "/api/datasets/sqrti/SPA-VL/revision/v1.0") in hub.requests
    assert report.rows_out == report.rows_in == counts and report.attributed_by["meta"] == counts["train"]
    assert labels_by_id(tmp_path / "out") == expected_labels
    fetched = {p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p in hub.requests if m == "GET" and "/resolve/" in p}
    assert fetched == {"train.zip", *train_files(root), VALIDATION, HARM, HELP}  # README and meta files are not needed

    # The server is gone: offline, the same revision imports again from the cache.
    monkeypatch.setattr(hconst, "HF_HUB_OFFLINE", True)
    again = import_upstream("sqrti/SPA-VL", tmp_path / "again", revision="v1.0", progress=False)
    assert again.commit == report.commit and again.rows_out == counts


def test_a_hub_repo_with_meta_json_in_its_tree_is_imported_without_train_zip(tmp_path, monkeypatch, expected_labels):
    root = tmp_path / "SPA-VL"
    write_fixture(root, layout="upstream", meta_in="tree", **ROWS)
    with HubServer({"sqrti/SPA-VL": {"main": root}}) as hub:
        hub_env(monkeypatch, hub, tmp_path / "hf_home")
        report = import_upstream("sqrti/SPA-VL", tmp_path / "out", progress=False)
    assert report.unattributed == 0 and labels_by_id(tmp_path / "out") == expected_labels
    assert not [p for _, p in hub.requests if p.endswith("/train.zip")]
    assert [p for _, p in hub.requests if p.endswith("/train/meta.json")]


def test_hub_import_with_a_meta_file_does_not_fetch_train_zip(upstream, tmp_path, monkeypatch):
    meta = tmp_path / "meta.json"
    meta.write_bytes(read_members(upstream[0] / "train.zip")[META])
    with HubServer({"sqrti/SPA-VL": {"main": upstream[0]}}) as hub:
        hub_env(monkeypatch, hub, tmp_path / "hf_home")
        report = import_upstream("sqrti/SPA-VL", tmp_path / "out", meta=meta, progress=False)
    assert report.attributed_by["meta"] == upstream[1]["train"]
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
    (src / train_files(src)[1]).write_bytes(b"this is not parquet at all" * 40)


def _truncated(src: Path):
    data = (src / VALIDATION).read_bytes()
    (src / VALIDATION).write_bytes(data[: len(data) // 2])


def _scrambled_pages(src: Path):
    path = src / train_files(src)[0]
    data = bytearray(path.read_bytes())  # footer intact, data pages garbage
    for i in range(len(data) // 4, len(data) // 2):
        data[i] = (data[i] * 7 + 13) % 256
    path.write_bytes(bytes(data))


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
    rewrite(src / train_files(src)[1], lambda rows: rows[5].update(image={"bytes": b"\x89PNG garbage", "path": None}))


def _jpeg_tail_cut(src: Path):
    def cut(rows):
        data = rows[4]["image"]["bytes"]
        rows[4]["image"] = {"bytes": data[: len(data) * 3 // 4], "path": None}  # header, format and size intact
    rewrite(src / VALIDATION, cut)


def _empty_question(src: Path):
    rewrite(src / HELP, lambda rows: rows[1].update(question="   "))


def _invalid_utf8(src: Path):
    path = src / train_files(src)[0]
    table = pq.read_table(path)
    cells = table.column("chosen").cast(pa.binary()).to_pylist()
    cells[3] = b"caf\xe9 au lait"  # Latin-1, written unchecked into a string column
    binary = pa.array(cells, pa.binary())
    text = pa.StringArray.from_buffers(len(binary), binary.buffers()[1], binary.buffers()[2])
    i = table.schema.get_field_index("chosen")
    pq.write_table(table.set_column(i, table.schema.field(i), text), path)


def _meta_label_outside_taxonomy(src: Path):
    edit_meta(src, lambda entries: entries[7].update(image="/".join(TAX.paths()[0][:2]) + "/spoons/0.jpg"))


def _meta_not_json(src: Path):
    members = read_members(src / "train.zip")
    members[META] = members[META][:-40] + b"}, {oops"
    write_members(src / "train.zip", members)


def _zip_bomb(src: Path):
    members = read_members(src / "train.zip")
    members["train/big.bin.jpg"] = bytes(20 * 2**20)  # 20 MiB of zeros: about 20 kB deflated
    with zipfile.ZipFile(src / "train.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


@pytest.mark.parametrize("damage, file, row, field, words", [
    (_garbage, "data/train-00001-of-", None, None, "not a readable parquet file"),
    (_truncated, VALIDATION, None, None, "not a readable parquet file"),
    (_scrambled_pages, "data/train-00000-of-", None, None, "parquet data unreadable"),
    (_broken_zip, "train.zip", None, None, "not a readable zip file"),
    (_zip_bomb, "train.zip", None, None, "member 'train/big.bin.jpg' expands"),
    (_missing_column, HARM, None, "question", "missing column"),
    (_mistyped_column, HELP, None, "question", "expected type string, got int64"),
    (_label_outside_taxonomy, VALIDATION, 2, "class3", "'not a subcategory' is not in the taxonomy"),
    (_meta_label_outside_taxonomy, "train.zip member train/meta.json", 7, "class3", "'spoons' (class path"),
    (_meta_not_json, "train.zip member train/meta.json", ANY, None, "not valid JSON"),
    (_image_does_not_decode, "data/train-00001-of-", 5, "image", "does not decode"),
    (_jpeg_tail_cut, VALIDATION, 4, "image", "cut short (the JPEG end marker FFD9 missing)"),
    (_empty_question, HELP, 1, "question", "empty"),
    (_invalid_utf8, "data/train-00000-of-", 3, "chosen", "not valid UTF-8: byte 0xe9 at offset 3"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_bad_input_raises_a_located_error_and_writes_nothing(src, tmp_path, damage, file, row, field, words):
    damage(src)
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        import_upstream(src, out, progress=False)
    err = info.value
    assert err.file.startswith(file) and err.field == field and (row is ANY or err.row == row), str(err)
    assert words in err.message, err.message
    assert file in str(err)
    assert_no_output(out)


def test_invalid_utf8_on_the_command_line_exits_2_naming_file_row_and_field(src, tmp_path):
    _invalid_utf8(src)
    proc = subprocess.run([SPA_VL, "import_upstream", str(src), str(tmp_path / "out"), "--progress", "False"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"spa-vl: error: {train_files(src)[0]}: row 3: field chosen: not valid UTF-8")
    assert_no_output(tmp_path / "out")


def test_class_map_errors_name_the_map_row_and_field(src, tmp_path):
    bad = tmp_path / "labels.csv"
    path = TAX.paths()[0]
    bad.write_text("image_sha256,class1,class2,class3\n"
                   f"{'a' * 64},{path[0]},{path[1]},{path[2]}\n"
                   f"{'b' * 64},{path[0]},{path[1]},spoons\n")
    with pytest.raises(DataError) as info:
        import_upstream(src, tmp_path / "out", class_map=bad, progress=False)
    assert (info.value.file, info.value.row, info.value.field) == (str(bad), 1, "class3")

    ambiguous = tmp_path / "names.jsonl"
    entry = {"image_name": "0.jpg", **dict(zip(LABELS, TAX.paths()[0]))}
    ambiguous.write_text(json.dumps(entry) + "\n" + json.dumps(entry | {"class3": TAX.paths()[1][2]}) + "\n")
    with pytest.raises(DataError, match="maps to two label paths") as info:
        import_upstream(src, tmp_path / "out", class_map=ambiguous, progress=False)
    assert (info.value.row, info.value.field) == (1, "image_name")
    assert_no_output(tmp_path / "out")


def test_a_tiny_fixture_keeps_every_file_group_and_imports(tmp_path):
    counts = write_fixture(tmp_path / "up", rows_per_domain=3, eval_rows=1, layout="upstream", progress=False)
    assert counts == {"train": 18, "validation": 0, "harm": 1, "help": 1}  # one train image per domain
    assert pq.ParquetFile(tmp_path / "up" / VALIDATION).metadata.num_rows == 0  # empty, like a split upstream never lacks
    report = import_upstream(tmp_path / "up", tmp_path / "out", progress=False)
    assert report.rows_out == counts and report.attributed_by["meta"] == 18
