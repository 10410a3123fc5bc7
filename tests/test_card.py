"""The dataset card: rendered from the folder, its YAML loads back, plots are PNGs, re-rendering is a no-op."""

from __future__ import annotations

import io
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard
from PIL import Image

from builder.format.writer import DatasetFolderWriter
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
    for heading in ("## What this is, and why it contains harmful content", "## Fields", "## Taxonomy",
                    "## Question types", "## Safety labels", "## Models", "## Get it and load it", "## DPO quick start",
                    "## Limitations", "## Licence and citation"):
        assert heading in text, heading
    assert "@inproceedings" in text and "2406.12030" in text

    rows = _rows(folder, ["class1", "class2", "question_type", "question_unsafe", "chosen_unsafe"])
    # one taxonomy row per category with its counts per split, from the files, and its distinct images
    counts = Counter((r["class1"], r["class2"], r["split"]) for r in rows)
    d, c = max(((a, b) for a, b, _ in counts if a), key=lambda k: counts[(*k, "train")])
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {d} | {c} |"))
    cells = [x.strip() for x in line.strip("|").split("|")]
    assert [int(x) for x in cells[3:]] == [counts[(d, c, s)] for s in ("train", "validation", "harm", "help")]
    assert int(cells[2]) == (counts[(d, c, "train")] + counts[(d, c, "validation")]) // 3  # 3 questions per image
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

    other = tmp_path / "elsewhere" / folder.name  # the load examples name the folder: keep its name
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
    with DatasetFolderWriter(out, build_config={"source": "test"}, finish=render_folder_card) as w:
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


# --- what a Hub user reads --------------------------------------------------------------------------
def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start: end if end >= 0 else len(text)]


def test_title_is_the_title_once_then_version_and_paper_link(folder):
    render_folder_card(folder)
    body = (folder / "README.md").read_text().split("\n---\n", 1)[1]
    lines = [ln for ln in body.splitlines() if ln.strip()]
    assert lines[0] == "# SPA-VL synthetic fixture"  # no "(version ...)" glued to a title that may end in ")" itself
    assert lines[1].startswith("Version 0.1.0 · ") and "[SPA-VL, arXiv 2406.12030](https://arxiv.org/abs/2406.12030)" in lines[1]
    prose = re.sub(r"```.*?```", "", body, flags=re.S)  # a "# comment" in a code block is no heading
    assert [ln for ln in prose.splitlines() if ln.startswith("# ")] == [lines[0]]


def test_fields_table_has_every_column_its_type_and_the_first_rows_values(folder):
    from builder.format.schema import EVAL_FEATURES, PREFERENCE_FEATURES

    render_folder_card(folder)
    table = _section((folder / "README.md").read_text(), "## Fields")
    lines = [ln for ln in table.splitlines() if ln.startswith("| `")]
    assert [ln.split("|")[1].strip().strip("`") for ln in lines] == list(PREFERENCE_FEATURES)
    manifest = json.loads((folder / "manifest.json").read_text())
    first = next(rel for rel in sorted(manifest["files"]) if "/test/" not in rel)
    row = pq.read_table(folder / first).slice(0, 1).to_pylist()[0]
    cells = {ln.split("|")[1].strip().strip("`"): [c.strip() for c in ln.split("|")[2:5]] for ln in lines}
    assert cells["image"][0] == "Image" and cells["question"][0] == "string" and cells["chosen_unsafe"][0] == "bool"
    assert cells["class1"][1] == f'`"{row["class1"]}"`'
    assert cells["question"][1].startswith("`" + json.dumps(row["question"])[:40])  # quotes and "\n" shown, not lost
    assert cells["chosen_unsafe"][1] == str(row["chosen_unsafe"]).lower()
    with Image.open(io.BytesIO(row["image"]["bytes"])) as im:
        assert cells["image"][1] == f"`JPEG, {im.width}×{im.height} px, {len(row['image']['bytes']):,} bytes`"
    assert all(f"`{name}`" in table for name in EVAL_FEATURES)


def test_an_imported_folder_names_its_source_dataset(tmp_path, folder):
    from builder.dev.fixture import write_fixture
    from builder.upstream.importer import import_upstream

    write_fixture(tmp_path / "up", rows_per_domain=6, eval_rows=1, layout="upstream", progress=False)
    import_upstream(tmp_path / "up", tmp_path / "imported", progress=False)
    assert DatasetCard.load(tmp_path / "imported" / "README.md").data.to_dict()["source_datasets"] == ["sqrti/SPA-VL"]
    render_folder_card(folder)
    assert "source_datasets" not in DatasetCard.load(folder / "README.md").data.to_dict()  # synthetic: no source


def test_install_and_login_are_explained(folder):
    render_folder_card(folder)
    local = _section((folder / "README.md").read_text(), "## Get it and load it")
    assert "pip install datasets" in local and "pip install -e ." in local
    assert "hf auth login" in local and "gated" in local
    render_folder_card(folder, repo_id="org/SPA-VL")
    hub = _section((folder / "README.md").read_text(), "## Get it and load it")
    assert "hf auth login" in hub.split("```python")[0]  # in the commands to run, before loading


def test_no_sentence_about_unsafe_rates_when_the_card_shows_none(fixture_folder, tmp_path):
    out = tmp_path / "nolabels"
    with DatasetFolderWriter(out, build_config={"source": "test"}, finish=render_folder_card) as w:
        for rel in json.loads((fixture_folder / "manifest.json").read_text())["files"]:
            split = rel.split("/")[-1].split("-")[0]
            for r in pq.read_table(fixture_folder / rel).to_pylist():
                if split in ("train", "validation"):
                    r.update(question_unsafe=None, chosen_unsafe=None, rejected_unsafe=None)
                w.add(r, split)
    text = (out / "README.md").read_text()
    assert "unsafe rate" not in text.replace("no unsafe-rate statistics are given", "")
    assert "UR %" not in text


def test_plots_group_categories_under_their_domain():
    from dataset_card.plots import _grouped

    taxonomy = Taxonomy.load()
    keys = [(d.label, c.label) for d in taxonomy.domains for c in d.categories]
    bars, ticks, labels, header = _grouped(keys)
    assert [lab for lab, h in zip(labels, header) if h] == [d.label for d in taxonomy.domains]
    assert len(bars) == len(keys) and len(ticks) == len(keys) + len(taxonomy.domains)
    domain = None
    for lab, h in zip(labels, header):
        if h:
            domain = lab
        else:
            assert taxonomy.contains(domain, lab.strip())  # every category sits under its own domain
    assert bars == sorted(bars)


def _python_blocks(text: str) -> list[str]:
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


def test_the_cards_load_examples_run_on_that_very_folder(tmp_path):
    """The card's code, run as written from the folder above the dataset folder, in a fresh interpreter;
    the example domain has no train split here, so the examples must not ask for one."""
    import os
    import subprocess
    import sys

    from builder.dev.fixture import eval_row, preference_rows, _images, _eval_images

    taxonomy = Taxonomy.load()
    out = tmp_path / "spa_vl"
    args = dict(seed=0, size=32, texture=False)
    with DatasetFolderWriter(out, build_config={"source": "test"}, finish=render_folder_card) as w:
        for slug in ("malicious_use", "socioeconomic"):
            for img in _images(taxonomy, slug, 2, **args):
                for row in preference_rows(img, f"{slug}_{img.n}.jpg"):
                    w.add(row, "validation" if slug == "malicious_use" else "train")
        for img in _eval_images(taxonomy, "harm", 2, **args):
            w.add(eval_row(img, "harm"), "harm")
    text = (out / "README.md").read_text()
    load_section = _section(text, "## Get it and load it")
    assert 'load_dataset("spa_vl", "malicious_use")' in load_section and 'split="train"' not in text
    code = "\n".join(_python_blocks(load_section) + _python_blocks(_section(text, "## DPO quick start")))
    code += "\nprint('ran', sorted(ds.column_names), ds.num_rows, sorted(test))\n"
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "ran ['chosen', 'images', 'prompt', 'rejected'] 6 ['harm']"
