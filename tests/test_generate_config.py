"""`spa-vl generate` checks its whole config before the first request, and takes shipped configs by name."""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path

import pytest
import yaml
from openai_server import OpenAIServer
from pipeline_doubles import pipeline_responder, run_cli, write_config

from builder.generate.config import PipelineConfig
from builder.errors import DataError
from builder.generate.pipeline import generate
from builder.settings import expand_env
from builder.shipped import PIPELINE_CONFIGS, resolve_config, shipped_configs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server():
    with OpenAIServer(pipeline_responder) as srv:
        yield srv


def _edit(cfg: dict, dotted: str, value) -> dict:
    """``cfg`` with the value at a dotted path ("models.m0.rpm", "images.sources") replaced."""
    *parents, last = dotted.split(".")
    node = cfg
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return cfg


BAD = [  # (dotted path, value, the field the error names, words of the message)
    ("models.m0.rpm", -5, "models.m0.rpm", "greater than 0, got -5"),  # silently disabled the limit before
    ("models.m0.rpm", "fast", "models.m0.rpm", "must be a number or null, got 'fast'"),  # failed every unit before
    ("keywords.per_subcategory", -3, "keywords.per_subcategory", "at least 1, got -3"),  # 0 units, exit 0 before
    ("images.per_subcategory", 0, "images.per_subcategory", "at least 1"),
    ("images.download_concurrency", "many", "images.download_concurrency", "must be an integer"),
    ("images.timeout", -1, "images.timeout", "greater than 0"),
    ("images.sources", {"type": "typography"}, "images.sources", "must be a list of mappings"),
    ("images.sources", [], "images.sources", "at least one image source"),
    ("images.sources", [{"type": "typography", "size": -5}], "images.sources[0].size", "greater than 0"),
    ("images.sources", [{"type": "folder", "path": "no_such_dir"}], "images.sources[0].path", "no such folder"),
    ("images.sources", [{"type": "urls", "path": "none.parquet"}], "images.sources[0].path", "no such file"),
    ("images.sources", [{"type": "laion"}], "images.sources[0].type", "unknown source type"),
    ("images.filters", {"min_side": -1}, "images.filters.min_side", "at least 0"),
    ("images.filters", {"max_nsfw": 2}, "images.filters.max_nsfw", "at most 1"),
    ("images.filters", {"blocklist": "gore"}, "images.filters.blocklist", "must be a list of strings"),
    ("images.filters", {"min_sid": 3}, "images.filters.min_sid", "unknown key"),
    ("judge", "m0", "judge", "must be a mapping"),  # a traceback before
    ("models", ["m0", "m1"], "models", "must be a mapping"),
    ("models.m0", "gpt-4o", "models.m0", "must be a mapping"),
    ("responses.bag", "m0", "responses.bag", "must be a list of strings"),
    ("judge.agreement", "majority", "judge.agreement", "must be one of strict, average"),
    ("questions.params", {"temperature": "hot"}, "questions.params.temperature", "must be a number"),
    ("questions.params", {"top_k": 40}, "questions.params.top_k", "the openai client has no such parameter"),
    ("build.validation_fraction", 1.5, "build.validation_fraction", "less than 1"),
    ("build.version", "1.0", "build.version", "not a semantic version"),
    ("run.units_in_flight", 0, "run.units_in_flight", "at least 1"),
    ("run.ray_workers", "all", "run.ray_workers", "must be an integer or null"),
    ("seed", "zero", "seed", "must be an integer"),
    ("prompts", "no_such_prompts", "prompts", "no such folder"),  # silently used the shipped prompts before
    ("taxonomy", 3, "taxonomy", "must be a string or null"),
]


@pytest.mark.parametrize("dotted,value,field,words", BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_a_bad_config_is_refused_before_any_request(server, tmp_path, capsys, dotted, value, field, words):
    cfg_path = write_config(tmp_path / "run.yaml", server.url)
    cfg = _edit(yaml.safe_load(cfg_path.read_text()), dotted, value)
    cfg_path.write_text(yaml.safe_dump(cfg))
    before = server.stats()["requests"]
    code, out, err = run_cli(["generate", str(cfg_path), "--run_dir", str(tmp_path / "run"), "--progress", "False"], capsys)
    assert code == 2, (out, err)
    assert err.startswith("spa-vl: error:") and len(err.strip().splitlines()) == 1, err
    assert f"{cfg_path}: field {field}: " in err and words in err, err
    assert server.stats()["requests"] == before  # nothing was sent
    assert not (tmp_path / "run").exists()  # and nothing written


def test_prompt_files_are_checked_when_read(server, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    cfg = write_config(tmp_path / "run.yaml", server.url, prompts="prompts")
    (prompts / "judge.txt").write_text("Which is better, A or B?\n{question}\n{answer_a}\n")  # B never shown
    with pytest.raises(DataError, match=r"judge\.txt: missing placeholder \{answer_b\}"):
        PipelineConfig.load(cfg)
    (prompts / "judge.txt").write_text("{question} {answer_a} {answer_b} {verdict}")
    with pytest.raises(DataError, match=r"judge\.txt: unknown placeholder \{verdict\}"):
        PipelineConfig.load(cfg)
    (prompts / "judge.txt").write_text('{question} {answer_a} {answer_b} Reply {"better": "A"}')
    with pytest.raises(DataError, match=r"judge\.txt: (not a str.format template|unknown placeholder)"):
        PipelineConfig.load(cfg)
    (prompts / "judge.txt").unlink()
    (prompts / "judgee.txt").write_text("{question}")  # a typo'd name would silently use the shipped prompt
    with pytest.raises(DataError, match=r"judgee\.txt: not a prompt name"):
        PipelineConfig.load(cfg)


def test_sections_come_out_typed(server, tmp_path):
    cfg = PipelineConfig.load(write_config(tmp_path / "run.yaml", server.url))
    assert cfg.images.per_subcategory == 1 and cfg.images.filters.min_side == 64
    assert cfg.images.sources == ({"type": "typography", "size": 96},)
    assert cfg.responses.bag == ["m0", "m1", "m2"] and cfg.judge.model == "judge" and cfg.judge.agreement == "strict"
    assert cfg.run.units_in_flight == 64 and cfg.build.test_fraction == 0.2 and cfg.seed == 0
    assert not hasattr(cfg, "__getattr__") or "__getattr__" not in type(cfg).__dict__  # no raw sections handed out
    with pytest.raises(AttributeError):
        cfg.nonexistent_section  # noqa: B018


def test_environment_variables_in_a_config(monkeypatch):
    monkeypatch.setenv("SPA_VL_T_SET", "there")
    monkeypatch.delenv("SPA_VL_T_UNSET", raising=False)
    assert expand_env({"a": "${SPA_VL_T_SET}", "b": ["x${SPA_VL_T_UNSET:-dflt}"], "c": 3}) == {"a": "there", "b": ["xdflt"], "c": 3}
    with pytest.raises(DataError, match=r"field models\.m\.model: set the environment variable SPA_VL_T_UNSET: the id"):
        expand_env({"models": {"m": {"model": "${SPA_VL_T_UNSET:?the id}"}}})
    from builder.generate import config

    assert config.expand_env is expand_env and not hasattr(config, "_expand")  # one copy: builder.settings'


# --- shipped configs by name ----------------------------------------------------------------------------------
def test_shipped_recipes_run_by_name_from_any_folder(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: names must not depend on the working directory
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    monkeypatch.delenv("SPA_VL_MODEL", raising=False)
    assert resolve_config("pipeline") == PIPELINE_CONFIGS / "pipeline.yaml"
    assert resolve_config("local-server.yaml") == PIPELINE_CONFIGS / "local-server.yaml"
    summary = generate("pipeline", "run", limit=2, progress=False)
    assert summary["units"]["done"] == 2
    (tmp_path / "pipeline").write_text("seed: 0\n")  # a file of that name here wins over the shipped one
    assert resolve_config("pipeline") == Path("pipeline")
    with pytest.raises(DataError, match=r"nope: no such file, nor a shipped config \(local, local-server, pipeline\)"):
        resolve_config("nope")


def test_configs_lists_and_copies_without_replacing(tmp_path, capsys):
    code, out, _ = run_cli(["configs"], capsys)
    assert code == 0
    listed = {tuple(line.split()[:2]) for line in out.splitlines()[:-1]}
    assert {("pipeline", "pipeline"), ("pipeline", "local-server"), ("pipeline", "local"), ("judge", "judge"),
            ("train", "llava-1.5-7b-lora")} <= listed
    assert all(len(line.split(maxsplit=2)) == 3 for line in out.splitlines()[:-1])  # each says what it is
    assert {c.name for c in shipped_configs()} == {n for _, n in listed}

    code, out, _ = run_cli(["configs", "copy", "local-server", str(tmp_path / "mine.yaml")], capsys)
    assert code == 0 and filecmp.cmp(tmp_path / "mine.yaml", PIPELINE_CONFIGS / "local-server.yaml", shallow=False)
    (tmp_path / "mine.yaml").write_text("my edits\n")
    code, _, err = run_cli(["configs", "copy", "pipeline", str(tmp_path / "mine.yaml")], capsys)
    assert code == 2 and "already exists" in err and (tmp_path / "mine.yaml").read_text() == "my edits\n"
    code, _, _ = run_cli(["configs", "copy", "llava-1.5-7b-lora", str(tmp_path)], capsys)  # into a folder
    assert code == 0 and (tmp_path / "llava-1.5-7b-lora.yaml").is_file()
    code, _, err = run_cli(["configs", "copy", "no-such-config", str(tmp_path / "x.yaml")], capsys)
    assert code == 2 and "no shipped config" in err and not (tmp_path / "x.yaml").exists()
    assert sorted(os.listdir(tmp_path)) == ["llava-1.5-7b-lora.yaml", "mine.yaml"]  # no temporary left behind


def test_generate_help_and_docs_use_forms_that_work_after_install():
    import inspect

    from builder.cli import CLI

    assert "generate builder/configs/" not in inspect.getdoc(CLI)
    for doc in (inspect.getdoc(CLI.generate), (ROOT / "builder/configs/pipeline.yaml").read_text()):
        assert "generate builder/configs/" not in doc and "spa-vl generate pipeline" in doc
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Generating a new version", 1)[1].split("\n## ", 1)[0]
    assert "spa-vl generate pipeline" in section and "builder/configs/pipeline.yaml --run_dir" not in section


def test_the_run_directory_keeps_no_expanded_secret(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    monkeypatch.delenv("SPA_VL_MODEL", raising=False)
    generate("pipeline", tmp_path / "run", limit=1, progress=False)
    snapshot = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert snapshot["config_file"].endswith("pipeline.yaml") and snapshot["judge"]["model"] == "gpt-4o"
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"sk-test-not-a-real-key" not in data and server.url.encode() not in data
    assert json.loads((tmp_path / "run/summary.json").read_text())["units"]["done"] == 1
