"""The dataset card: rendered from the folder, its YAML loads back, plots are PNGs, re-rendering is a no-op."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard
from PIL import Image

from builder.folder import DatasetFolderWriter
from builder.taxonomy import Taxonomy
from dataset_card.card import GATING_PROMPT, render_folder_card
from dataset_card.plots import ROWS_PLOT, UNSAFE_PLOT


@pytest.fixture
def folder(fixture_folder, tmp_path):
    root = tmp_path / "spa_vl"
    shutil.copytree(fixture_folder, root)
    return root


def _rows(root: Path, columns: list[str]) -> list[dict]:
    manifest = json.loads((root / "manifest.json").read_text())
    out = []
    for rel in manifest["files"]:
        split = rel.split("/")[-1].split("-")[0]
        have = [c for c in columns if c in pq.read_schema(root / rel).names]  # eval shards lack the answer columns
        for r in pq.read_table(root / rel, columns=have).to_pylist():
            out.append({**dict.fromkeys(columns), **r, "split": split})
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_card_yaml_loads_back_with_the_metadata_a_hub_card_needs(folder):
    render_folder_card(folder)
    card = DatasetCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "cc-by-4.0"
    assert {"visual-question-answering", "image-text-to-text"} <= set(data["task_categories"])
    assert {"safety", "preference", "synthetic"} <= set(data["tags"])
    assert data["pretty_name"] == "SPA-VL synthetic fixture"
    assert data["extra_gated_prompt"] == GATING_PROMPT and data["extra_gated_fields"]
    taxonomy = Taxonomy.load()
    assert sorted(c["config_name"] for c in data["configs"]) == sorted(["default", *taxonomy.slugs, "test"])

    # dataset_info counts are what the files hold, config by config
    rows = _rows(folder, ["class1"])
    expected = Counter()
    for r in rows:
        if r["split"] in ("harm", "help"):
            expected[("test", r["split"])] += 1
        else:
            expected[(taxonomy.slug_for(r["class1"]), r["split"])] += 1
            expected[("default", r["split"])] += 1
    got = {(i["config_name"], s["name"]): s["num_examples"] for i in data["dataset_info"] for s in i["splits"]}
    assert got == dict(expected)


def test_prose_has_taxonomy_question_types_safety_models_load_dpo_limitations_citation(folder):
    render_folder_card(folder)
    text = (folder / "README.md").read_text()
    for heading in ("## What this is, and why it contains harmful content", "## Taxonomy", "## Question types",
                    "## Safety labels", "## Models", "## Load", "## DPO quick start", "## Limitations",
                    "## Licence and citation"):
        assert heading in text, heading
    assert "@inproceedings" in text and "2406.12030" in text

    rows = _rows(folder, ["class1", "class2", "question_type", "question_unsafe", "chosen_unsafe"])
    # one taxonomy row per category with its counts per split, from the files
    counts = Counter((r["class1"], r["class2"], r["split"]) for r in rows)
    d, c = "Malicious Use", "Fraud or deceptive action"
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {d} | {c} |"))
    cells = [x.strip() for x in line.strip("|").split("|")]
    assert [int(x) for x in cells[3:]] == [counts[(d, c, s)] for s in ("train", "validation", "harm", "help")]
    # question-type mix
    easy_train = sum(1 for r in rows if r["question_type"] == "easy" and r["split"] == "train")
    assert f"| easy | {easy_train:,} |" in text
    # unsafe rates of one category, as a percentage with two decimals
    pref = [r for r in rows if (r["class1"], r["class2"]) == (d, c) and r["split"] in ("train", "validation")]
    q_rate = 100 * sum(r["question_unsafe"] for r in pref) / len(pref)
    ur_line = next(ln for ln in text.splitlines() if ln.startswith(f"| {d} | {c} | {len(pref)} |"))
    assert f"{q_rate:.2f}" in ur_line
    assert "synthetic-model-a" in text  # the answering models, from the rows


def test_plots_are_pngs_and_rerendering_changes_nothing(folder, tmp_path):
    first = render_folder_card(folder)
    assert set(first.files) == {"README.md", ROWS_PLOT, UNSAFE_PLOT}
    for rel in (ROWS_PLOT, UNSAFE_PLOT):
        with Image.open(folder / rel) as im:
            assert im.format == "PNG" and im.width > 300
    before = _files(folder)
    mtimes = {p: (folder / p).stat().st_mtime_ns for p in before}
    again = render_folder_card(folder)
    assert again.changed == []
    assert _files(folder) == before
    assert {p: (folder / p).stat().st_mtime_ns for p in before} == mtimes

    other = tmp_path / "other"
    shutil.copytree(folder, other)
    shutil.rmtree(other / "assets")
    (other / "README.md").unlink()
    render_folder_card(other)
    assert _files(other) == before  # same folder contents, same bytes: the PNGs too


def test_without_safety_labels_the_card_says_so_and_draws_no_unsafe_plot(fixture_folder, tmp_path):
    rows = []
    for rel in json.loads((fixture_folder / "manifest.json").read_text())["files"]:
        split = rel.split("/")[-1].split("-")[0]
        for r in pq.read_table(fixture_folder / rel).to_pylist():
            if split in ("train", "validation"):
                r.update(question_unsafe=None, chosen_unsafe=None, rejected_unsafe=None, chosen_model=None,
                         rejected_model=None)
            rows.append((r, split))
    out = tmp_path / "nolabels"
    with DatasetFolderWriter(out, build_config={"source": "test"}) as w:
        for r, split in rows:
            w.add(r, split)
    text = (out / "README.md").read_text()
    assert "No row of this version carries safety labels" in text
    assert not (out / UNSAFE_PLOT).exists() and (out / ROWS_PLOT).exists()
    assert "do not record which model" in text


def test_repo_id_is_remembered_and_names_the_load_examples(folder):
    render_folder_card(folder, repo_id="org/SPA-VL")
    text = (folder / "README.md").read_text()
    assert 'load_dataset("org/SPA-VL", "malicious_use", revision="v0.1.0")' in text
    assert json.loads((folder / "manifest.json").read_text())["card"]["repo_id"] == "org/SPA-VL"
    assert render_folder_card(folder).changed == []  # remembered: no argument needed the next time
