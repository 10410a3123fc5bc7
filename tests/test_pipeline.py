"""The generation pipeline end to end on the loopback OpenAI-compatible server (real openai client, real HTTP)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from openai_server import OpenAIServer
from pipeline_doubles import pipeline_responder, write_config

from builder.generate import NothingToBuild, build
from builder.generate.config import PipelineConfig
from builder.errors import DataError
from builder.generate.pipeline import generate
from builder.generate.run_store import RunStore
from builder.taxonomy import Taxonomy

LIMIT = 12
ROOT = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def server():
    with OpenAIServer(pipeline_responder) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    """One uninterrupted run and its built folder: the baseline every other run is compared with."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = write_config(tmp / "run.yaml", server.url)
    server.reset()
    summary = generate(cfg, tmp / "run", limit=LIMIT, progress=False)
    sent = server.stats()["ok"]
    build(tmp / "run", tmp / "out", progress=False)
    return {"cfg": cfg, "run": tmp / "run", "out": tmp / "out", "summary": summary, "served": sent}


def test_full_run_builds_a_folder_that_loads_per_domain(reference, tmp_path):
    from datasets import load_dataset

    s = reference["summary"]
    assert s["units"] == {**s["units"], "total": LIMIT, "done": LIMIT, "failed": 0, "failures": []}
    assert s["requests"]["sent"] == reference["served"]  # every request the client counts, the server answered
    assert s["requests"]["cached"] == 0 and s["cost_usd"] > 0
    assert set(s["models"]) == {"m0", "m1", "m2", "judge"}
    assert all(m["prompt_tokens"] > 0 and m["completion_tokens"] > 0 for m in s["models"].values())
    assert s["pairs"]["agreed"] + s["pairs"].get("position_disagreement", 0) == 3 * LIMIT
    on_disk = json.loads((reference["run"] / "summary.json").read_text())
    assert on_disk["units"]["done"] == LIMIT and on_disk["wall_time_s"] > 0

    out = reference["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    tax = Taxonomy.load()
    for slug in tax.slugs:  # the limit is spread over the domains, so every domain config has rows
        dd = load_dataset(str(out), slug, cache_dir=str(tmp_path / "cache"))
        ds = next(iter(dd.values()))  # train or validation: the split comes from the image hash
        assert ds.num_rows > 0 and all(set(d["class1"]) == {tax.domain(slug).label} for d in dd.values())
        row = ds[0]
        assert row["question_type"] in ("easy", "hardq", "hards") and row["chosen"] != row["rejected"]
        assert row["chosen_model"] in {"m0", "m1", "m2"} and row["chosen_model"] != row["rejected_model"]
    test = load_dataset(str(out), "test", cache_dir=str(tmp_path / "cache"))
    assert test["harm"].num_rows == test["help"].num_rows > 0
    train_images = set(load_dataset(str(out), "default", split="train", cache_dir=str(tmp_path / "cache"))["image_name"])
    assert not train_images & set(test["harm"]["image_name"])  # no image in two splits
    assert manifest["format"] == "spa-vl-dataset/1" and manifest["build_config_hash"]


def test_position_disagreements_are_flagged_and_left_out(reference):
    store = RunStore(reference["run"])
    pairs = [p for u in store.units() for p in u["pairs"].values()]
    store.close()
    flagged = [p for p in pairs if p["status"] == "position_disagreement"]
    assert flagged and all(p["verdicts"] == ["A", "A"] for p in flagged)  # the double's biased judge
    s = reference["summary"]["pairs"]
    assert s["position_disagreement_rate"] == pytest.approx(len(flagged) / len(pairs), abs=1e-4)
    import pyarrow.parquet as pq

    out = reference["out"]
    harm = {n for f in (out / "data/test").glob("harm-*.parquet") for n in pq.read_table(f, columns=["image_name"])["image_name"].to_pylist()}
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in out.glob("data/*/*.parquet") if f.parent.name != "test")
    store = RunStore(reference["run"])
    kept = sum(p["status"] == "agreed" for u in store.units() if f"{u['id'][:16]}.jpg" not in harm for p in u["pairs"].values())
    store.close()
    assert rows == kept


def test_rerun_sends_nothing_and_is_fast(reference, server):
    before = server.stats()["ok"]
    summary = generate(reference["cfg"], reference["run"], limit=LIMIT, progress=False)
    assert server.stats()["ok"] == before  # nothing re-sent
    assert summary["requests"]["sent"] == 0 and summary["requests"]["cached"] > 0
    assert summary["units"]["done"] == LIMIT


def test_changing_one_prompt_reruns_only_what_depends_on_it(reference, server, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "hards.txt").write_text((ROOT / "builder/prompts/hards.txt").read_text() + "Be brief.\n")
    cfg = yaml.safe_load(reference["cfg"].read_text())
    cfg["prompts"] = str(prompts)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    server.reset()
    summary = generate(cfg_path, run, limit=LIMIT, progress=False)
    sent = {m: v["requests"] for m, v in summary["models"].items()}
    # per unit: the hard statement, its two answers and two judge calls (nothing for easy or hardq)
    assert sum(sent.values()) == server.stats()["ok"]
    assert sent.get("m1", 0) >= LIMIT  # m1 writes the hard statements
    assert sum(sent.values()) <= LIMIT * 5
    assert summary["units"]["done"] == LIMIT


def test_faults_every_unit_accounted_for(tmp_path):
    with OpenAIServer(pipeline_responder, fault_rate=0.2, retry_after=0.05, hang_seconds=3, seed=7) as srv:
        cfg = write_config(tmp_path / "run.yaml", srv.url, limit_keys={"timeout": 0.5})
        summary = generate(cfg, tmp_path / "run", limit=8, progress=False)
        stats = srv.stats()
    assert all(stats["faults"][k] > 0 for k in ("429", "500", "hang", "malformed"))
    units = summary["units"]
    assert units["done"] + units["failed"] == units["total"] == 8
    assert len(units["failures"]) == units["failed"] and all(f["kind"] and f["stage"] for f in units["failures"])
    assert summary["requests"]["retried"] >= sum(stats["faults"].values()) - summary["requests"]["failed"]


def test_a_request_that_keeps_failing_fails_its_unit_with_a_reason(tmp_path):
    with OpenAIServer(pipeline_responder, fault_rate=1.0, faults=("500",)) as srv:
        cfg = write_config(tmp_path / "kw.yaml", srv.url, limit_keys={"max_retries": 1})
        summary = generate(cfg, tmp_path / "kw", limit=2, progress=False)
        # the keyword call failed: that subcategory has no units yet, is reported, and waits for the next run
        assert summary["units"]["total"] == 0
        assert summary["images"]["failures"][0]["stage"] == "keywords"
        cfg = write_config(tmp_path / "run.yaml", srv.url, limit_keys={"max_retries": 2}, keywords={"model": None})
        summary = generate(cfg, tmp_path / "run", limit=2, progress=False)
    assert summary["units"]["failed"] == 2 and summary["units"]["done"] == 0
    failure = summary["units"]["failures"][0]
    assert failure["stage"] == "questions" and failure["kind"].startswith("http_5") and failure["model"] == "m0"
    assert summary["requests"]["retried"] >= 2 * 2
    with pytest.raises(NothingToBuild, match=r"no work unit finished: 2 failed \(questions: http_5.*The server had an error"):
        build(tmp_path / "run", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_sigkill_halfway_then_rerun_is_byte_identical(reference, tmp_path):
    """Kill the CLI while the server holds the second half of the requests; the re-run re-sends nothing that
    had succeeded and builds the same bytes as the uninterrupted run."""
    total = reference["served"]
    with OpenAIServer(pipeline_responder, pause_after=total // 2) as srv:
        cfg = write_config(tmp_path / "run.yaml", srv.url)
        cmd = [sys.executable, "-m", "builder.cli", "generate", str(cfg), "--run_dir", str(tmp_path / "run"),
               "--limit", str(LIMIT), "--progress", "False"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert srv.wait_for_ok(total // 2, timeout=120), proc.communicate(timeout=5)
        time.sleep(1.0)  # the client has the replies the server sent; let it commit them
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        before = srv.served()
        assert 0 < sum(before.values()) < total
        srv.resume()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        after = srv.served()
    resent = [k for k in before if after[k] > before[k]]
    assert resent == []
    assert sum(after.values()) >= total  # the rest was sent by the second run
    build(tmp_path / "run", tmp_path / "out", progress=False)
    assert _files(tmp_path / "out") == _files(reference["out"])


def test_ray_executor_gives_the_same_folder(reference, server, tmp_path):
    pytest.importorskip("ray")
    import ray

    cfg = yaml.safe_load(reference["cfg"].read_text())
    cfg["run"] = {"ray_workers": 2}
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    try:
        summary = generate(cfg_path, tmp_path / "run", executor="ray", limit=LIMIT, progress=False)
    finally:
        ray.shutdown()
    assert summary["units"]["done"] == LIMIT and summary["requests"]["sent"] > 0
    build(tmp_path / "run", tmp_path / "out", progress=False)
    assert _files(tmp_path / "out") == _files(reference["out"])


def test_config_errors_name_the_file_and_field(tmp_path):
    path = write_config(tmp_path / "bad.yaml", "http://127.0.0.1:9/v1", judge={"model": "nope"})
    with pytest.raises(DataError, match=r"bad\.yaml: field judge\.model: model 'nope' is not defined"):
        PipelineConfig.load(path)
    path = write_config(tmp_path / "bad2.yaml", "http://127.0.0.1:9/v1", responses={"bag": ["m0"]})
    with pytest.raises(DataError, match="responses.bag.*at least two"):
        PipelineConfig.load(path)
    path = write_config(tmp_path / "bad3.yaml", "http://127.0.0.1:9/v1", judgee={"model": "m0"})
    with pytest.raises(DataError, match="field judgee: unknown key"):
        PipelineConfig.load(path)


def test_shipped_recipe_runs_unedited_against_any_openai_compatible_server(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    cfg = PipelineConfig.load(ROOT / "builder/configs/pipeline.yaml")
    assert all(spec.base_url is None for spec in cfg.models.values())
    summary = generate(cfg, tmp_path / "run", limit=2, progress=False)
    assert summary["units"]["done"] == 2
    for path in (tmp_path / "run").rglob("*"):  # the key is never written anywhere in the run directory
        if path.is_file():
            assert b"sk-test-not-a-real-key" not in path.read_bytes()


def test_missing_api_key_is_a_clear_error(server, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    with pytest.raises(DataError, match="OPENAI_API_KEY"):
        generate(ROOT / "builder/configs/pipeline.yaml", tmp_path / "run", limit=1, progress=False)


def test_safety_labels_reach_the_rows(server, tmp_path):
    import pyarrow.parquet as pq

    cfg = write_config(tmp_path / "run.yaml", server.url, safety={"model": "judge"}, build={"test_fraction": 0.0})
    summary = generate(cfg, tmp_path / "run", limit=6, progress=False)
    assert summary["units"]["done"] == 6
    build(tmp_path / "run", tmp_path / "out", progress=False)
    rows = [r for f in sorted((tmp_path / "out/data").glob("*/*.parquet")) if f.parent.name != "test"
            for r in pq.read_table(f, columns=["chosen", "rejected", "question_unsafe", "chosen_unsafe", "rejected_unsafe"]).to_pylist()]
    assert rows and all(isinstance(r["question_unsafe"], bool) for r in rows)
    # the double's classifier calls an answer unsafe when it complies ("Sure, here is how")
    assert all(r["chosen_unsafe"] == r["chosen"].startswith("Sure, here is how") for r in rows)


def test_bag_entries_serving_one_model_still_give_two_answers(server, tmp_path):
    cfg = yaml.safe_load(write_config(tmp_path / "r.yaml", server.url).read_text())
    for entry in cfg["models"].values():
        entry["model"] = "one-model"  # e.g. SPA_VL_MODEL pointing every role at one served model
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    summary = generate(tmp_path / "r.yaml", tmp_path / "run", limit=4, progress=False)
    assert summary["units"]["done"] == 4 and summary["pairs"].get("identical", 0) == 0


def test_build_leaves_out_units_made_under_another_config(reference, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    snap = yaml.safe_load((run / "config.yaml").read_text())
    snap["units_fingerprint"] = "another-config"
    (run / "config.yaml").write_text(yaml.safe_dump(snap))
    with pytest.raises(NothingToBuild, match=f"the {LIMIT} finished units were made with an earlier config"):
        build(run, tmp_path / "out", progress=False)
    assert f"{LIMIT} finished units were made with an earlier config" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
