"""The dataset folder (builder.format: layout, manifest, writer): layout, manifest, card, configs, atomicity,
split assignment."""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets import load_dataset
from huggingface_hub import DatasetCard
from PIL import Image as PILImage

from builder.errors import DataError
from builder.format.layout import split_for
from builder.format.manifest import build_config_hash, read_manifest
from builder.format.writer import DatasetFolderWriter
from builder.format.schema import image_sha256, row_id
from builder.taxonomy import Taxonomy
from dataset_card.card import render_folder_card

TAX = Taxonomy.load()
SLUGS = list(TAX.slugs)
QTYPES = ("easy", "hardq", "hards")


def _png(key: str) -> bytes:
    h = hashlib.sha256(key.encode()).digest()
    buf = io.BytesIO()
    PILImage.new("RGB", (12, 10), (h[0], h[1], h[2])).save(buf, format="PNG")
    return buf.getvalue()


def pref_rows(key: str, path: tuple[str, str, str] | None) -> list[dict]:
    """Three preference rows of one image; ``path=None`` gives unattributed rows."""
    data = _png(key)
    c1, c2, c3 = path or (None, None, None)
    rows = []
    for qt in QTYPES:
        q, ch, rj = f"{qt} question about {key}?", f"safe answer {key}", f"unsafe answer {key}"
        rows.append({
            "id": row_id(image_sha256(data), q, ch, rj), "image": {"bytes": data, "path": f"{key}.png"},
            "image_name": f"{key}.png", "question": q, "question_type": qt, "chosen": ch, "rejected": rj,
            "class1": c1, "class2": c2, "class3": c3, "chosen_model": "a", "rejected_model": "b",
            "judge_rationale": None, "question_unsafe": qt != "easy", "chosen_unsafe": False, "rejected_unsafe": True,
        })
    return rows


def eval_row(key: str, path: tuple[str, str, str]) -> dict:
    data = _png(key)
    q = f"eval question {key}?"
    return {"id": row_id(image_sha256(data), q), "image": {"bytes": data, "path": f"{key}.png"},
            "image_name": f"{key}.png", "question": q, "class1": path[0], "class2": path[1], "class3": path[2]}


def build(out: Path, *, unattributed: int = 0, **kw) -> dict:
    """Write a folder: per domain 2 train images and 1 validation image, 3 harm + 2 help rows.

    Returns the expected row counts: {(folder, split): rows}.
    """
    expected = Counter()
    with DatasetFolderWriter(out, build_config={"source": "test"}, finish=render_folder_card, **kw) as w:
        for d in TAX.domains:
            paths = [(d.label, c, s.label) for c, s in d.subcategories]
            for i, split in enumerate(("train", "validation", "train")):
                for row in pref_rows(f"{d.slug}-{i}", paths[i % len(paths)]):
                    w.add(row, split)
                    expected[(d.slug, split)] += 1
        for i in range(unattributed):
            for row in pref_rows(f"unattributed-{i}", None):
                w.add(row, "train")
                expected[("unattributed", "train")] += 1
        all_paths = TAX.paths()
        for split, n in (("harm", 3), ("help", 2)):
            for i in range(n):
                w.add(eval_row(f"{split}-{i}", all_paths[i * 11 % len(all_paths)]), split)
                expected[("test", split)] += 1
    return {"writer": w, "expected": expected}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder") / "spa_vl"
    info = build(root, version="1.2.3")
    return root, info["writer"], info["expected"]


@pytest.fixture(scope="module")
def folder_unattributed(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder_u") / "spa_vl"
    info = build(root, unattributed=2)
    return root, info["expected"]


def _rel_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


# --- layout -----------------------------------------------------------------------------------------

ALLOWED = [  # ARCHITECTURE.md, "The dataset folder", and the taxonomy the folder was built with
    "README.md", "CHANGELOG.md", "manifest.json", "taxonomy.yaml", "assets/*.png",
    "data/*/train-?????-of-?????.parquet", "data/*/validation-?????-of-?????.parquet",
    "data/test/harm-?????-of-?????.parquet", "data/test/help-?????-of-?????.parquet",
]


def test_layout_is_exactly_the_architecture(folder):
    root, _, _ = folder
    files = _rel_files(root)
    for f in files:
        assert any(fnmatch.fnmatchcase(f, pat) for pat in ALLOWED), f
    assert "README.md" in files and "manifest.json" in files
    data_dirs = {f.split("/")[1] for f in files if f.startswith("data/")}
    assert data_dirs == set(SLUGS) | {"test"}  # no unattributed folder when every row is labelled
    for slug in SLUGS:
        for split in ("train", "validation"):
            assert any(fnmatch.fnmatchcase(f, f"data/{slug}/{split}-*") for f in files), (slug, split)
    for split in ("harm", "help"):
        assert any(fnmatch.fnmatchcase(f, f"data/test/{split}-*") for f in files), split
    assert not any(f.startswith("data/test/") and ("train" in f or "validation" in f) for f in files)
    # nothing hidden or temporary anywhere, and no sibling left next to the folder
    assert not any(part.startswith(".") for f in files for part in f.split("/"))
    assert sorted(p.name for p in root.parent.iterdir()) == [root.name]


def test_rows_land_in_their_domain_folder(folder):
    root, _, expected = folder
    got = Counter()
    for f in root.glob("data/*/*.parquet"):
        table = pq.read_table(f)
        folder_name, split = f.parent.name, f.name.split("-")[0]
        got[(folder_name, split)] += table.num_rows
        if folder_name != "test":
            assert set(table.column("class1").to_pylist()) <= {TAX.domain(folder_name).label}
    assert +got == +expected


def test_manifest_lists_every_parquet(folder):
    root, w, _ = folder
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest == read_manifest(root)
    parquet = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.parquet"))
    assert sorted(manifest["files"]) == parquet
    for rel, entry in manifest["files"].items():
        data = (root / rel).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest(), rel
        assert entry["bytes"] == len(data), rel
        assert entry["rows"] == _rows(root / rel), rel
    assert manifest["version"] == "1.2.3"
    assert manifest["build_config_hash"] == build_config_hash({"source": "test"})
    assert manifest["taxonomy"] == {"name": TAX.name, "sha256": TAX.sha256, "file": "taxonomy.yaml"}
    assert (root / "taxonomy.yaml").read_bytes() == Path(TAX.source).read_bytes()
    assert w.summary.files == len(parquet)
    assert w.summary.bytes == sum(e["bytes"] for e in manifest["files"].values())


def test_read_manifest_errors(tmp_path):
    with pytest.raises(DataError) as e:
        read_manifest(tmp_path)
    assert e.value.file.endswith("manifest.json")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError):
        read_manifest(tmp_path)


def test_build_config_hash():
    assert build_config_hash({"a": 1, "b": 2}) == build_config_hash({"b": 2, "a": 1})
    assert build_config_hash({"a": 1}) != build_config_hash({"a": 2})


# --- load_dataset --------------------------------------------------------------------------------------

def test_load_domain_config(folder, tmp_path):
    root, _, expected = folder
    ds = load_dataset(str(root), "malicious_use", cache_dir=str(tmp_path / "cache"))
    assert set(ds) == {"train", "validation"}
    for split in ("train", "validation"):
        assert len(ds[split]) == expected[("malicious_use", split)]
        assert set(ds[split]["class1"]) == {"Malicious Use"}
    img = ds["train"][0]["image"]
    assert isinstance(img, PILImage.Image) and img.size == (12, 10)


def test_load_default_config(folder, tmp_path):
    root, _, expected = folder
    ds = load_dataset(str(root), cache_dir=str(tmp_path / "cache"))
    assert set(ds) == {"train", "validation"}
    for split in ("train", "validation"):
        assert len(ds[split]) == sum(v for (f, s), v in expected.items() if s == split)
        assert set(ds[split]["class1"]) == {d.label for d in TAX.domains}
    assert "harm" not in ds and "help" not in ds


def test_load_test_config(folder, tmp_path):
    root, _, expected = folder
    ds = load_dataset(str(root), "test", cache_dir=str(tmp_path / "cache"))
    assert set(ds) == {"harm", "help"}
    assert len(ds["harm"]) == expected[("test", "harm")] and len(ds["help"]) == expected[("test", "help")]
    assert list(ds["harm"].features) == ["id", "image", "image_name", "question", "class1", "class2", "class3"]
    assert isinstance(ds["help"][0]["image"], PILImage.Image)


# --- the card -------------------------------------------------------------------------------------

def test_card_yaml_loads_and_counts_match_files(folder):
    root, _, _ = folder
    card = DatasetCard.load(root / "README.md")
    data = card.data.to_dict()
    configs = {c["config_name"]: {f["split"]: f["path"] for f in c["data_files"]} for c in data["configs"]}
    expected_configs = {"default": {"train": "data/*/train-*", "validation": "data/*/validation-*"},
                        "test": {"harm": "data/test/harm-*", "help": "data/test/help-*"}}
    for slug in SLUGS:
        expected_configs[slug] = {"train": f"data/{slug}/train-*", "validation": f"data/{slug}/validation-*"}
    assert configs == expected_configs
    default = [c for c in data["configs"] if c.get("default")]
    assert [c["config_name"] for c in default] == ["default"]

    files = _rel_files(root)
    infos = {i["config_name"]: i for i in data["dataset_info"]}
    assert set(infos) == set(configs)
    for name, splits in configs.items():
        got = {s["name"]: s["num_examples"] for s in infos[name]["splits"]}
        want = {split: sum(_rows(root / f) for f in files if fnmatch.fnmatch(f, glob))
                for split, glob in splits.items()}
        assert got == want, name
    assert data["license"] == "cc-by-4.0"


def test_summary_matches_files(folder):
    root, w, expected = folder
    s = w.summary
    assert s.root == root
    assert +Counter(s.rows) == +expected
    assert s.config_rows["malicious_use"] == {sp: expected[("malicious_use", sp)] for sp in ("train", "validation")}
    assert s.total_rows == sum(expected.values())


# --- overwrite and atomicity ----------------------------------------------------------------------

def test_existing_folder_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError) as e:
        DatasetFolderWriter(out)
    assert e.value.file == str(out)
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_empty_existing_folder_is_fine(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    build(out)
    assert (out / "manifest.json").exists()


def test_overwrite_replaces_a_dataset_folder(tmp_path):
    out = tmp_path / "out"
    build(out)
    (out / "stale.txt").write_text("old")
    build(out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old-* or .tmp-* left


def _bad_write(out: Path, bad: dict, split: str, **kw):
    with pytest.raises(DataError) as e:
        with DatasetFolderWriter(out, row_group_rows=2, max_shard_bytes=1, **kw) as w:
            for d in TAX.domains:  # enough good rows to have flushed shards to disk
                for i in range(2):
                    for row in pref_rows(f"{d.slug}-{i}", (d.label, *[(c, s.label) for c, s in d.subcategories][0])):
                        w.add(row, "train")
            w.add(bad, split, file="input.jsonl", index=41)
    return e.value


def test_bad_row_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    bad = pref_rows("bad", (TAX.domains[0].label, "Toxic", "bully"))[0] | {"question": "   "}
    err = _bad_write(out, bad, "validation")
    assert (err.file, err.row, err.field) == ("input.jsonl", 41, "question")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no .out.tmp-* sibling either


def test_bad_row_keeps_old_folder(tmp_path):
    out = tmp_path / "out"
    build(out)
    before = {f: (out / f).read_bytes() for f in _rel_files(out)}
    bad = eval_row("bad", ("Malicious Use", "Security threats", "not a label"))
    err = _bad_write(out, bad, "harm", overwrite=True)
    assert err.field == "class3"
    assert {f: (out / f).read_bytes() for f in _rel_files(out)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_appears_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with DatasetFolderWriter(out, row_group_rows=1) as w:
        for row in pref_rows("a", TAX.paths()[0]):
            w.add(row, "train")
        assert not out.exists()  # mid-write: only a hidden temporary sibling
        hidden = [p for p in tmp_path.iterdir()]
        assert len(hidden) == 1 and hidden[0].name.startswith(".out.tmp-")
        assert any(hidden[0].rglob("*"))  # the rows really went to disk already
    assert out.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_exception_mid_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with DatasetFolderWriter(out, row_group_rows=1, max_shard_bytes=1) as w:
            for i in range(3):
                for row in pref_rows(f"a{i}", TAX.paths()[i]):
                    w.add(row, "train")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_unlabelled_validation_row_rejected(tmp_path):
    with pytest.raises(DataError) as e:
        with DatasetFolderWriter(tmp_path / "out") as w:
            w.add(pref_rows("x", None)[0], "validation")
    assert e.value.field == "class1"
    assert list(tmp_path.iterdir()) == []


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError):
        with DatasetFolderWriter(tmp_path / "out") as w:
            w.add(eval_row("x", TAX.paths()[0]), "dev")
    assert list(tmp_path.iterdir()) == []


# --- unattributed rows ------------------------------------------------------------------------------

def test_unattributed_rows_in_default_only(folder_unattributed, tmp_path):
    root, expected = folder_unattributed
    n_un = expected[("unattributed", "train")]
    assert n_un == 6
    files = [f for f in _rel_files(root) if f.startswith("data/unattributed/")]
    assert files and all(fnmatch.fnmatchcase(f, "data/unattributed/train-*.parquet") for f in files)
    assert sum(_rows(root / f) for f in files) == n_un
    cache = str(tmp_path / "cache")
    default = load_dataset(str(root), cache_dir=cache)
    assert default["train"]["class1"].count(None) == n_un
    assert len(default["train"]) == sum(v for (f, s), v in expected.items() if s == "train")
    for slug in SLUGS[:2]:
        ds = load_dataset(str(root), slug, cache_dir=cache)
        assert None not in ds["train"]["class1"]
        assert len(ds["train"]) == expected[(slug, "train")]
    # the card's default counts include them
    infos = {i["config_name"]: i for i in DatasetCard.load(root / "README.md").data.to_dict()["dataset_info"]}
    got = {s["name"]: s["num_examples"] for s in infos["default"]["splits"]}
    assert got["train"] == len(default["train"])


# --- a domain with no rows in a split -----------------------------------------------------------------

def test_config_with_an_empty_split_loads(tmp_path):
    out = tmp_path / "out"
    with DatasetFolderWriter(out, finish=render_folder_card) as w:
        for d in TAX.domains:
            path = (d.label, *[(c, s.label) for c, s in d.subcategories][0])
            for row in pref_rows(f"{d.slug}-t", path):
                w.add(row, "train")
            if d.slug != "malicious_use":  # malicious_use gets no validation rows
                for row in pref_rows(f"{d.slug}-v", path):
                    w.add(row, "validation")
        w.add(eval_row("h", TAX.paths()[0]), "harm")
        w.add(eval_row("p", TAX.paths()[1]), "help")
    ds = load_dataset(str(out), "malicious_use", cache_dir=str(tmp_path / "cache"))
    assert len(ds["train"]) == 3
    assert len(ds.get("validation", [])) == 0


# --- split_for ---------------------------------------------------------------------------------------

def test_split_for_deterministic_and_fraction():
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20_000)]
    for frac in (0.05, 0.15, 0.5):
        splits = [split_for(h, frac) for h in hashes]
        assert splits == [split_for(h, frac) for h in hashes]
        assert set(splits) <= {"train", "validation"}
        share = splits.count("validation") / len(splits)
        assert abs(share - frac) < 0.015, (frac, share)
    assert {split_for(h, 0.0) for h in hashes[:500]} == {"train"}
    assert {split_for(h, 1.0) for h in hashes[:500]} == {"validation"}



def test_failed_swap_keeps_old_folder(tmp_path, monkeypatch):
    import os

    out = tmp_path / "out"
    build(out)
    before = {f: (out / f).read_bytes() for f in _rel_files(out)}
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst) == out and ".tmp-" in Path(src).name:  # the new folder cannot move in
            raise OSError("simulated rename failure")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(DataError, match="simulated") as e:  # a disk error names the output folder
        build(out, overwrite=True)
    assert e.value.file == str(out)
    monkeypatch.undo()
    assert out.is_dir()
    assert {f: (out / f).read_bytes() for f in _rel_files(out)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_card_counts_question_types(tmp_path):
    from builder.dev.fixture import write_fixture

    root = tmp_path / "qt"
    summary = write_fixture(root, rows_per_domain=6, eval_rows=1, progress=False)
    card = (root / "README.md").read_text()
    train = sum(n for (qt, split), n in summary.question_types.items() if qt == "easy" and split == "train")
    assert train == summary.config_rows["default"]["train"] // 3  # one easy question per image
    assert f"| easy | {train:,} |" in card
