"""spa-vl review on a run directory before `build`: the same pairs, ids and images that `build` writes."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest
from openai_server import OpenAIServer
from pipeline_doubles import pipeline_responder, write_config

from builder.generate import build
from builder.generate.pipeline import generate
from builder.review import make_report, open_review
from builder.review.pairs import RunSource


@pytest.fixture(scope="module")
def run_and_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("review_run")
    with OpenAIServer(pipeline_responder) as server:
        generate(write_config(tmp / "run.yaml", server.url), tmp / "run", limit=8, progress=False)
    build(tmp / "run", tmp / "out", progress=False)
    return tmp / "run", tmp / "out"


def _folder_rows(root):
    rows = {}
    for f in sorted(root.glob("data/*/*.parquet")):
        if f.parent.name != "test":
            rows.update({r["id"]: r for r in pq.read_table(f).to_pylist()})
    return rows


def test_run_pairs_are_the_rows_build_writes(run_and_folder):
    run, out = run_and_folder
    rows = _folder_rows(out)
    source = RunSource(run)
    try:
        labels = {p.id: p for p in source.labels()}
        assert labels and set(labels) == set(rows)  # same selection, same ids
        texts = source.texts(list(labels))
        for pid, row in rows.items():
            assert (texts[pid].question, texts[pid].chosen, texts[pid].rejected) == (row["question"], row["chosen"], row["rejected"])
            assert (labels[pid].class3, labels[pid].question_type, labels[pid].chosen_unsafe) == \
                   (row["class3"], row["question_type"], row["chosen_unsafe"])
            assert source.image(pid) == row["image"]["bytes"]
    finally:
        source.close()


def test_verdicts_given_on_a_run_carry_over_to_its_built_folder(run_and_folder, tmp_path):
    run, out = run_and_folder
    run_copy, folder = tmp_path / "run", tmp_path / "out"
    shutil.copytree(run, run_copy)
    shutil.copytree(out, folder)
    session = open_review(run_copy, n=6, seed=0)
    assert (run_copy / "review" / "sample.json").is_file()
    for p in session.pairs:
        session.give("ann", p.token, "A", False, False, "")
    session.close()
    on_run = make_report(run_copy, resamples=200)
    assert not on_run.card_rendered and on_run.report["verdicts"]["count"] == len(session.pairs)
    shutil.copytree(run_copy / "review", folder / "review")  # what the docs tell a maintainer to do after build
    on_folder = make_report(folder, resamples=200)
    assert on_folder.report["verdicts"]["count"] == len(session.pairs) and on_folder.card_rendered
    assert on_folder.report["judge_vs_people"] == on_run.report["judge_vs_people"]
