"""spa-vl review without a browser: the sample, the verdict store, the folder, the server's API over
real loopback HTTP, and the command line."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from builder.errors import DataError
from builder.review import ReviewServer, make_report, open_review
from builder.review.pairs import PairLabels
from builder.review.sample import allocate, draw_sample
from builder.review.store import Verdict, VerdictStore, check_reviewer
from builder.taxonomy import Taxonomy


@pytest.fixture
def folder(fixture_folder, tmp_path):
    """A private copy of the session's fixture folder (30 rows per domain, model names and safety labels)."""
    root = tmp_path / "spa_vl"
    shutil.copytree(fixture_folder, root)
    return root


def _rows(root: Path) -> dict[str, dict]:
    """id -> preference row (no image) of a folder's train and validation shards."""
    out = {}
    for f in sorted(root.glob("data/*/*.parquet")):
        if f.parent.name != "test":
            cols = [c for c in pq.read_schema(f).names if c != "image"]
            out.update({r["id"]: r for r in pq.read_table(f, columns=cols).to_pylist()})
    return out


# --- the sample ------------------------------------------------------------------------------------
def test_allocate_fills_strata_evenly_and_shares_what_small_ones_cannot_take():
    rng = random.Random(0)
    assert allocate({"a": 1, "b": 10, "c": 10}, 9, rng) == {"a": 1, "b": 4, "c": 4}
    quota = allocate({"a": 5, "b": 5, "c": 5}, 7, random.Random(0))
    assert sorted(quota.values()) == [2, 2, 3] and sum(quota.values()) == 7
    assert allocate({"a": 2, "b": 3}, 50, random.Random(0)) == {"a": 2, "b": 3}  # fewer pairs than asked: all


def _labels(per_path: dict[tuple, int]) -> list[PairLabels]:
    return [PairLabels(f"{i:04d}{j}", *path, "easy", f"q{i}{j}")
            for i, (path, count) in enumerate(per_path.items()) for j in range(count)]


def test_sample_is_even_over_class3_seeded_and_blind_sides_are_random():
    paths = Taxonomy.load().paths()
    labels = _labels({p: 3 + (i % 4) * 5 for i, p in enumerate(paths)})  # 3 to 18 pairs per subcategory
    sample = draw_sample(labels, n=2 * len(paths), seed=5, config=None, source={})
    per_class3 = Counter(p.class3 for p in sample.pairs)
    assert len(sample.pairs) == 2 * len(paths) and set(per_class3.values()) == {2}  # even over class3
    again = draw_sample(labels, n=2 * len(paths), seed=5, config=None, source={})
    assert [(p.id, p.a_is) for p in again.pairs] == [(p.id, p.a_is) for p in sample.pairs]  # seeded
    assert {p.token for p in again.pairs}.isdisjoint(p.token for p in sample.pairs)  # tokens: random, opaque
    other = draw_sample(labels, n=2 * len(paths), seed=6, config=None, source={})
    assert [p.id for p in other.pairs] != [p.id for p in sample.pairs]
    sides = Counter(p.a_is for p in sample.pairs)
    assert sides["chosen"] > 0.3 * len(sample.pairs) and sides["rejected"] > 0.3 * len(sample.pairs)
    # the order is shuffled, not grouped by subcategory: the first pairs already span several domains
    assert len({p.class1 for p in sample.pairs[:12]}) >= 3


def test_sample_of_a_folder_draws_once_and_holds_to_its_seed(folder):
    session = open_review(folder, n=12, seed=1)
    assert session.new_sample and len(session.pairs) == 12
    rows = _rows(folder)
    for p in session.pairs:
        row, text = rows[p.id], session.texts[p.id]
        assert (text.chosen, text.rejected, p.class3) == (row["chosen"], row["rejected"], row["class3"])
        assert p.chosen_unsafe == row["chosen_unsafe"]
    session.close()
    again = open_review(folder)  # no n or seed: the sample drawn already
    assert not again.new_sample and [p.token for p in again.pairs] == [p.token for p in session.pairs]
    again.close()
    with pytest.raises(DataError, match="seed=1, not 2") as e:
        open_review(folder, seed=2)
    assert e.value.field == "seed"


def test_sample_of_one_config(folder):
    tax = Taxonomy.load()
    slug = tax.slugs[1]
    session = open_review(folder, n=8, seed=0, config=slug)
    assert {p.class1 for p in session.pairs} == {tax.domain(slug).label}
    session.close()
    with pytest.raises(DataError, match="unknown config") as e:
        open_review(folder, config="nope")
    assert e.value.field == "config"


# --- the verdict store -----------------------------------------------------------------------------
def test_store_appends_and_the_last_verdict_of_a_reviewer_wins(tmp_path):
    store = VerdictStore(tmp_path / "review")
    store.add(Verdict("ann", "p1", "A", "chosen"))
    store.add(Verdict("bob", "p1", "tie", "chosen", note="both fine"))
    store.add(Verdict("ann", "p1", "B", "chosen", unsafe_b=True))
    latest = store.latest()
    assert latest[("ann", "p1")].pick == "B" and latest[("ann", "p1")].people == "rejected"
    assert latest[("bob", "p1")].people == "tie" and len(store.read()) == 3
    lines = store.path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["unsafe_b"] is True


def test_store_skips_and_then_cuts_a_line_a_crash_left_unfinished(tmp_path):
    store = VerdictStore(tmp_path / "review")
    store.add(Verdict("ann", "p1", "A", "chosen"))
    with open(store.path, "ab") as f:
        f.write(b'{"reviewer": "ann", "id": "p2", "pi')  # a write cut off mid-way: never acknowledged
    assert [v.id for v in store.read()] == ["p1"]
    store.add(Verdict("ann", "p3", "B", "rejected"))
    assert [v.id for v in store.read()] == ["p1", "p3"]
    assert b'"p2"' not in store.path.read_bytes()


def test_store_names_the_line_of_a_bad_verdict(tmp_path):
    store = VerdictStore(tmp_path / "review")
    store.add(Verdict("ann", "p1", "A", "chosen"))
    with open(store.path, "a") as f:
        f.write(json.dumps({"reviewer": "ann", "id": "p2", "pick": "C", "a_is": "chosen"}) + "\n")
    with pytest.raises(DataError) as e:
        store.read()
    assert e.value.row == 1 and e.value.field == "pick" and e.value.file == str(store.path)


@pytest.mark.parametrize("name", ["", " ", "a" * 65, "../x", "ann\nbob", None, 3])
def test_reviewer_names_are_checked(name):
    with pytest.raises(DataError):
        check_reviewer(name)


# --- the folder: verdicts travel with it, stay out of the data ----------------------------------------
def test_review_files_stay_out_of_every_config_and_validate_passes(folder, tmp_path):
    from datasets import load_dataset

    from builder.validate import validate

    session = open_review(folder, n=6, seed=0)
    for p in session.pairs:
        session.give("ann", p.token, "A", False, True, "a note")
    session.close()
    make_report(folder, resamples=200)
    names = {p.name for p in (folder / "review").iterdir()}
    assert {"sample.json", "verdicts.jsonl", "report.json", "human_validation.md", "disagreements.md"} <= names
    rows = _rows(folder)
    slug = Taxonomy.load().slugs[0]
    for config in ("default", slug):
        dd = load_dataset(str(folder), config, cache_dir=str(tmp_path / "cache"))
        assert set(dd) <= {"train", "validation"} and "reviewer" not in next(iter(dd.values())).column_names
        assert all(set(ds["id"]) <= set(rows) for ds in dd.values())
    assert sum(ds.num_rows for ds in load_dataset(str(folder), "default", cache_dir=str(tmp_path / "cache")).values()) == len(rows)
    report = validate(folder, load_configs=False, progress=False)
    assert report.ok, report.format_table()


def test_review_files_are_published_and_kept_on_rebuild(folder):
    from builder.dev.fixture import write_fixture
    from builder.hub import publishable_files

    session = open_review(folder, n=4, seed=0)
    session.give("ann", session.pairs[0].token, "A", False, False, "")
    session.close()
    make_report(folder, resamples=200)
    published = {f.path for f in publishable_files(folder)}
    assert {"review/sample.json", "review/verdicts.jsonl", "review/report.json", "review/agreement.png"} <= published
    before = (folder / "review" / "verdicts.jsonl").read_bytes()
    write_fixture(folder, rows_per_domain=30, eval_rows=10, seed=0, progress=False, overwrite=True)
    assert (folder / "review" / "verdicts.jsonl").read_bytes() == before  # a rebuild keeps the verdicts
    assert "## Human validation" in (folder / "README.md").read_text()


def test_report_writes_the_card_section_and_a_second_run_changes_nothing(folder):
    session = open_review(folder, n=6, seed=2)
    judge_sides = [p.judge_side for p in session.pairs]
    for p in session.pairs:
        session.give("ann", p.token, "A", False, False, "")
    session.close()
    result = make_report(folder, resamples=200)
    assert "README.md" in result.changed and result.card_rendered
    card = (folder / "README.md").read_text()
    hand = sum(s == "A" for s in judge_sides) / len(judge_sides)  # ann always picked A
    assert result.report["judge_vs_people"]["without_ties"]["agreement"]["value"] == pytest.approx(hand, abs=1e-4)
    section = card.split("## Human validation", 1)[1].split("\n## ", 1)[0]
    assert f"{100 * hand:.1f}%" in section and "review/agreement.png" in section
    assert card.index("## Human validation") < card.index("## Limitations")
    assert make_report(folder, resamples=200).changed == []  # deterministic: nothing rewritten


# --- the server's API over real loopback HTTP ----------------------------------------------------------
def _request(url: str, data: dict | None = None, headers: dict | None = None, method: str | None = None):
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})},
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_api_serves_pairs_blind_and_saves_verdicts(folder):
    session = open_review(folder, n=5, seed=0)
    rows = _rows(folder)
    secrets = {w for p in session.pairs for w in (p.id, rows[p.id]["chosen_model"], rows[p.id]["rejected_model"],
                                                  rows[p.id]["judge_rationale"], rows[p.id]["image_name"])}
    seen = []
    with ReviewServer(port=0).running(session) as server:
        base = server.url.rstrip("/")
        status, _, body = _request(f"{base}/api/session?reviewer=ann")
        tokens = json.loads(body)["tokens"]
        assert status == 200 and tokens == [p.token for p in session.pairs]
        for i, token in enumerate(tokens):
            _, _, body = _request(f"{base}/api/pair/{token}?reviewer=ann")
            view = json.loads(body)
            pair, text = session.pairs[i], session.texts[session.pairs[i].id]
            shown_a = text.chosen if pair.a_is == "chosen" else text.rejected
            assert view["answers"][0] == shown_a and set(view["answers"]) == {text.chosen, text.rejected}
            assert set(view) == {"token", "position", "total", "question", "answers", "labels", "image", "verdict"}
            seen.append(body)
            status, headers, image = _request(f"{base}{view['image']}")
            assert status == 200 and headers["content-type"] == "image/jpeg" and image[:2] == b"\xff\xd8"
            seen += [str(headers).encode(), _request(f"{base}/api/verdict", {"reviewer": "ann", "token": token,
                                                                             "pick": "B", "unsafe": [True, False], "note": ""})[2]]
        _, _, body = _request(f"{base}/api/session?reviewer=ann")
        assert json.loads(body)["done"] == [True] * 5
        _, _, body = _request(f"{base}/api/pair/{tokens[0]}?reviewer=ann")
        assert json.loads(body)["verdict"] == {"pick": "B", "unsafe": [True, False], "note": ""}
        seen += [body, _request(f"{base}/")[2], _request(f"{base}/static/review.js")[2]]
    traffic = b"\n".join(seen).decode("utf-8", "replace")
    assert not [s for s in secrets if s and s in traffic]
    assert not re.search(r"chosen|rejected|judge", traffic, re.I)
    latest = session.store.latest()
    assert {v.people for v in latest.values()} <= {"chosen", "rejected"} and len(latest) == 5
    assert all(latest[("ann", p.id)].people == ("chosen" if p.judge_side == "B" else "rejected") for p in session.pairs)


def test_api_refuses_bad_requests(folder):
    session = open_review(folder, n=3, seed=0)
    token = session.pairs[0].token
    with ReviewServer(port=0).running(session) as server:
        base = server.url.rstrip("/")
        assert _request(f"{base}/api/session")[0] == 400  # no reviewer
        assert _request(f"{base}/api/pair/nope?reviewer=ann")[0] == 404
        assert _request(f"{base}/image/nope")[0] == 404
        bad = {"reviewer": "ann", "token": token, "pick": "C"}
        status, _, body = _request(f"{base}/api/verdict", bad)
        assert status == 400 and "pick" in json.loads(body)["error"]
        form = _request(f"{base}/api/verdict", {**bad, "pick": "A"}, headers={"Content-Type": "text/plain"})
        assert form[0] == 415  # what a cross-site form could send
        assert _request(f"{base}/", headers={"Host": "attacker.example"}, method="GET")[0] == 400  # DNS rebinding
        assert _request(f"{base}/review/sample.json")[0] == 404  # the secret is never served
    assert session.store.read() == []


# --- the command line ------------------------------------------------------------------------------------
def test_cli_checks_the_command_line_before_acting(folder, capsys):
    from builder.cli import main

    for argv, word in ((["review", str(folder), "--report"], "no review here yet"),
                       (["review", str(folder), "--report", "--n", "5"], "leave out --n"),
                       (["review", str(folder), "--port", "70000"], "port"),
                       (["review", str(folder / "missing")], "no such folder"),
                       (["review", str(folder), "--config", "nope", "--port", "0"], "unknown config")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and word in capsys.readouterr().err
    assert not (folder / "review").exists()  # nothing was drawn or written


def test_cli_serves_until_ctrl_c_and_reports(folder):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "builder.cli", "review", str(folder), "--n", "4", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline()
        url = re.search(r"(http://127\.0\.0\.1:\d+/)", first).group(1)
        tokens = json.loads(_request(f"{url}api/session?reviewer=cy")[2])["tokens"]
        assert len(tokens) == 4
        assert _request(f"{url}api/verdict", {"reviewer": "cy", "token": tokens[0], "pick": "tie"})[0] == 200
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert re.search(r"review: 1 verdicts saved .* 1 in all by 1 reviewer", out)
    done = subprocess.run([sys.executable, "-m", "builder.cli", "review", str(folder), "--report", "--resamples", "200"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "1 verdicts by 1 reviewer(s) on 1 pairs; 1 did not side with the judge" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("review report:")


def test_cli_says_when_the_port_is_busy(folder, capsys):
    from builder.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        with pytest.raises(SystemExit) as e:
            main(["review", str(folder), "--port", str(busy.getsockname()[1])])
    assert e.value.code == 2 and "cannot listen" in capsys.readouterr().err
    assert not (folder / "review").exists()
