"""The verdicts travel with the folder: published in the version's commit, pulled back, never loaded as data."""

from __future__ import annotations

import shutil

from hub_server import HubServer, hub_env

from builder.hub import publish, pull
from builder.review import make_report, open_review
from builder.taxonomy import Taxonomy

REPO = "org/SPA-VL"
TOKEN = "hf_loopbackTEST0123456789review"


def test_review_is_published_pulled_and_not_loaded_as_data(fixture_folder, tmp_path, monkeypatch):
    from datasets import load_dataset

    folder = tmp_path / "spa_vl"
    shutil.copytree(fixture_folder, folder)
    session = open_review(folder, n=5, seed=0)
    for p in session.pairs:
        session.give("ann", p.token, "B", True, False, "")
    session.close()
    make_report(folder, resamples=200)
    review = {p.name: p.read_bytes() for p in (folder / "review").iterdir()}
    with HubServer({}, token=TOKEN) as server:
        hub_env(monkeypatch, server, tmp_path / "hf_home")
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        result = publish(folder, REPO, backoff=0)
        assert result.files == len(list(p for p in folder.rglob("*") if p.is_file() and ".spa_vl" not in p.parts))
        out = tmp_path / "pulled"
        pull(REPO, out, revision=result.tag)
        assert {p.name: p.read_bytes() for p in (out / "review").iterdir()} == review
        slug = Taxonomy.load().slugs[0]
        ds = load_dataset(REPO, slug, revision=result.tag, cache_dir=str(tmp_path / "ds"))
        assert set(ds) <= {"train", "validation"} and "reviewer" not in ds["train"].column_names
    assert "## Human validation" in (out / "README.md").read_text()
