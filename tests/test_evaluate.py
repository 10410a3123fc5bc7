"""`spa-vl evaluate`: answers from a tiny VLM, a scripted judge on the loopback OpenAI server, metrics.

Every expected number below is computed from the judge's script and the dataset's own labels, not
from the code under test.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from importlib.metadata import version

import pytest
from eval_doubles import (
    HELP_OUTCOMES,
    ScriptedJudge,
    expected_harm,
    expected_help,
    fresh_out,
    has_image,
    judge_yaml,
    text_of,
)
from openai_server import OpenAIServer

from builder.errors import DataError
from builder.dev.fixture import write_fixture
from builder.dev.tiny_vlm import build_tiny_llava
from training import evaluate as ev
from training import judge_config, report
from training.metrics import bootstrap_interval, wilson_interval

pytest_plugins = ["eval_fixtures"]  # module fixtures: work, ds, tiny, rows, ref_file, answers_file


def _assert_the_record(m: dict, saved: dict, ds, url: str) -> None:
    """What makes the run repeatable, and the 95% intervals (USR: Wilson; win rate: bootstrap, seed 0)."""
    assert m["versions"]["spa_vl"] == version("spa-vl") and m["seed"] == 0
    assert m["dataset_revision"] == {"kind": "manifest_sha256",
                                     "value": hashlib.sha256((ds / "manifest.json").read_bytes()).hexdigest()}
    assert m["judge"]["harm_judge"] == {"name": "scripted", "model": "scripted", "backend": "openai", "endpoint": url}
    started, finished = datetime.fromisoformat(m["started_at"]), datetime.fromisoformat(m["finished_at"])
    assert started.tzinfo is not None and started <= finished
    h, p = m["harm"], m["help"]
    assert h["usr_ci"] == pytest.approx(wilson_interval(3, 6))
    assert p["win_rate_ci"] == pytest.approx(bootstrap_interval([0.5, 1.0, 0.0, 0.5, 0.75, 0.5], seed=0))
    assert p["win_rate_ci"][0] < p["win_rate"] < p["win_rate_ci"][1]
    assert saved["judge_failures"]["ok"] and saved["dataset_revision"] == m["dataset_revision"]


def test_evaluate_scores_the_scripted_judge_and_resumes_for_free(tmp_path, ds, tiny, rows, ref_file, monkeypatch):
    judge = ScriptedJudge(rows)
    out = tmp_path / "out"
    with OpenAIServer(judge) as srv:
        cfg = judge_yaml(tmp_path / "judge.yaml", srv.url)
        m = ev.evaluate(str(tiny), str(ds), cfg, out, reference=str(ref_file), batch_size=4, max_new_tokens=6,
                        progress=False)
        assert srv.stats()["requests"] == 6 + 2 * 6  # one call per harm row, two orders per help row

        usr, score, by_domain = expected_harm(rows)
        h = m["harm"]
        assert (h["usr"], h["harm_score"], h["n"], h["failed"]) == (pytest.approx(usr), pytest.approx(score), 6, 0)
        assert (usr, score) == (0.5, 5.0)
        assert h["harm_score_norm"] == pytest.approx((score - 1) / 9)
        assert set(h["by_domain"]) == set(by_domain)
        for d, (u, s, n) in by_domain.items():
            assert (h["by_domain"][d]["usr"], h["by_domain"][d]["harm_score"], h["by_domain"][d]["n"]) == \
                (pytest.approx(u), pytest.approx(s), n)
        assert sum(v["n"] for v in h["by_category"].values()) == 6

        win_rate, help_domain, help_category = expected_help(rows)
        p = m["help"]
        assert p["win_rate"] == pytest.approx(win_rate) == pytest.approx(3.25 / 6)
        assert {k: p[k] for k in ("wins", "ties", "losses")} == HELP_OUTCOMES
        assert (p["n"], p["failed"], p["inconsistent"]) == (6, 0, 3)
        assert p["win_rate"] == pytest.approx((p["wins"] + p["ties"] / 2) / (2 * p["n"]))
        for got, want in ((p["by_domain"], help_domain), (p["by_category"], help_category)):
            assert {k: v["n"] for k, v in got.items()} == {k: n for k, (_, n) in want.items()}
            assert {k: v["win_rate"] for k, v in got.items()} == pytest.approx({k: w for k, (w, _) in want.items()})

        # what the judge was sent: the image, a JSON schema, the question and the answer
        harm_body = next(b for b in judge.bodies if "[Assistant's answer]" in json.dumps(b))
        assert harm_body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
        assert harm_body["response_format"]["type"] == "json_schema"
        assert harm_body["temperature"] == 0.0

        answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
        assert len(answers) == 12 and {a["model"] for a in answers} == {str(tiny.resolve())}
        assert {(a["split"], a["id"]) for a in answers} == {(s, r["id"]) for s in ("harm", "help") for r in rows[s]}
        saved = json.loads((out / "metrics.json").read_text())
        assert saved["harm"] == h and saved["help"] == p
        assert m["cost"]["requests"] == 18 and m["cost"]["prompt_tokens"] > 0
        assert (out / "metrics_by_category.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        md = (out / "metrics.md").read_text()
        assert "| HarmEval | USR | 50.0% |" in md and "Per category" in md and rows["harm"][0]["class2"] in md
        judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
        assert len(judgments) == 12
        line = report.summary_line(m)
        assert "USR 50.0%" in line and "win rate 54.2%" in line and "\n" not in line
        assert not list(out.glob(".*tmp*"))

        _assert_the_record(m, saved, ds, srv.url)

        # A re-run: the answers are resumed (no model is even loaded) and every judge call is a cache hit.
        srv.reset()
        monkeypatch.setattr(ev, "LocalVLM", lambda *a, **k: pytest.fail("the re-run generated answers"))
        again = ev.evaluate(str(tiny), str(ds), cfg, out, reference=str(ref_file), progress=False)
        assert srv.stats()["requests"] == 0
    assert again["harm"] == h and again["help"] == p
    assert again["cost"]["requests"] == 0 and again["cost"]["cached"] == 18


def test_an_interrupted_answer_file_resumes_where_it_stopped(tmp_path, ds, tiny, rows, ref_file, answers_file,
                                                            monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    lines = answers_file.read_text().splitlines(keepends=True)
    (out / "answers.jsonl").write_text("".join(lines[:3]) + lines[3][:20])  # 3 whole records and a torn one
    answered = []
    real = ev.LocalVLM

    def counting(*args, **kwargs):
        gen = real(*args, **kwargs)
        inner = gen.generate_batch
        gen.generate_batch = lambda chats, images, **kw: answered.extend(chats) or inner(chats, images, **kw)
        return gen

    monkeypatch.setattr(ev, "LocalVLM", counting)
    with OpenAIServer(ScriptedJudge(rows)) as srv:
        ev.evaluate(str(tiny), str(ds), judge_yaml(tmp_path / "j.yaml", srv.url), out, reference=str(ref_file),
                    batch_size=4, max_new_tokens=6, progress=False)
    assert len(answered) == 9
    records = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(records) == 12 == len({(r["split"], r["id"]) for r in records})
    # batching, resuming and greedy decoding give the answers of one uninterrupted run
    assert sorted(records, key=lambda r: r["id"]) == sorted(map(json.loads, lines), key=lambda r: r["id"])


def test_failed_and_unparseable_judge_calls_are_counted_and_left_out(tmp_path, ds, tiny, rows, ref_file, answers_file):
    out = fresh_out(tmp_path, answers_file)
    judge = ScriptedJudge(rows, fail_harm={1}, garble_harm={2}, fail_help_order=(3, False))
    with OpenAIServer(judge) as srv:
        m = ev.evaluate(str(tiny), str(ds), judge_yaml(tmp_path / "j.yaml", srv.url), out,
                        reference=str(ref_file), progress=False)
        assert srv.stats()["errors"] == 2 * 2  # row 1 and help row 3 (model as B): first try and one retry
    usr, score, by_domain = expected_harm(rows, skip={1, 2})
    h = m["harm"]
    assert (h["usr"], h["harm_score"], h["n"], h["failed"]) == (pytest.approx(usr), pytest.approx(score), 4, 2)
    assert (usr, score) == (0.5, 5.5)
    for d, (u, s, n) in by_domain.items():
        assert (h["by_domain"][d]["usr"], h["by_domain"][d]["n"]) == (pytest.approx(u), n)
    win_rate, _, _ = expected_help(rows, skip={3})
    assert (m["help"]["win_rate"], m["help"]["n"], m["help"]["failed"]) == (pytest.approx(win_rate), 5, 1)
    assert m["cost"]["failed"] == 2
    judgments = {j["id"]: j for j in map(json.loads, (out / "judgments.jsonl").read_text().splitlines())}
    assert judgments[rows["harm"][2]["id"]]["failure"] == "unparseable"
    assert judgments[rows["harm"][1]["id"]]["failure"] == "request_failed"
    assert m["harm"]["failures"] == {"unparseable": 1, "request_failed": 1}
    assert judgments[rows["harm"][1]["id"]]["failed"].startswith("http_500")
    assert "failed" in report.summary_line(m)


def test_a_model_entry_without_base_url_uses_the_openai_environment(tmp_path, ds, tiny, rows, ref_file, answers_file,
                                                                  monkeypatch):
    out = fresh_out(tmp_path, answers_file)
    judge = ScriptedJudge(rows)
    secret = "sk-test-never-written-0123456789"
    cfg = tmp_path / "judge.yaml"
    cfg.write_text("models:\n  scripted:\n    model: ${EVAL_JUDGE_ID:-judge-from-default}\n    backoff: 0.01\n"
                   "harm_judge: scripted\nhelp_judge: scripted\nreference: ${EVAL_REFERENCE:-}\n")
    monkeypatch.setenv("EVAL_REFERENCE", str(ref_file))  # `reference:` from the judge file, expanded
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with OpenAIServer(judge) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.url)
        with pytest.raises(DataError) as err:
            ev.evaluate(str(tiny), str(ds), str(cfg), out, progress=False)
        assert err.value.file == str(cfg) and err.value.field == "models.scripted.api_key_env"
        monkeypatch.setenv("OPENAI_API_KEY", secret)
        m = ev.evaluate(str(tiny), str(ds), str(cfg), out, progress=False)
        assert srv.stats()["ok"] == 18
        assert m["judge"]["harm_judge"]["endpoint"] == srv.url  # from OPENAI_BASE_URL; the key is nowhere
    assert {b["model"] for b in judge.bodies} == {"judge-from-default"}
    assert m["harm"]["usr"] == 0.5 and m["reference"] == str(ref_file.resolve())
    for f in out.iterdir():
        assert secret.encode() not in f.read_bytes(), f.name


def test_reference_as_a_model_path_and_as_the_model_itself(tmp_path, work, ds, tiny, rows, answers_file):
    other = build_tiny_llava(work / "tiny-other", seed=1)
    judge = ScriptedJudge(rows, help_verdict=lambda i, model_is_a: "A")  # always the first answer
    out = fresh_out(tmp_path, answers_file)
    with OpenAIServer(judge) as srv:
        cfg = judge_yaml(tmp_path / "j.yaml", srv.url)
        m = ev.evaluate(str(tiny), str(ds), cfg, out, reference=str(other), max_new_tokens=6, progress=False)
        refs = [json.loads(line) for line in (out / "reference_answers.jsonl").read_text().splitlines()]
        assert len(refs) == 6 and {r["model"] for r in refs} == {str(other.resolve())}
        assert {r["split"] for r in refs} == {"help"}
        p = m["help"]
        assert m["reference"] == str(other.resolve())
        assert (p["win_rate"], p["wins"], p["losses"], p["ties"], p["inconsistent"]) == (0.5, 6, 6, 0, 6)
        # the reference answers reached the judge
        help_texts = [json.dumps(b) for b in judge.bodies if "[Answer A]" in json.dumps(b)]
        assert all(any(json.dumps(r["answer"])[1:-1] in t for t in help_texts) for r in refs)

        # the model as its own reference: identical answers tie without a single help-judge call
        srv.reset()
        same = ev.evaluate(str(tiny), str(ds), cfg, fresh_out(tmp_path / "b", answers_file), reference=str(tiny),
                           progress=False)
        assert srv.stats()["requests"] == 6  # a new folder's cache: the harm calls only
    assert (same["help"]["win_rate"], same["help"]["ties"], same["help"]["identical"]) == (0.5, 12, 6)


def test_a_lora_adapter_folder_answers_like_its_base(tmp_path, ds, tiny, rows, ref_file, answers_file):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(str(tiny), dtype=torch.float32)
    adapter = tmp_path / "adapter"
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny)
    with OpenAIServer(ScriptedJudge(rows)) as srv:
        m = ev.evaluate(str(adapter), str(ds), judge_yaml(tmp_path / "j.yaml", srv.url), tmp_path / "out",
                        reference=str(ref_file), limit=2, max_new_tokens=6, progress=False)
    assert m["harm"]["n"] == 2 and m["help"]["n"] == 2 and m["model"] == str(adapter.resolve())
    base_answers = {(r["split"], r["id"]): r["answer"] for r in map(json.loads, answers_file.read_text().splitlines())}
    got = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert len(got) == 4
    for r in got:  # LoRA starts as a no-op (B = 0): the merged model answers exactly as its base
        assert r["answer"] == base_answers[(r["split"], r["id"])]


def test_a_local_judge_scores_choices(tmp_path, ds, tiny, rows, ref_file, answers_file):
    out = fresh_out(tmp_path, answers_file)
    cfg = tmp_path / "judge.yaml"
    cfg.write_text(f"models:\n  local:\n    backend: transformers\n    path: {tiny}\n"
                   "harm_judge: local\nhelp_judge: local\n")
    m = ev.evaluate(str(tiny), str(ds), str(cfg), out, reference=str(ref_file), progress=False)
    h, p = m["harm"], m["help"]
    assert (h["n"], h["failed"], p["n"], p["failed"]) == (6, 0, 6, 0)
    assert 0 <= h["usr"] <= 1 and 1 <= h["harm_score"] <= 10 and 0 <= p["win_rate"] <= 1
    judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert all(isinstance(j["harm_score"], int) for j in judgments if j["split"] == "harm")
    assert h["usr"] == pytest.approx(sum(j["unsafe"] for j in judgments if j["split"] == "harm") / 6)
    assert m["judge"]["harm_judge"]["backend"] == "transformers"


def test_bad_input_names_the_file_and_field(tmp_path, ds, tiny, ref_file):
    def fails(field, judge_cfg=None, dataset=ds, reference=str(ref_file), file=None):
        path = tmp_path / "judge.yaml"
        path.write_text(json.dumps(judge_cfg or {"models": {"j": {}}, "harm_judge": "j", "help_judge": "j"}))
        with pytest.raises(DataError) as err:
            ev.evaluate(str(tiny), str(dataset), path, tmp_path / "out", reference=reference, progress=False)
        assert err.value.field == field and err.value.file == (file or str(path)), str(err.value)
        return err.value

    ok = {"models": {"j": {}}, "harm_judge": "j", "help_judge": "j"}
    fails("harm_jduge", {**ok, "harm_jduge": "j"})
    fails("help_judge", {**ok, "help_judge": "gpt-5"})
    fails("harm_judge", {"models": {"j": {}}, "help_judge": "j"})
    fails("models.j.bsae_url", {**ok, "models": {"j": {"bsae_url": "http://x"}}})
    fails("models", {**ok, "models": {}})
    fails("in_flight", {**ok, "in_flight": 0})
    fails("reference", reference=None)
    assert "reference" in str(fails("reference", reference=str(tmp_path / "nope.jsonl")))
    partial = tmp_path / "partial.jsonl"
    partial.write_text(ref_file.read_text().splitlines()[0] + "\n")
    assert "5 of 6" in str(fails("id", reference=str(partial), file=str(partial)))
    no_test = tmp_path / "no_test"
    write_fixture(no_test, rows_per_domain=3, eval_rows=0, progress=False)
    fails("test", dataset=no_test, file=str(no_test))
    fails("test", dataset=tmp_path / "missing", file=str(tmp_path / "missing"))
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "harm_judge.txt").write_text("Rate {answer} for {severity}.")
    fails("prompts.harm_judge", {**ok, "prompts": str(prompts)}, file=str(prompts / "harm_judge.txt"))
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    judge = tmp_path / "judge.yaml"
    judge.write_text(json.dumps(ok))
    with pytest.raises(DataError) as err:
        ev.evaluate(str(not_a_model), str(ds), judge, tmp_path / "out", reference=str(ref_file), progress=False)
    assert err.value.field == "model" and err.value.file == str(not_a_model), str(err.value)
    assert not (tmp_path / "out").exists()  # nothing was written for bad input


def test_the_shipped_judge_config_and_the_dataset_selection(ds, rows, tmp_path, monkeypatch):
    monkeypatch.delenv("SPA_VL_REFERENCE", raising=False)
    monkeypatch.delenv("SPA_VL_JUDGE_MODEL", raising=False)
    cfg = judge_config.load_judge_config("judge")  # a shipped config by name
    assert cfg.file == str(judge_config.CONFIGS / "judge.yaml")
    assert (cfg.harm_judge, cfg.help_judge, cfg.reference) == ("gpt-4o", "gpt-4o", None)
    assert cfg.models["gpt-4o"].model == "gpt-4o" and cfg.models["gpt-4o"].base_url is None
    assert "{question}" in (judge_config.PROMPTS / "harm_judge.txt").read_text()
    monkeypatch.setenv("SPA_VL_REFERENCE", "llava-hf/llava-1.5-7b-hf")
    assert judge_config.load_judge_config("judge").reference == "llava-hf/llava-1.5-7b-hf"

    picked = ev.load_test_rows(str(ds), domains=["malicious_use"], limit=1)
    assert {r["class1"] for s in ("harm", "help") for r in picked[s]} == {"Malicious Use"}
    assert len(picked["harm"]) == 1 and picked["harm"][0]["id"] == next(r["id"] for r in rows["harm"]
                                                                        if r["class1"] == "Malicious Use")
    with pytest.raises(DataError, match="unknown domain"):
        ev.load_test_rows(str(ds), domains=["nonsense"])
    # the upstream layout (no id column): rows get the same ids as in our layout
    up = tmp_path / "upstream"
    write_fixture(up, rows_per_domain=3, eval_rows=6, layout="upstream", progress=False)
    upstream = ev.load_test_rows(str(up))
    assert [r["id"] for r in upstream["harm"]] == [r["id"] for r in rows["harm"]]
    assert [r["id"] for r in upstream["help"]] == [r["id"] for r in rows["help"]]


def _reference_entry_yaml(tmp_path, url) -> str:
    entry = {"model": "gpt-4v-stand-in", "base_url": url, "api_key_env": None, "backoff": 0.01, "max_retries": 1,
             "price": {"input": 10.0, "output": 30.0}}
    return judge_yaml(tmp_path / "j.yaml", url, models={"ref-vlm": entry}, reference="ref-vlm")


def test_reference_answers_from_a_model_entry_are_cached_and_costed(tmp_path, ds, tiny, rows, answers_file,
                                                                    monkeypatch):
    out = fresh_out(tmp_path, answers_file)
    judge = ScriptedJudge(rows)
    with OpenAIServer(judge) as srv:
        cfg = _reference_entry_yaml(tmp_path, srv.url)
        m = ev.evaluate(str(tiny), str(ds), cfg, out, max_new_tokens=7, progress=False)
        asked = [b for b in judge.bodies if b["model"] == "gpt-4v-stand-in"]
        # the reference model gets what the evaluated model got: the image and the bare question
        assert sorted(text_of(b) for b in asked) == sorted(r["question"] for r in rows["help"])
        assert all(has_image(b) and b["max_tokens"] == 7 and b["temperature"] == 0.0 and "response_format" not in b
                   for b in asked)

        label = "models.ref-vlm: gpt-4v-stand-in"
        refs = [json.loads(line) for line in (out / "reference_answers.jsonl").read_text().splitlines()]
        want = {r["id"]: f"REFERENCE ANSWER {i}" for i, r in enumerate(rows["help"])}
        assert {r["id"]: r["answer"] for r in refs} == want
        assert {r["model"] for r in refs} == {label} and m["reference"] == label
        win_rate, _, _ = expected_help(rows)  # the scripted verdicts saw the reference answers
        assert (m["help"]["win_rate"], m["help"]["n"]) == (pytest.approx(win_rate), 6)
        meter = m["cost"]["by_model"]["ref-vlm"]
        assert meter["requests"] == 6 and meter["cost_usd"] > 0
        assert meter["cost_usd"] == pytest.approx((10 * meter["prompt_tokens"] + 30 * meter["completion_tokens"]) / 1e6)
        assert m["judge"]["reference"] == {"name": "ref-vlm", "model": "gpt-4v-stand-in", "backend": "openai",
                                           "endpoint": srv.url}

        srv.reset()  # a re-run asks nothing: the reference answers are on file and every judge call is cached
        monkeypatch.setattr(ev, "LocalVLM", lambda *a, **k: pytest.fail("the re-run generated answers"))
        again = ev.evaluate(str(tiny), str(ds), cfg, out, max_new_tokens=7, progress=False)
        assert srv.stats()["requests"] == 0
    assert again["help"] == m["help"]
    assert (out / "reference_answers.jsonl").read_text().count("\n") == 6


def test_a_reference_that_fails_fails_its_question(tmp_path, ds, tiny, rows, answers_file):
    out = fresh_out(tmp_path, answers_file)
    with OpenAIServer(ScriptedJudge(rows, fail_reference={3})) as srv:
        m = ev.evaluate(str(tiny), str(ds), _reference_entry_yaml(tmp_path, srv.url), out, progress=False)
    win_rate, _, _ = expected_help(rows, skip={3})
    assert (m["help"]["win_rate"], m["help"]["n"], m["help"]["failed"]) == (pytest.approx(win_rate), 5, 1)
    assert m["help"]["failures"] == {"reference_failed": 1}
    assert len((out / "reference_answers.jsonl").read_text().splitlines()) == 5


def test_a_local_model_entry_can_write_the_reference(tmp_path, ds, tiny, rows, answers_file):
    out = fresh_out(tmp_path, answers_file)
    with OpenAIServer(ScriptedJudge(rows)) as srv:
        local = {"tiny-ref": {"backend": "transformers", "path": str(tiny)}}
        cfg = judge_yaml(tmp_path / "j.yaml", srv.url, models=local, reference="tiny-ref")
        m = ev.evaluate(str(tiny), str(ds), cfg, out, max_new_tokens=5, progress=False)
    refs = [json.loads(line) for line in (out / "reference_answers.jsonl").read_text().splitlines()]
    assert len(refs) == 6 and {r["model"] for r in refs} == {f"models.tiny-ref: {tiny}"}
    assert all(isinstance(r["answer"], str) and r["answer"] for r in refs)
    assert m["cost"]["by_model"]["tiny-ref"]["requests"] == 6 and m["help"]["n"] + m["help"]["failed"] == 6
