"""Module fixtures of the evaluation tests (a pytest plugin: `pytest_plugins = ["eval_fixtures"]`): a
small dataset, a tiny LLaVA, the test rows as the dataset holds them, a reference file and the tiny
model's answers, each made once per test module."""

from __future__ import annotations

import json

import pytest

import spa_vl
from builder.dev.fixture import write_fixture
from builder.dev.tiny_vlm import build_tiny_llava
from training import evaluate as ev


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def ds(work):
    root = work / "ds"
    write_fixture(root, rows_per_domain=6, eval_rows=6, progress=False)
    return root


@pytest.fixture(scope="module")
def tiny(work):
    return build_tiny_llava(work / "tiny", seed=0)


@pytest.fixture(scope="module")
def rows(ds):
    """The test rows as the dataset itself holds them (read with spa_vl.load, not the code under test)."""
    dd = spa_vl.load("test", source=str(ds), keep_in_memory=True)
    out = {s: [{k: r[k] for k in ("id", "question", "class1", "class2")} for r in dd[s]] for s in ("harm", "help")}
    assert len(out["harm"]) == 6 and len(out["help"]) == 6
    assert len({r["question"] for r in out["harm"]}) == 6 and len({r["question"] for r in out["help"]}) == 6
    return out


@pytest.fixture(scope="module")
def ref_file(work, rows):
    path = work / "reference.jsonl"
    path.write_text("".join(json.dumps({"id": r["id"], "answer": f"REFERENCE ANSWER {i}"}) + "\n"
                            for i, r in enumerate(rows["help"])))
    return path


@pytest.fixture(scope="module")
def answers_file(work, ds, tiny):
    """The tiny model's answers, generated once; tests that are not about generation start from a copy."""
    rows = ev.load_test_rows(str(ds))
    path = work / "answers.jsonl"
    ev.generate_answers(str(tiny), rows, path, batch_size=4, max_new_tokens=6, progress=False)
    return path
