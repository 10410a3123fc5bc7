"""spa_vl.py: the datasets builder and `spa_vl.load`, on folders the tests write."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from PIL import Image as PILImage

import spa_vl
from builder.dev.fixture import write_fixture
from builder.taxonomy import Taxonomy


def _manifest_rows(root, folder, split):
    files = json.loads((root / "manifest.json").read_text())["files"]
    return sum(f["rows"] for p, f in files.items() if p.startswith(f"data/{folder}/{split}-"))


def test_domains_match_the_taxonomy_file():
    tax = Taxonomy.load()
    assert spa_vl.DOMAINS == {d.slug: d.label for d in tax.domains}


def test_the_layout_copy_is_the_folder_formats():
    """spa_vl.py stands alone, so it keeps a copy of the layout it reads; the owner is builder.format.layout."""
    from builder.format import layout

    assert (spa_vl.PREFERENCE_SPLITS, spa_vl.EVAL_SPLITS) == (layout.PREFERENCE_SPLITS, layout.EVAL_SPLITS)
    assert spa_vl.TAXONOMY_FILE == layout.TAXONOMY_FILE
    slugs = [d.slug for d in Taxonomy.load().domains]
    owner = layout.config_data_files(slugs)
    assert {c: {s: g + ".parquet" for s, g in splits.items()} for c, splits in owner.items()} == \
        {c: spa_vl.config_files(c) for c in owner}


def test_builder_class_reads_one_domain(fixture_folder, tmp_path):
    builder = spa_vl.SpaVL(config_name="malicious_use", source=str(fixture_folder), cache_dir=str(tmp_path))
    builder.download_and_prepare()
    dd = builder.as_dataset()
    assert set(dd) == {"train", "validation"}
    for split in ("train", "validation"):
        assert dd[split].num_rows == _manifest_rows(fixture_folder, "malicious_use", split) > 0
        assert set(dd[split]["class1"]) == {"Malicious Use"}
    assert isinstance(dd["train"][0]["image"], PILImage.Image)


@pytest.mark.parametrize("config", ["default", *spa_vl.DOMAINS, "test"])
def test_load_every_config_matches_the_manifest(fixture_folder, tmp_path, config):
    dd = spa_vl.load(config, source=str(fixture_folder), cache_dir=str(tmp_path))
    if config == "test":
        assert {s: dd[s].num_rows for s in dd} == {s: _manifest_rows(fixture_folder, "test", s) for s in ("harm", "help")}
        assert "chosen" not in dd["harm"].column_names
    elif config == "default":
        for split in ("train", "validation"):
            assert dd[split].num_rows == sum(_manifest_rows(fixture_folder, slug, split) for slug in spa_vl.DOMAINS)
    else:
        for split in ("train", "validation"):
            assert dd[split].num_rows == _manifest_rows(fixture_folder, config, split)
            assert set(dd[split]["class1"]) <= {spa_vl.DOMAINS[config]}


def test_load_matches_plain_load_dataset(fixture_folder, tmp_path):
    """The builder and the no-script path (`load_dataset(folder, name)`) give the same rows."""
    from datasets import load_dataset

    ours = spa_vl.load("misinformation", "train", source=str(fixture_folder), cache_dir=str(tmp_path / "a"))
    plain = load_dataset(str(fixture_folder), "misinformation", split="train", cache_dir=str(tmp_path / "b"))
    assert ours["id"] == plain["id"]
    assert ours.features == plain.features


@pytest.mark.parametrize(
    "filters",
    [
        {"class2": "Security threats"},
        {"class3": ["weapon", "theft", "malware"]},
        [("class2", "==", "Security threats")],
        ds.field("class2") == "Security threats",
    ],
)
def test_filters_are_pushed_into_the_scan(fixture_folder, tmp_path, filters):
    everything = spa_vl.load("malicious_use", "train", source=str(fixture_folder), cache_dir=str(tmp_path / "all"))
    got = spa_vl.load("malicious_use", "train", source=str(fixture_folder), cache_dir=str(tmp_path / "f"), filters=filters)
    if isinstance(filters, dict) and "class3" in filters:
        want = [r for r, c in zip(everything["id"], everything["class3"]) if c in filters["class3"]]
    else:
        want = [r for r, c in zip(everything["id"], everything["class2"]) if c == "Security threats"]
    assert want, "the fixture should hold matching rows"
    assert got["id"] == want
    assert got.num_rows < everything.num_rows


def test_filters_and_columns_must_agree():
    with pytest.raises(ValueError, match="filter columns"):
        spa_vl.SpaVLConfig(name="default", columns=["question"], filters={"class2": "Privacy"})


def test_columns_subset_reads_no_images(fixture_folder, tmp_path):
    d = spa_vl.load("default", "train", source=str(fixture_folder), cache_dir=str(tmp_path), columns=["id", "class1"])
    assert d.column_names == ["id", "class1"]
    assert len(set(d["class1"])) == len(spa_vl.DOMAINS)


def test_streaming_yields_the_same_rows(fixture_folder, tmp_path):
    streamed = spa_vl.load("socioeconomic", "train", source=str(fixture_folder), streaming=True)
    rows = list(streamed)
    prepared = spa_vl.load("socioeconomic", "train", source=str(fixture_folder), cache_dir=str(tmp_path))
    assert [r["id"] for r in rows] == prepared["id"]
    assert isinstance(rows[0]["image"], PILImage.Image)


def test_changed_folder_is_not_served_from_a_stale_cache(tmp_path):
    root = tmp_path / "ds"
    write_fixture(root, rows_per_domain=6, eval_rows=2, seed=1, progress=False)
    first = spa_vl.load("test", "harm", source=str(root), cache_dir=str(tmp_path / "c"))
    write_fixture(root, rows_per_domain=6, eval_rows=3, seed=2, progress=False, overwrite=True)
    second = spa_vl.load("test", "harm", source=str(root), cache_dir=str(tmp_path / "c"))
    assert (first.num_rows, second.num_rows) == (2, 3)
    assert set(first["id"]).isdisjoint(second["id"])


def test_unknown_config_and_missing_source(fixture_folder, tmp_path):
    with pytest.raises(ValueError, match="unknown config"):
        spa_vl.SpaVLConfig(name="Adult Content")  # not even a slug
    with pytest.raises(ValueError, match=r"unknown config 'adult_content': .* has default, .*malicious_use.* and test"):
        spa_vl.load("adult_content", source=str(fixture_folder), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no source"):
        spa_vl.load("default", source=None)


@pytest.mark.parametrize("mode", ["prepared", "keep_in_memory", "streaming"])
def test_a_filter_that_matches_nothing_gives_empty_splits(fixture_folder, tmp_path, mode):
    kwargs = {"keep_in_memory": mode == "keep_in_memory", "streaming": mode == "streaming"}
    everything = spa_vl.load("malicious_use", source=str(fixture_folder), cache_dir=str(tmp_path / "all"))
    none = {"class2": "no such category"}
    dd = spa_vl.load("malicious_use", source=str(fixture_folder), cache_dir=str(tmp_path / "f"), filters=none, **kwargs)
    assert set(dd) == set(everything) == {"train", "validation"}
    for split in dd:
        rows = list(dd[split]) if mode == "streaming" else dd[split]
        assert len(rows) == 0
        if mode != "streaming":
            assert dd[split].features == everything[split].features
    one = spa_vl.load("malicious_use", "train", source=str(fixture_folder), cache_dir=str(tmp_path / "g"), filters=none,
                      **kwargs)
    assert len(list(one)) == 0


@pytest.mark.parametrize("mode", ["prepared", "keep_in_memory", "streaming"])
@pytest.mark.parametrize("filters", [{"klass2": "Privacy"}, [("klass2", "==", "Privacy")]], ids=["dict", "dnf"])
def test_an_unknown_filter_column_is_named(fixture_folder, tmp_path, mode, filters):
    from builder.errors import DataError

    kwargs = {"keep_in_memory": mode == "keep_in_memory", "streaming": mode == "streaming"}
    with pytest.raises(DataError, match="unknown filter column 'klass2'") as e:
        d = spa_vl.load("malicious_use", "train", source=str(fixture_folder), cache_dir=str(tmp_path), filters=filters,
                        **kwargs)
        list(d)  # streaming reads on iteration
    assert e.value.field == "klass2"


def test_a_folder_built_with_its_own_taxonomy_loads_its_own_domains(tmp_path):
    from custom_taxonomy import custom_folder

    root = custom_folder(tmp_path / "custom")
    for mode in ({}, {"keep_in_memory": True}):
        dd = spa_vl.load("heists", source=str(root), cache_dir=str(tmp_path / "c"), **mode)
        assert set(dd["train"]["class1"]) == {"Heist Harms"}
        assert sum(d.num_rows for d in dd.values()) == _manifest_rows(root, "heists", "train") + \
            _manifest_rows(root, "heists", "validation")
    with pytest.raises(ValueError, match="unknown config 'malicious_use'"):
        spa_vl.load("malicious_use", source=str(root), cache_dir=str(tmp_path / "c"))


def test_folder_without_shards_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "data").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no files match"):
        spa_vl.load("malicious_use", source=str(tmp_path / "empty"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="no such dataset folder, and not a Hub repo id"):
        spa_vl.load("malicious_use", source=str(tmp_path / "missing"), cache_dir=str(tmp_path / "c"))


def test_corrupt_shard_names_the_file(fixture_folder, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(fixture_folder, root)
    shard = next((root / "data" / "misinformation").glob("train-*.parquet"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=shard.name):
        spa_vl.load("misinformation", source=str(root), cache_dir=str(tmp_path / "c"))


def test_filter_expression_forms_agree():
    as_dict = spa_vl.filters_to_expression({"class2": "Privacy", "class3": ["a", "b"]})
    as_dnf = spa_vl.filters_to_expression([("class2", "==", "Privacy"), ("class3", "in", ["a", "b"])])
    t = pa.table({"class2": ["Privacy", "Privacy", "Toxic"], "class3": ["a", "c", "a"]})
    assert t.filter(as_dict).to_pylist() == t.filter(as_dnf).to_pylist() == [{"class2": "Privacy", "class3": "a"}]
    with pytest.raises(TypeError):
        spa_vl.filters_to_expression("class2 == Privacy")


def test_keep_in_memory_gives_the_same_rows_without_a_cache(fixture_folder, tmp_path):
    cached = spa_vl.load("information_safety", source=str(fixture_folder), cache_dir=str(tmp_path / "c"))
    memory = spa_vl.load("information_safety", source=str(fixture_folder), cache_dir=str(tmp_path / "m"),
                         keep_in_memory=True)
    assert not list((tmp_path / "m").rglob("*.arrow"))  # no cache written
    for split in cached:
        assert memory[split]["id"] == cached[split]["id"]
        assert memory[split].features == cached[split].features
    filtered = spa_vl.load("information_safety", "train", source=str(fixture_folder), keep_in_memory=True,
                           filters={"class2": "Privacy"}, columns=["id", "class2"])
    assert filtered.column_names == ["id", "class2"]
    assert set(filtered["class2"]) == {"Privacy"}
    with pytest.raises(ValueError, match="unknown split"):
        spa_vl.load("test", "train", source=str(fixture_folder), keep_in_memory=True)


@pytest.fixture
def hub_repo(fixture_folder, tmp_path, monkeypatch):
    """The session fixture folder served as `org/SPA-VL` at tag v0.1.0 by the loopback Hub server."""
    from hub_server import HubServer, hub_env

    with HubServer({"org/SPA-VL": {"main": fixture_folder, "v0.1.0": fixture_folder}}) as server:
        hub_env(monkeypatch, server, tmp_path / "hf_home")
        yield server


@pytest.mark.parametrize("mode", ["prepared", "keep_in_memory", "streaming"])
def test_load_from_a_hub_repo_at_a_pinned_revision(hub_repo, fixture_folder, tmp_path, mode):
    local = spa_vl.load("malicious_use", "train", source=str(fixture_folder), cache_dir=str(tmp_path / "local"))
    kwargs = {"keep_in_memory": mode == "keep_in_memory", "streaming": mode == "streaming"}
    remote = spa_vl.load("malicious_use", "train", source="org/SPA-VL", revision="v0.1.0",
                         cache_dir=str(tmp_path / "hub"), **kwargs)
    ids = [r["id"] for r in remote] if mode == "streaming" else remote["id"]
    assert ids == local["id"]
    commit = hub_repo.commit("org/SPA-VL", "v0.1.0")
    # the revision is pinned to its commit before any file is read, and only this domain's shards are fetched
    shard_reads = [p for m, p in hub_repo.requests if m == "GET" and "/resolve/" in p and p.endswith(".parquet")]
    assert shard_reads and all(f"/resolve/{commit}/data/malicious_use/" in p for p in shard_reads)
