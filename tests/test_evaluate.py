"""`spa-vl evaluate`: answers from a tiny VLM, a scripted judge on the loopback OpenAI server, metrics.

Every expected number below is computed from the judge's script and the dataset's own labels, not
from the code under test.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from openai_server import OpenAIServer

import spa_vl
from builder.errors import DataError
from builder.fixture import write_fixture
from builder.tiny_vlm import build_tiny_llava
from training import evaluate as ev

# Harm judge script, by row index of test/harm: (unsafe, harm_score).
HARM_SCRIPT = {0: (True, 9), 1: (False, 1), 2: (True, 7), 3: (False, 2), 4: (False, 1), 5: (True, 10)}
# Help judge script, by row index of test/help: the verdict given the model's answer is A (True) or B.
HELP_SCRIPT = {
    0: lambda model_is_a: "A",                                # position bias: 1 win + 1 loss -> 0.5
    1: lambda model_is_a: "A" if model_is_a else "B",         # the model wins both -> 1.0
    2: lambda model_is_a: "B" if model_is_a else "A",         # the reference wins both -> 0.0
    3: lambda model_is_a: "tie",                              # -> 0.5
    4: lambda model_is_a: "A" if model_is_a else "tie",       # win + tie -> 0.75
    5: lambda model_is_a: "B",                                # position bias the other way -> 0.5
}
HELP_SCORE = {0: 0.5, 1: 1.0, 2: 0.0, 3: 0.5, 4: 0.75, 5: 0.5}
HELP_OUTCOMES = {"wins": 1 + 2 + 0 + 0 + 1 + 1, "ties": 2 + 1, "losses": 1 + 2 + 1}


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


def _fresh_out(tmp_path, answers_file):
    out = tmp_path / "out"
    out.mkdir(parents=True)
    shutil.copy(answers_file, out / "answers.jsonl")
    return out


class ScriptedJudge:
    """A responder for OpenAIServer that plays HARM_SCRIPT / HELP_SCRIPT, keyed by the question in the prompt."""

    def __init__(self, rows, *, fail_harm=(), garble_harm=(), fail_help_order=None, help_verdict=None):
        self.harm_index = {r["question"]: i for i, r in enumerate(rows["harm"])}
        self.help_index = {r["question"]: i for i, r in enumerate(rows["help"])}
        self.fail_harm, self.garble_harm = set(fail_harm), set(garble_harm)
        self.fail_help_order = fail_help_order  # (index, model_is_a) that always errors
        self.help_verdict = help_verdict
        self.bodies = []

    def __call__(self, body):
        self.bodies.append(body)
        parts = body["messages"][-1]["content"]
        text = next(p["text"] for p in parts if p["type"] == "text")
        if "[Answer A]" in text:
            question = re.search(r"\[User request\]\n(.*?)\n\n\[Answer A\]", text, re.DOTALL).group(1)
            i = self.help_index[question]
            model_is_a = text.index("REFERENCE ANSWER") > text.index("[Answer B]") if "REFERENCE ANSWER" in text else True
            if self.fail_help_order == (i, model_is_a):
                raise RuntimeError("scripted failure")
            verdict = self.help_verdict(i, model_is_a) if self.help_verdict else HELP_SCRIPT[i](model_is_a)
            return json.dumps({"winner": verdict})
        question = re.search(r"\[User request\]\n(.*?)\n\n\[Assistant's answer\]", text, re.DOTALL).group(1)
        i = self.harm_index[question]
        if i in self.fail_harm:
            raise RuntimeError("scripted failure")
        if i in self.garble_harm:
            return "I would rather not say."
        unsafe, score = HARM_SCRIPT[i]
        return json.dumps({"unsafe": unsafe, "harm_score": score})


def _judge_yaml(path, url: str | None, **extra) -> str:
    entry = {"base_url": url, "api_key_env": None} if url else {}
    entry |= {"backoff": 0.01, "max_retries": 1, "timeout": 10}
    cfg = {"models": {"scripted": entry}, "harm_judge": "scripted", "help_judge": "scripted", **extra}
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return str(path)


def _expected_harm(rows, skip=()):
    keep = [(i, r) for i, r in enumerate(rows["harm"]) if i not in skip]
    usr = sum(HARM_SCRIPT[i][0] for i, _ in keep) / len(keep)
    score = sum(HARM_SCRIPT[i][1] for i, _ in keep) / len(keep)
    by_domain = {}
    for i, r in keep:
        by_domain.setdefault(r["class1"], []).append(HARM_SCRIPT[i])
    return usr, score, {d: (sum(u for u, _ in v) / len(v), sum(s for _, s in v) / len(v), len(v)) for d, v in by_domain.items()}


def _expected_help(rows, skip=()):
    keep = [(i, r) for i, r in enumerate(rows["help"]) if i not in skip]
    by_domain, by_category = {}, {}
    for i, r in keep:
        by_domain.setdefault(r["class1"], []).append(HELP_SCORE[i])
        by_category.setdefault(r["class2"], []).append(HELP_SCORE[i])
    mean = {k: (sum(v) / len(v), len(v)) for k, v in by_domain.items()}
    return sum(HELP_SCORE[i] for i, _ in keep) / len(keep), mean, {k: (sum(v) / len(v), len(v)) for k, v in by_category.items()}


def test_evaluate_scores_the_scripted_judge_and_resumes_for_free(tmp_path, ds, tiny, rows, ref_file, monkeypatch):
    judge = ScriptedJudge(rows)
    out = tmp_path / "out"
    with OpenAIServer(judge) as srv:
        cfg = _judge_yaml(tmp_path / "judge.yaml", srv.url)
        m = ev.evaluate(str(tiny), str(ds), cfg, out, reference=str(ref_file), batch_size=4, max_new_tokens=6,
                        progress=False)
        assert srv.stats()["requests"] == 6 + 2 * 6  # one call per harm row, two orders per help row

        usr, score, by_domain = _expected_harm(rows)
        h = m["harm"]
        assert (h["usr"], h["harm_score"], h["n"], h["failed"]) == (pytest.approx(usr), pytest.approx(score), 6, 0)
        assert (usr, score) == (0.5, 5.0)
        assert h["harm_score_norm"] == pytest.approx((score - 1) / 9)
        assert set(h["by_domain"]) == set(by_domain)
        for d, (u, s, n) in by_domain.items():
            assert (h["by_domain"][d]["usr"], h["by_domain"][d]["harm_score"], h["by_domain"][d]["n"]) == \
                (pytest.approx(u), pytest.approx(s), n)
        assert sum(v["n"] for v in h["by_category"].values()) == 6

        win_rate, help_domain, help_category = _expected_help(rows)
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
        line = ev.summary_line(m)
        assert "USR 50.0%" in line and "win rate 54.2%" in line and "\n" not in line
        assert not list(out.glob(".*tmp*"))

        # A re-run: the answers are resumed (no model is even loaded) and every judge call is a cache hit.
        srv.reset()
        monkeypatch.setattr(ev, "load_generator", lambda *a, **k: pytest.fail("the re-run generated answers"))
        again = ev.evaluate(str(tiny), str(ds), cfg, out, reference=str(ref_file), progress=False)
        assert srv.stats()["requests"] == 0
    assert again["harm"] == h and again["help"] == p
    assert again["cost"]["requests"] == 0 and again["cost"]["cached"] == 18


def test_an_interrupted_answer_file_resumes_where_it_stopped(tmp_path, ds, tiny, rows, ref_file, answers_file, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    lines = answers_file.read_text().splitlines(keepends=True)
    (out / "answers.jsonl").write_text("".join(lines[:3]) + lines[3][:20])  # 3 whole records and a torn one
    answered = []
    real = ev.load_generator

    def counting(*args, **kwargs):
        gen = real(*args, **kwargs)
        inner = gen.answer
        gen.answer = lambda questions, images, **kw: answered.extend(questions) or inner(questions, images, **kw)
        return gen

    monkeypatch.setattr(ev, "load_generator", counting)
    with OpenAIServer(ScriptedJudge(rows)) as srv:
        ev.evaluate(str(tiny), str(ds), _judge_yaml(tmp_path / "j.yaml", srv.url), out, reference=str(ref_file),
                    batch_size=4, max_new_tokens=6, progress=False)
    assert len(answered) == 9
    records = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(records) == 12 == len({(r["split"], r["id"]) for r in records})
    # batching, resuming and greedy decoding give the answers of one uninterrupted run
    assert sorted(records, key=lambda r: r["id"]) == sorted(map(json.loads, lines), key=lambda r: r["id"])


def test_failed_and_unparseable_judge_calls_are_counted_and_left_out(tmp_path, ds, tiny, rows, ref_file, answers_file):
    out = _fresh_out(tmp_path, answers_file)
    judge = ScriptedJudge(rows, fail_harm={1}, garble_harm={2}, fail_help_order=(3, False))
    with OpenAIServer(judge) as srv:
        m = ev.evaluate(str(tiny), str(ds), _judge_yaml(tmp_path / "j.yaml", srv.url), out,
                        reference=str(ref_file), progress=False)
        assert srv.stats()["errors"] == 2 * 2  # row 1 and help row 3 (model as B): first try and one retry
    usr, score, by_domain = _expected_harm(rows, skip={1, 2})
    h = m["harm"]
    assert (h["usr"], h["harm_score"], h["n"], h["failed"]) == (pytest.approx(usr), pytest.approx(score), 4, 2)
    assert (usr, score) == (0.5, 5.5)
    for d, (u, s, n) in by_domain.items():
        assert (h["by_domain"][d]["usr"], h["by_domain"][d]["n"]) == (pytest.approx(u), n)
    win_rate, _, _ = _expected_help(rows, skip={3})
    assert (m["help"]["win_rate"], m["help"]["n"], m["help"]["failed"]) == (pytest.approx(win_rate), 5, 1)
    assert m["cost"]["failed"] == 2
    judgments = {j["id"]: j for j in map(json.loads, (out / "judgments.jsonl").read_text().splitlines())}
    assert judgments[rows["harm"][2]["id"]]["failed"] == "unparseable"
    assert judgments[rows["harm"][1]["id"]]["failed"].startswith("http_500")
    assert "failed" in ev.summary_line(m)


def test_a_model_entry_without_base_url_uses_the_openai_environment(tmp_path, ds, tiny, rows, ref_file, answers_file,
                                                                  monkeypatch):
    out = _fresh_out(tmp_path, answers_file)
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
    assert {b["model"] for b in judge.bodies} == {"judge-from-default"}
    assert m["harm"]["usr"] == 0.5 and m["reference"] == str(ref_file.resolve())
    for f in out.iterdir():
        assert secret.encode() not in f.read_bytes(), f.name


def test_reference_as_a_model_path_and_as_the_model_itself(tmp_path, work, ds, tiny, rows, answers_file):
    other = build_tiny_llava(work / "tiny-other", seed=1)
    judge = ScriptedJudge(rows, help_verdict=lambda i, model_is_a: "A")  # always the first answer
    out = _fresh_out(tmp_path, answers_file)
    with OpenAIServer(judge) as srv:
        cfg = _judge_yaml(tmp_path / "j.yaml", srv.url)
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
        same = ev.evaluate(str(tiny), str(ds), cfg, _fresh_out(tmp_path / "b", answers_file), reference=str(tiny),
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
        m = ev.evaluate(str(adapter), str(ds), _judge_yaml(tmp_path / "j.yaml", srv.url), tmp_path / "out",
                        reference=str(ref_file), limit=2, max_new_tokens=6, progress=False)
    assert m["harm"]["n"] == 2 and m["help"]["n"] == 2 and m["model"] == str(adapter.resolve())
    base_answers = {(r["split"], r["id"]): r["answer"] for r in map(json.loads, answers_file.read_text().splitlines())}
    got = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert len(got) == 4
    for r in got:  # LoRA starts as a no-op (B = 0): the merged model answers exactly as its base
        assert r["answer"] == base_answers[(r["split"], r["id"])]


def test_a_local_judge_scores_choices(tmp_path, ds, tiny, rows, ref_file, answers_file):
    out = _fresh_out(tmp_path, answers_file)
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


def test_parsers():
    assert ev.parse_harm('{"unsafe": true, "harm_score": 7}') == (True, 7)
    assert ev.parse_harm('Verdict: ```json\n{"unsafe": "false", "harm_score": "2"}\n```') == (False, 2)
    assert ev.parse_harm('{"unsafe": true, "harm_score": 11}') is None
    assert ev.parse_harm('{"unsafe": "maybe", "harm_score": 3}') is None
    assert ev.parse_harm('{"choice": "unsafe", "probabilities": [0.25, 0.75]}') == (True, 1 + round(9 * 0.75))
    assert ev.parse_harm('{"choice": "safe", "probabilities": [1.0, 0.0]}') == (False, 1)
    assert ev.parse_harm("no json") is None
    assert ev.parse_winner('{"winner": "b"}') == "B"
    assert ev.parse_winner('{"winner": "Tie"}') == "tie"
    assert ev.parse_winner('{"choice": "A", "probabilities": [0.5, 0.3, 0.2]}') == "A"
    assert ev.parse_winner("The winner: A, clearly.") == "A"
    assert ev.parse_winner('{"winner": "both"}') is None


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
    cfg = ev.load_judge_config("judge")  # a shipped config by name
    assert cfg.file == str(ev.CONFIGS / "judge.yaml")
    assert (cfg.harm_judge, cfg.help_judge, cfg.reference) == ("gpt-4o", "gpt-4o", None)
    assert cfg.models["gpt-4o"].model == "gpt-4o" and cfg.models["gpt-4o"].base_url is None
    assert "{question}" in (ev.PROMPTS / "harm_judge.txt").read_text()
    monkeypatch.setenv("SPA_VL_REFERENCE", "llava-hf/llava-1.5-7b-hf")
    assert ev.load_judge_config("judge").reference == "llava-hf/llava-1.5-7b-hf"

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
