"""`generate` and `build` say why: the server's reason for a failure, echoes counted unparseable, nothing to
build explained, and the local-server recipe for SPA_VL_MODEL users. All over real loopback HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from openai_server import OpenAIServer, echo_responder, masked_key
from pipeline_doubles import pipeline_responder, run_cli, write_config

from builder.generate import NothingToBuild, build
from builder.generate.pipeline import generate
from builder.generate.summary import summary_line
from builder.generate.run_store import RunStore
from builder.taxonomy import Taxonomy

KEY = "sk-proj-wrongKeyThatMustNeverBeShown0000"


def _echoing(*prompts: str):
    """pipeline_responder, except that prompts holding one of ``prompts`` are echoed back as they came."""

    def respond(body: dict) -> str:
        text = echo_responder(body)
        return text if any(p in text for p in prompts) else pipeline_responder(body)

    return respond


def _no_secret_anywhere(run: Path, *texts: str) -> None:
    for secret in (KEY, masked_key(KEY), KEY[-16:]):
        assert all(secret not in t for t in texts)
        for path in run.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


def test_a_wrong_key_is_the_reason_given_and_never_shown(tmp_path, capsys, monkeypatch):
    """Keyword expansion fails with 401 everywhere: before, `0 units (0 done, 0 failed)` and no reason."""
    monkeypatch.setenv("LOOPBACK_KEY", KEY)
    with OpenAIServer(pipeline_responder, api_keys={"sk-right"}) as srv:
        cfg = write_config(tmp_path / "run.yaml", srv.url, limit_keys={"api_key_env": "LOOPBACK_KEY"})
        code, out, err = run_cli(["generate", str(cfg), "--run_dir", str(tmp_path / "run"), "--limit", "6",
                               "--progress", "False"], capsys)
        assert srv.stats()["unauthorized"] == 6 and srv.stats()["ok"] == 0  # one per subcategory, not retried
    assert code == 1
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    why = summary["why"][0]
    assert (why["count"], why["what"], why["stage"], why["model"], why["kind"]) == (6, "subcategories", "keywords", "m0", "http_401")
    assert why["detail"].startswith("Incorrect API key provided")
    assert "6 subcategories failed at keywords (m0): http_401: Incorrect API key provided" in out
    assert all(f["detail"].startswith("Incorrect API key") for f in summary["images"]["failures"])
    _no_secret_anywhere(tmp_path / "run", out, err)


def test_an_image_source_that_is_down_is_the_reason_given(tmp_path):
    with OpenAIServer(pipeline_responder) as srv:
        cfg = write_config(tmp_path / "run.yaml", srv.url, images={
            "per_subcategory": 1, "filters": {"min_side": 64},
            "sources": [{"type": "clip_retrieval", "url": "http://127.0.0.1:9/knn-service", "timeout": 2}]})
        summary = generate(cfg, tmp_path / "run", limit=2, progress=False)
    assert summary["units"]["total"] == 0 and summary["images"]["failures"]
    why = summary["why"][0]
    assert why["stage"] == "images" and why["kind"] == "ConnectionError" and "127.0.0.1:9/knn-service" in why["detail"]
    assert f"{why['count']} subcategories failed at images: ConnectionError: clip-retrieval http://127.0.0.1:9" in summary_line(summary)


def test_units_that_fail_say_why_in_the_line(tmp_path):
    with OpenAIServer(pipeline_responder, fault_rate=1.0, faults=("500",)) as srv:
        cfg = write_config(tmp_path / "run.yaml", srv.url, limit_keys={"max_retries": 0}, keywords={"model": None})
        summary = generate(cfg, tmp_path / "run", limit=2, progress=False)
    assert summary["units"]["failed"] == 2
    assert "failed at questions (m0): http_50" in summary_line(summary) and "The server had an error" in summary_line(summary)


def test_an_echoing_judge_is_unparseable_not_a_verdict(tmp_path, capsys):
    """A server that echoes the judge prompt: before, its example `{"better": "A" or "B"}` read as verdict A in
    both orders (position disagreement); now every such pair is counted judge_unparseable."""
    with OpenAIServer(_echoing("[Answer A]")) as srv:
        cfg = write_config(tmp_path / "run.yaml", srv.url, build={"test_fraction": 0.0})
        summary = generate(cfg, tmp_path / "run", limit=4, progress=False)
    assert summary["units"]["done"] == 4
    assert summary["pairs"].get("judge_unparseable") == 12 and summary["pairs"]["kept"] == 0
    assert "position_disagreement" not in summary["pairs"]
    assert "12 with an unparseable verdict" in summary_line(summary)
    code, _, err = run_cli(["build", str(tmp_path / "run"), str(tmp_path / "out"), "--progress", "False"], capsys)
    assert code == 1 and "12 judge_unparseable (no verdict could be read from the judge's reply)" in err
    assert not (tmp_path / "out").exists()


def test_an_echoed_keyword_prompt_gives_no_keywords(tmp_path):
    """Before, the prompt's own example became the search keywords; now the reply counts as unparseable and
    the subcategory is searched by its name."""
    with OpenAIServer(_echoing("image-search keywords")) as srv:
        cfg = write_config(tmp_path / "run.yaml", srv.url)
        summary = generate(cfg, tmp_path / "run", limit=3, progress=False)
    assert len(summary["images"]["keywords_unparseable"]) == 3 == summary["units"]["done"]
    assert "3 keyword replies unparseable" in summary_line(summary)
    store = RunStore(tmp_path / "run")
    keywords = {m["keyword"] for m in store.images()}
    store.close()
    names = {p[2] for p in Taxonomy.load().paths()}
    assert keywords <= names  # the subcategory names, not "gender bias" or "..."


def test_echoed_questions_fail_their_unit_as_empty(tmp_path):
    with OpenAIServer(_echoing("Write a harder")) as srv:
        cfg = write_config(tmp_path / "run.yaml", srv.url, keywords={"model": None})
        summary = generate(cfg, tmp_path / "run", limit=2, progress=False)
    assert summary["units"]["failed"] == 2 and summary["why"][0]["kind"] == "empty_question"


def test_build_says_every_pair_was_left_out_for_position_disagreement(tmp_path, capsys):
    def biased(body: dict) -> str:  # a judge with total position bias: always the first answer
        reply = pipeline_responder(body)
        return json.dumps({"better": "A", "reason": "first"}) if '"better"' in reply else reply

    with OpenAIServer(biased) as srv:
        cfg = write_config(tmp_path / "run.yaml", srv.url, build={"test_fraction": 0.0})
        summary = generate(cfg, tmp_path / "run", limit=3, progress=False)
    assert summary["pairs"]["position_disagreement"] == 9
    code, out, err = run_cli(["build", str(tmp_path / "run"), str(tmp_path / "out"), "--progress", "False"], capsys)
    assert code == 1 and out == ""
    assert ("nothing to write" in err and "every preference pair of the 3 finished units was left out: "
            "9 position_disagreement (the judge's verdicts in the two orders disagreed)") in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(NothingToBuild, match="stopped before the preferences stage"):
        with OpenAIServer(pipeline_responder) as srv:
            cfg = write_config(tmp_path / "q.yaml", srv.url)
            generate(cfg, tmp_path / "q", limit=1, until="questions", progress=False)
            build(tmp_path / "q", tmp_path / "out", progress=False)


def test_a_server_without_json_schema_rejects_one_request_per_endpoint(tmp_path):
    """Keywords (m0) and the judge ask for JSON; the server refuses response_format: before, every call queued
    behind the first was rejected once too; now one request per endpoint is, and the rest go as free text."""
    with OpenAIServer(pipeline_responder, json_schema=False) as srv:
        cfg = write_config(tmp_path / "run.yaml", srv.url)
        summary = generate(cfg, tmp_path / "run", limit=6, progress=False)
        stats = srv.stats()
    assert summary["units"]["done"] == 6 and summary["pairs"]["kept"] > 0
    assert stats["errors"] == 2  # loopback-0 (keywords) and loopback-judge
    assert summary["requests"]["sent"] == stats["ok"] and summary["requests"]["retried"] == 2


# --- the local-server recipe -----------------------------------------------------------------------------------
def test_spa_vl_model_users_land_on_the_local_server_recipe(tmp_path, capsys, monkeypatch):
    rec = []

    def served_model(body: dict) -> str:
        rec.append(body["model"])
        return pipeline_responder(body)

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a local server needs no key
    monkeypatch.setenv("SPA_VL_MODEL", "Qwen/Qwen2.5-VL-7B-Instruct")
    with OpenAIServer(served_model) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.url)
        code, _, err = run_cli(["generate", "pipeline", "--run_dir", str(tmp_path / "r0"), "--progress", "False"], capsys)
        assert code == 2 and "spa-vl generate local-server" in err and "SPA_VL_MODEL is set" in err
        assert not (tmp_path / "r0").exists() and srv.stats()["requests"] == 0
        code, out, err = run_cli(["generate", "local-server", "--run_dir", str(tmp_path / "run"), "--limit", "2",
                               "--progress", "False"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["units"]["done"] == 2 and summary["requests"]["sent"] > 0
    assert summary["cost_usd"] == 0 and "$0.0000" in out  # a free server costs nothing
    assert set(rec) == {"Qwen/Qwen2.5-VL-7B-Instruct"}
    snapshot = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert all(m.get("rpm") is None and m.get("tpm") is None for m in snapshot["models"].values())
    monkeypatch.delenv("SPA_VL_MODEL")
    code, _, err = run_cli(["generate", "local-server", "--run_dir", str(tmp_path / "r2"), "--progress", "False"], capsys)
    assert code == 2 and "field models.local.model: set the environment variable SPA_VL_MODEL" in err
