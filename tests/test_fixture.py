"""Synthetic data (builder.dev.fixture): shape, split integrity, determinism, the upstream layout."""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets import Features, Image, load_dataset
from huggingface_hub import DatasetCard
from PIL import Image as PILImage

from builder.errors import DataError
from builder.dev.fixture import draw_image, fixture_split, write_fixture
from builder.format.schema import row_id
from builder.taxonomy import Taxonomy

TAX = Taxonomy.load()
ROWS, EVAL, SEED = 30, 6, 0


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def read_rows(root: Path, pattern: str) -> list[dict]:
    """Rows of every parquet file matching ``pattern``, each with '_file' (path relative to root)."""
    out = []
    for f in sorted(root.glob(pattern)):
        for row in pq.read_table(f).to_pylist():
            row["_file"] = f.relative_to(root).as_posix()
            out.append(row)
    return out


def split_of(rel: str) -> str:
    return rel.rsplit("/", 1)[-1].split("-")[0]


def file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha(p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("fx") / "spa_vl"
    summary = write_fixture(root, rows_per_domain=ROWS, eval_rows=EVAL, seed=SEED, progress=False)
    return root, summary


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    root = tmp_path_factory.mktemp("up") / "SPA-VL"
    counts = write_fixture(root, rows_per_domain=ROWS, eval_rows=EVAL, seed=SEED, layout="upstream", progress=False)
    return root, counts


# --- shape of our layout ------------------------------------------------------------------------------

def test_three_rows_per_image_one_split(fx):
    root, _ = fx
    rows = read_rows(root, "data/*/*.parquet")
    by_image = defaultdict(list)
    for r in rows:
        by_image[sha(r["image"]["bytes"])].append(r)
    pref = {h: rs for h, rs in by_image.items() if not rs[0]["_file"].startswith("data/test/")}
    assert len(pref) == math.ceil(ROWS / 3) * len(TAX.domains)
    for h, rs in by_image.items():
        files = {r["_file"] for r in rs}
        assert len(files) == 1, (h, files)  # one image, one folder, one split (test images included)
        if h in pref:
            assert len(rs) == 3
            assert sorted(r["question_type"] for r in rs) == ["easy", "hardq", "hards"]
            for key in ("image_name", "class1", "class2", "class3"):
                assert len({r[key] for r in rs}) == 1, key
            assert len({r["id"] for r in rs}) == 3
        else:
            assert len(rs) == 1
    # both eval splits are there, with distinct images
    assert Counter(split_of(r["_file"]) for r in rows if r["_file"].startswith("data/test/")) == {"harm": EVAL, "help": EVAL}
    assert len({r["id"] for r in rows}) == len(rows)


def test_splits_follow_the_image_index_so_every_domain_of_4_images_has_both(tmp_path):
    s = write_fixture(tmp_path / "f", rows_per_domain=12, eval_rows=1, progress=False)  # 4 images per domain
    for slug in TAX.slugs:
        assert s.rows[(slug, "train")] == 9 and s.rows[(slug, "validation")] == 3, slug
    assert [fixture_split(n) for n in range(8)] == ["train"] * 3 + ["validation"] + ["train"] * 4


def test_labels_in_taxonomy_and_right_folder(fx):
    root, _ = fx
    rows = read_rows(root, "data/*/*.parquet")
    assert rows
    for r in rows:
        assert TAX.contains(r["class1"], r["class2"], r["class3"]), r["_file"]
        folder = r["_file"].split("/")[1]
        if folder != "test":
            assert TAX.slug_for(r["class1"]) == folder
    # the fixture exercises more than one subcategory per domain
    for d in TAX.domains:
        assert len({r["class3"] for r in rows if r["class1"] == d.label}) > 1


def test_images_decode_and_rows_pass_check(fx):
    from builder.format.schema import check_row

    root, _ = fx
    for r in read_rows(root, "data/malicious_use/*.parquet") + read_rows(root, "data/test/*.parquet"):
        kind = "eval" if r["_file"].startswith("data/test/") else "preference"
        check_row(r, kind, TAX, decode="full")


def test_summary_matches_files(fx):
    root, summary = fx
    per_file = Counter()
    for f in root.glob("data/*/*.parquet"):
        per_file[(f.parent.name, split_of(f.name))] += pq.ParquetFile(f).metadata.num_rows
    assert +Counter(summary.rows) == +per_file
    card = DatasetCard.load(root / "README.md")
    assert "synthetic" in card.data.to_dict().get("tags", [])
    assert "Synthetic data" in card.text


def test_load_fixture_config(fx, tmp_path):
    root, summary = fx
    ds = load_dataset(str(root), "test", cache_dir=str(tmp_path / "cache"))
    assert len(ds["harm"]) == EVAL and len(ds["help"]) == EVAL
    assert isinstance(ds["harm"][0]["image"], PILImage.Image)


# --- determinism ----------------------------------------------------------------------------------------

def test_same_seed_byte_identical(fx, tmp_path):
    root, _ = fx
    again = tmp_path / "elsewhere" / "spa_vl"
    write_fixture(again, rows_per_domain=ROWS, eval_rows=EVAL, seed=SEED, progress=False)
    a, b = file_hashes(root), file_hashes(again)
    assert "README.md" in a and "manifest.json" in a
    assert a == b


def test_different_seed_differs(fx, tmp_path):
    root, _ = fx
    other = tmp_path / "spa_vl"
    write_fixture(other, rows_per_domain=ROWS, eval_rows=EVAL, seed=SEED + 1, progress=False)
    a, b = file_hashes(root), file_hashes(other)
    assert a["manifest.json"] != b["manifest.json"]
    imgs_a = {sha(r["image"]["bytes"]) for r in read_rows(root, "data/*/*.parquet")}
    imgs_b = {sha(r["image"]["bytes"]) for r in read_rows(other, "data/*/*.parquet")}
    assert not imgs_a & imgs_b


def test_draw_image_deterministic():
    assert draw_image("k", "label") == draw_image("k", "label")
    assert draw_image("k", "label") != draw_image("k2", "label")
    with PILImage.open(io.BytesIO(draw_image("k", "label", size=40))) as im:
        assert im.format == "JPEG" and im.size == (40, 40)


# --- sizes and arguments --------------------------------------------------------------------------------

@pytest.mark.parametrize("rows_per_domain", [0, 1, 4, 9])
def test_rows_per_domain_rounds_up_to_whole_images(tmp_path, rows_per_domain):
    s = write_fixture(tmp_path / "f", rows_per_domain=rows_per_domain, eval_rows=1, seed=5, progress=False)
    want = 3 * math.ceil(rows_per_domain / 3)
    for slug in TAX.slugs:
        assert sum(s.rows.get((slug, sp), 0) for sp in ("train", "validation")) == want, slug
    assert s.rows[("test", "harm")] == 1 and s.rows[("test", "help")] == 1
    on_disk = sum(pq.ParquetFile(f).metadata.num_rows for f in (tmp_path / "f").glob("data/*/*.parquet"))
    assert on_disk == want * len(TAX.slugs) + 2


def test_bad_arguments(tmp_path):
    with pytest.raises(DataError):
        write_fixture(tmp_path / "a", layout="hub", progress=False)
    with pytest.raises(DataError):
        write_fixture(tmp_path / "b", rows_per_domain=-1, progress=False)
    with pytest.raises(DataError):
        write_fixture(tmp_path / "c", eval_rows=-1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_refuses_non_empty_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    for layout in ("spa_vl", "upstream"):
        with pytest.raises(DataError):
            write_fixture(out, rows_per_domain=3, eval_rows=1, layout=layout, progress=False)
    assert [p.name for p in out.iterdir()] == ["x"]


def test_texture_images_realistic_size(tmp_path):
    root = tmp_path / "tex"
    write_fixture(root, rows_per_domain=3, eval_rows=1, image_size=384, texture=True, seed=9, progress=False)
    rows = read_rows(root, "data/*/*.parquet")
    images = {sha(r["image"]["bytes"]): r["image"]["bytes"] for r in rows}
    assert len(images) == len(TAX.slugs) + 2
    for data in images.values():
        assert 30_000 <= len(data) <= 60_000, len(data)
        with PILImage.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG" and im.size == (384, 384)
    # the plain images are far smaller
    assert len(draw_image("k", "label", size=384)) < 30_000


# --- the upstream layout --------------------------------------------------------------------------------

UPSTREAM_COLUMNS = {  # reference/spa_vl_facts.md §1
    "data/train-*.parquet": ["image", "question", "chosen", "rejected", "image_name"],
    "validation/validation-*.parquet": ["image", "question", "chosen", "rejected", "class1", "class2", "class3"],
    "test/harm-*.parquet": ["image", "question", "class1", "class2", "class3"],
    "test/help-*.parquet": ["image", "question", "class1", "class2", "class3"],
}
MEMBER = re.compile(r"^train/(?P<c1>[^/]+)/(?P<c2>[^/]+)/(?P<c3>[^/]+)/(?P<n>\d+)\.jpg$")


def zip_members(root: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(root / "train.zip") as zf:
        return {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}


def test_upstream_files_and_columns(upstream):
    root, counts = upstream
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert "train.zip" in names and "README.md" in names
    for pattern, columns in UPSTREAM_COLUMNS.items():
        files = sorted(root.glob(pattern))
        assert files, pattern
        for f in files:
            assert re.search(r"-\d{5}-of-\d{5}\.parquet$", f.name), f.name
            schema = pq.read_schema(f)
            assert schema.names == columns, f  # train has no class columns
            assert isinstance(Features.from_arrow_schema(schema)["image"], Image)
    # nothing else: meta.json is inside train.zip by default
    covered = {p.relative_to(root).as_posix() for pat in UPSTREAM_COLUMNS for p in root.glob(pat)}
    assert set(names) == covered | {"train.zip", "README.md", ".spa_vl_fixture.json"}  # the mark --overwrite needs
    # the returned counts are the files' row counts
    rows = lambda pat: sum(pq.ParquetFile(f).metadata.num_rows for f in root.glob(pat))  # noqa: E731
    assert counts == {"train": rows("data/train-*.parquet"), "validation": rows("validation/*.parquet"),
                      "harm": rows("test/harm-*.parquet"), "help": rows("test/help-*.parquet")}


def test_upstream_zip_tree_restarts_names_per_folder_and_holds_meta_json(upstream):
    root, _ = upstream
    members = zip_members(root)
    assert "train/meta.json" in members
    images = {name: data for name, data in members.items() if name != "train/meta.json"}
    per_folder = defaultdict(list)
    for name in images:
        m = MEMBER.match(name)
        assert m, name
        assert TAX.contains(m["c1"], m["c2"], m["c3"]), name
        per_folder[(m["c1"], m["c2"], m["c3"])].append(int(m["n"]))
    for folder, numbers in per_folder.items():
        assert sorted(numbers) == list(range(len(numbers))), folder  # 0.jpg, 1.jpg, ... in every folder
    base_names = Counter(n for numbers in per_folder.values() for n in numbers)
    assert max(base_names.values()) > 1  # bare names repeat across class folders, as upstream
    hashes = [sha(b) for b in images.values()]
    assert len(hashes) == len(set(hashes))  # every image once in the zip


def test_upstream_train_rows_index_meta_json_with_equal_texts(upstream):
    root, counts = upstream
    members = zip_members(root)
    meta = json.loads(members["train/meta.json"])
    train = read_rows(root, "data/train-*.parquet")
    assert len(meta) == len(train) == counts["train"]
    indices = [int(r["image_name"].removesuffix(".jpg")) for r in train]
    assert sorted(indices) == list(range(len(meta)))  # a global index: one meta entry per row
    assert sum(k != position for position, k in enumerate(indices)) > len(indices) // 2  # not the row's position
    for r, k in zip(train, indices):
        entry = meta[k]
        assert entry["id"] == k
        for field in ("question", "chosen", "rejected"):
            assert entry[field].encode() == r[field].encode()  # byte for byte
        tree_image = members[f"train/{entry['image']}"]
        assert tree_image != r["image"]["bytes"]  # re-encoded: the hash cannot match...
        with PILImage.open(io.BytesIO(tree_image)) as a, PILImage.open(io.BytesIO(r["image"]["bytes"])) as b:
            assert a.size == b.size  # ...but it is the same picture
    # the texts carry upstream's quirks
    questions = [r["question"] for r in train]
    assert any(q.startswith(" ") and not q.startswith("  ") for q in questions)
    assert any(q.startswith('\n\n"') for q in questions) and any("'" in q for q in questions)
    assert any("\n\n" in r["chosen"] for r in train)


def test_upstream_meta_json_in_the_repo_tree(tmp_path):
    root = tmp_path / "SPA-VL"
    write_fixture(root, rows_per_domain=12, eval_rows=1, layout="upstream", meta_in="tree", progress=False)
    assert "train/meta.json" not in zip_members(root)
    meta = json.loads((root / "train" / "meta.json").read_bytes())
    assert len(meta) == pq.ParquetFile(next(root.glob("data/train-*.parquet"))).metadata.num_rows
    with pytest.raises(DataError) as info:
        write_fixture(tmp_path / "x", layout="upstream", meta_in="elsewhere", progress=False)
    assert info.value.field == "meta_in"


def test_upstream_covers_all_53_class_paths_from_120_rows_per_domain(tmp_path):
    root = tmp_path / "SPA-VL"
    write_fixture(root, rows_per_domain=120, eval_rows=53, layout="upstream", progress=False)
    meta = json.loads(zip_members(root)["train/meta.json"])
    assert {tuple(e["image"].split("/")[:3]) for e in meta} == set(TAX.paths())
    harm = {(r["class1"], r["class2"], r["class3"]) for r in read_rows(root, "test/harm-*.parquet")}
    assert harm == set(TAX.paths())  # like upstream's test/harm: every path


def test_upstream_covers_every_image_once(upstream, fx):
    up, counts = upstream
    ours, _ = fx
    members = zip_members(up)
    meta = json.loads(members.pop("train/meta.json"))
    train = read_rows(up, "data/train-*.parquet")
    val = read_rows(up, "validation/*.parquet")
    train_imgs = {sha(r["image"]["bytes"]) for r in train}
    val_imgs = {sha(r["image"]["bytes"]) for r in val}
    assert len(train_imgs) == len(members)
    assert not train_imgs & val_imgs
    assert counts["train"] == 3 * len(members) and counts["validation"] == 3 * len(val_imgs)

    # the same seed in our layout has the same images, in the same splits, with the same labels
    our_rows = read_rows(ours, "data/*/*.parquet")
    our = {sha(r["image"]["bytes"]): r for r in our_rows}
    our_split = {h: split_of(r["_file"]) for h, r in our.items()}
    assert train_imgs == {h for h, s in our_split.items() if s == "train"}
    assert val_imgs == {h for h, s in our_split.items() if s == "validation"}
    assert len(train_imgs) + len(val_imgs) == math.ceil(ROWS / 3) * len(TAX.domains)
    our_by_id = {r["id"]: r for r in our_rows}
    for r in train:
        h = sha(r["image"]["bytes"])
        path = meta[int(r["image_name"].removesuffix(".jpg"))]["image"]
        assert tuple(path.split("/")[:3]) == (our[h]["class1"], our[h]["class2"], our[h]["class3"])
        assert our_by_id[row_id(h, r["question"], r["chosen"], r["rejected"])]["question"] == r["question"]
    for r in val:
        h = sha(r["image"]["bytes"])
        assert (r["class1"], r["class2"], r["class3"]) == (our[h]["class1"], our[h]["class2"], our[h]["class3"])
    for split in ("harm", "help"):
        up_imgs = {sha(r["image"]["bytes"]) for r in read_rows(up, f"test/{split}-*.parquet")}
        assert up_imgs == {h for h, s in our_split.items() if s == split}


def test_upstream_loads_with_its_readme(upstream, tmp_path):
    root, counts = upstream
    cache = str(tmp_path / "cache")
    ds = load_dataset(str(root), cache_dir=cache)
    assert set(ds) == {"train"} and len(ds["train"]) == counts["train"]
    assert list(ds["train"].features) == UPSTREAM_COLUMNS["data/train-*.parquet"]
    assert isinstance(ds["train"][0]["image"], PILImage.Image)
    test = load_dataset(str(root), "test", cache_dir=cache)
    assert len(test["harm"]) == counts["harm"] and len(test["help"]) == counts["help"]


def test_upstream_same_seed_byte_identical(upstream, tmp_path):
    root, _ = upstream
    again = tmp_path / "SPA-VL"
    write_fixture(again, rows_per_domain=ROWS, eval_rows=EVAL, seed=SEED, layout="upstream", progress=False)
    assert file_hashes(root) == file_hashes(again)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SPA-VL"]


def test_same_seed_byte_identical_across_processes(tmp_path):
    """A fresh interpreter with another hash seed writes the same bytes."""
    import os
    import subprocess
    import sys

    here = tmp_path / "here" / "spa_vl"
    there = tmp_path / "there" / "spa_vl"
    kw = dict(rows_per_domain=6, eval_rows=2, seed=3)
    write_fixture(here, progress=False, **kw)
    code = (f"from builder.dev.fixture import write_fixture; "
            f"write_fixture({str(there)!r}, progress=False, rows_per_domain=6, eval_rows=2, seed=3)")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1], env=env,
                   timeout=120, capture_output=True)
    assert file_hashes(here) == file_hashes(there)


def test_upstream_failed_overwrite_keeps_old(tmp_path, monkeypatch):
    import os

    out = tmp_path / "SPA-VL"
    write_fixture(out, rows_per_domain=3, eval_rows=1, layout="upstream", progress=False)
    before = file_hashes(out)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst) == out and ".tmp-" in Path(src).name:  # the new folder cannot move in
            raise OSError("simulated rename failure")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(DataError, match="simulated"):  # a disk error names the output folder
        write_fixture(out, rows_per_domain=3, eval_rows=1, layout="upstream", seed=1, overwrite=True, progress=False)
    monkeypatch.undo()
    assert out.is_dir() and file_hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SPA-VL"]


def test_the_fixture_command_writes_the_upstream_layout_and_checks_its_flags(tmp_path):
    import subprocess
    import sys

    spa_vl = str(Path(sys.executable).with_name("spa-vl"))
    run = lambda *a: subprocess.run([spa_vl, "fixture", *map(str, a)], capture_output=True, text=True, timeout=300)  # noqa: E731
    proc = run(tmp_path / "up", "--layout", "upstream", "--meta_in", "tree", "--rows_per_domain", 6, "--eval_rows", 1)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("fixture: 38 rows (upstream layout)")  # 6 domains x 2 train images x 3 rows + 2
    assert (tmp_path / "up" / "train" / "meta.json").is_file() and (tmp_path / "up" / "train.zip").is_file()
    bad = run(tmp_path / "x", "--meta_in", "tree")  # our layout has no meta.json
    assert bad.returncode == 2 and "--meta_in applies to --layout upstream only" in bad.stderr
    assert not (tmp_path / "x").exists()
