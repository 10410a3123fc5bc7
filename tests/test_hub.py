"""publish and pull through the loopback Hub, driven by the real huggingface_hub client over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubServer, hub_env

from builder.errors import DataError
from builder.hub import (
    Plan,
    PublishRefused,
    VerifyFailed,
    publish,
    pull,
    verify_manifest,
)
from builder.versioning import bump

REPO = "org/SPA-VL"
TOKEN = "hf_loopbackTEST0123456789secret"
SPA_VL = str(Path(sys.executable).with_name("spa-vl"))


@pytest.fixture
def folder(fixture_folder, tmp_path):
    root = tmp_path / "spa_vl"
    shutil.copytree(fixture_folder, root)
    return root


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with HubServer({}, token=TOKEN) as server:
        hub_env(monkeypatch, server, tmp_path / "hf_home")
        monkeypatch.setenv("HF_TOKEN", TOKEN)  # after hub_env, which clears it
        yield server


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.relative_to(root).as_posix().startswith(".spa_vl/")}


def _writes(hub) -> list[tuple[str, str]]:
    return [(m, p) for m, p in hub.requests if m in ("POST", "PUT", "DELETE") and "paths-info" not in p]


def test_dry_run_prints_the_plan_and_changes_nothing(hub, folder, capsys):
    before = _files(folder)
    plan = publish(folder, REPO, dry_run=True, backoff=0)
    assert isinstance(plan, Plan) and plan.repo_exists is False and plan.tag == "v0.1.0"
    err = capsys.readouterr().err
    assert "create repo: yes (private, gated)" in err and "commit message: 'Release v0.1.0'" in err
    assert "tag: v0.1.0" in err and "+ data/malicious_use/train-00000-of-00001.parquet" in err
    assert len(plan.upload) == len(plan.files) == len(before)  # every file, the card's plots included
    assert _writes(hub) == [] and _files(folder) == before


def test_publish_tag_pull_load_round_trip(hub, folder, tmp_path):
    result = publish(folder, REPO, backoff=0)
    assert result.created_repo and not result.resumed and result.tag == "v0.1.0"
    assert hub.repo_settings(REPO) == {"private": True, "gated": "auto"}  # private and gated by default
    commits = hub.commits(REPO)
    release = [c for c in commits if c["title"] == "Release v0.1.0"]
    assert len(release) == 1 and release[0]["id"] == result.commit == commits[0]["id"]
    assert hub.tags(REPO) == {"v0.1.0": result.commit}
    # few API calls: one preupload, one LFS batch, one PUT per binary file, one commit, one tag
    writes = _writes(hub)
    kinds = [p.split("/")[-2] if "/api/" in p else p.rsplit("/", 1)[-1] for _, p in writes]
    assert sum("/preupload/" in p for _, p in writes) == 1 and sum(p.endswith("/objects/batch") for _, p in writes) == 1
    assert sum("/commit/" in p for _, p in writes) == 1 and sum("/tag/" in p for _, p in writes) == 1
    uploads = [p for m, p in writes if m == "PUT" and not p.endswith("/settings")]
    assert len(uploads) == hub.uploads <= len(result_files := _files(folder)), kinds
    assert len(writes) <= hub.uploads * 2 + 8, kinds  # uploads (+ verify) and a handful of calls
    assert len(result_files) == result.files

    out = tmp_path / "pulled"
    pulled = pull(REPO, out, revision="v0.1.0")
    assert pulled.version == "0.1.0"
    assert _files(out) == _files(folder)  # .spa_vl/ (local history) is not published
    assert not (out / ".spa_vl").exists() and not (out / ".cache").exists()

    from datasets import load_dataset

    ds = load_dataset(REPO, "malicious_use", revision="v0.1.0", cache_dir=str(tmp_path / "ds"))
    manifest = json.loads((folder / "manifest.json").read_text())
    want = {s: sum(e["rows"] for p, e in manifest["files"].items() if p.startswith(f"data/malicious_use/{s}-"))
            for s in ("train", "validation")}
    assert {s: ds[s].num_rows for s in ds} == want
    # the card's examples name the repo and the version
    assert 'load_dataset("org/SPA-VL", "malicious_use", revision="v0.1.0")' in (out / "README.md").read_text()


def test_second_publish_of_the_same_version_is_refused(hub, folder):
    first = publish(folder, REPO, backoff=0)
    n = len(hub.commits(REPO))
    with pytest.raises(PublishRefused, match="already has tag v0.1.0"):
        publish(folder, REPO, backoff=0)
    assert len(hub.commits(REPO)) == n and hub.tags(REPO) == {"v0.1.0": first.commit}


def test_faulted_publish_is_retried_to_exactly_one_commit_and_one_tag(hub, folder):
    hub.drop_next_upload()
    hub.fail_next_commit(500)
    hub.fail_next_tag(503)
    hub.fail_next("list_refs", 503)  # the first read of the repo, too
    result = publish(folder, REPO, backoff=0)
    assert [c["title"] for c in hub.commits(REPO)] == ["Release v0.1.0", "initial commit"]
    assert hub.tags(REPO) == {"v0.1.0": hub.commits(REPO)[0]["id"]} and result.attempts == 2
    puts = [r.status for r in hub.log if r.method == "PUT" and "/lfs/" in r.path]
    assert None in puts and puts.count(200) == hub.uploads  # the dropped upload was sent again
    commit_posts = [r.status for r in hub.log if r.method == "POST" and "/commit/" in r.path]
    assert commit_posts == [500, 200]


@pytest.mark.parametrize("status", [500, None], ids=["500", "dropped"])
def test_a_commit_that_landed_behind_an_error_is_not_made_twice(hub, folder, status):
    hub.fail_after_next_commit(status)  # the server applies the commit; the client sees a 500 or a dropped connection
    result = publish(folder, REPO, backoff=0)
    release = [c for c in hub.commits(REPO) if c["title"] == "Release v0.1.0"]
    assert len(release) == 1 and result.commit == release[0]["id"]
    assert hub.tags(REPO) == {"v0.1.0": result.commit}


def test_rerun_after_a_crash_between_commit_and_tag_only_adds_the_tag(hub, folder):
    from huggingface_hub.errors import HfHubHTTPError

    hub.fail_next_tag(500)
    with pytest.raises(HfHubHTTPError):
        publish(folder, REPO, backoff=0, retries=0)  # the "crash": the tag never made it
    assert hub.tags(REPO) == {} and len([c for c in hub.commits(REPO) if c["title"] == "Release v0.1.0"]) == 1
    result = publish(folder, REPO, backoff=0)
    assert result.resumed and result.uploaded == 0
    release = [c for c in hub.commits(REPO) if c["title"] == "Release v0.1.0"]
    assert len(release) == 1 and hub.tags(REPO) == {"v0.1.0": release[0]["id"]}


def test_next_version_is_one_more_commit_and_old_tags_stay(hub, folder, tmp_path):
    from builder.dev.fixture import write_fixture

    v1 = publish(folder, REPO, backoff=0)
    v1_files = set(_files(folder))
    write_fixture(folder, rows_per_domain=12, eval_rows=10, seed=0, progress=False, overwrite=True)
    r = bump(folder, "minor")
    assert r.previous_version == "0.1.0" and r.removed > 0  # the publish recorded v0.1.0's row ids
    v2 = publish(folder, REPO, backoff=0)
    gone = v1_files - set(_files(folder))  # shards of splits that lost every row
    assert v2.tag == "v0.2.0" and v2.deleted == len(gone) and 0 < v2.uploaded < v2.files
    assert hub.tags(REPO) == {"v0.1.0": v1.commit, "v0.2.0": v2.commit}
    assert [c["title"] for c in hub.commits(REPO)][:2] == ["Release v0.2.0", "Release v0.1.0"]
    old = pull(REPO, tmp_path / "old", revision="v0.1.0")
    assert old.version == "0.1.0" and not (tmp_path / "old" / "CHANGELOG.md").exists()
    new = pull(REPO, tmp_path / "new", revision="v0.2.0")
    assert new.version == "0.2.0" and "## 0.2.0" in (tmp_path / "new" / "CHANGELOG.md").read_text()


def test_an_invalid_folder_is_refused_before_any_write(hub, folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    first = sorted(manifest["files"])[0]
    manifest["files"][first]["rows"] += 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PublishRefused, match="validation failed"):
        publish(folder, REPO, backoff=0)
    assert _writes(hub) == []


def test_no_token_is_a_usage_error(hub, folder, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(DataError, match="no Hugging Face token"):
        publish(folder, REPO, backoff=0)
    assert _writes(hub) == []


def test_pull_refuses_files_that_do_not_match_the_manifest(folder, tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    shard = next((bad / "data" / "malicious_use").glob("train-*"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with HubServer({"org/bad": {"main": bad}}) as server:
        hub_env(monkeypatch, server, tmp_path / "hf_home")
        with pytest.raises(VerifyFailed, match="sha256 differs"):
            pull("org/bad", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(VerifyFailed, match="sha256 differs"):
        verify_manifest(bad)


def test_cli_publish_and_pull_never_show_or_write_the_token(hub, folder, tmp_path):
    env = {**os.environ, "HF_TOKEN": TOKEN}
    dry = subprocess.run([SPA_VL, "publish", str(folder), REPO, "--dry_run"], capture_output=True, text=True, env=env, timeout=300)
    assert dry.returncode == 0, dry.stderr
    proc = subprocess.run([SPA_VL, "publish", str(folder), REPO], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"published {REPO} v0.1.0: ")
    again = subprocess.run([SPA_VL, "publish", str(folder), REPO], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 1 and "refused" in again.stderr
    got = subprocess.run([SPA_VL, "pull", REPO, str(tmp_path / "copy"), "--revision", "v0.1.0"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert got.returncode == 0 and "manifest checksums verified" in got.stdout
    noauth = {k: v for k, v in env.items() if k != "HF_TOKEN"}
    none = subprocess.run([SPA_VL, "publish", str(folder), "org/other"], capture_output=True, text=True, env=noauth, timeout=300)
    assert none.returncode == 2 and "no Hugging Face token" in none.stderr

    for p in (dry, proc, again, got, none):
        assert TOKEN not in p.stdout + p.stderr
    for root in (folder, tmp_path / "copy"):
        for f in root.rglob("*"):
            if f.is_file():
                assert TOKEN.encode() not in f.read_bytes(), f


def test_a_landed_commit_with_deletions_is_detected_not_retried(hub, folder):
    # Deleting files cannot be replayed by the client as a no-op: only comparing main with the folder
    # after the error keeps the retry from failing or committing twice.
    from builder.dev.fixture import write_fixture

    publish(folder, REPO, backoff=0)
    v1_files = set(_files(folder))
    write_fixture(folder, rows_per_domain=3, eval_rows=10, seed=0, progress=False, overwrite=True)  # no validation rows
    bump(folder, "minor")
    assert v1_files - set(_files(folder))  # some shards are gone: the commit deletes them
    hub.fail_after_next_commit(500)
    result = publish(folder, REPO, backoff=0)
    assert [c["title"] for c in hub.commits(REPO)][:2] == ["Release v0.2.0", "Release v0.1.0"]
    posts = [r.status for r in hub.log if r.method == "POST" and "/commit/" in r.path]
    assert posts == [200, 500]  # v0.1.0, then v0.2.0 applied behind a 500; no third commit request
    assert hub.tags(REPO)["v0.2.0"] == result.commit == hub.commits(REPO)[0]["id"]


def test_transient_errors_reading_the_repo_are_retried(hub, folder):
    hub.fail_next("list_refs", 503, times=2)
    hub.fail_next("tree", 502)
    publish(folder, REPO, backoff=0)
    assert list(hub.tags(REPO)) == ["v0.1.0"]


def test_an_existing_repos_visibility_and_gating_are_left_alone(hub, folder, capsys):
    from builder.dev.fixture import write_fixture

    publish(folder, REPO, private=False, gated=False, backoff=0)
    assert hub.repo_settings(REPO) == {"private": False, "gated": False}
    write_fixture(folder, rows_per_domain=36, eval_rows=10, seed=0, progress=False, overwrite=True)
    bump(folder, "patch")
    publish(folder, REPO, backoff=0)  # defaults say private + gated: an existing repo keeps its settings
    assert hub.repo_settings(REPO) == {"private": False, "gated": False}
    assert "is not gated and already has published versions" in capsys.readouterr().err


def test_a_crash_between_creating_and_gating_is_gated_by_the_rerun(hub, folder):
    from huggingface_hub.errors import HfHubHTTPError

    hub.fail_next("update_settings", 500)
    with pytest.raises(HfHubHTTPError):
        publish(folder, REPO, backoff=0, retries=0)
    assert hub.repo_settings(REPO) == {"private": True, "gated": False} and hub.tags(REPO) == {}
    publish(folder, REPO, backoff=0)
    assert hub.repo_settings(REPO) == {"private": True, "gated": "auto"} and list(hub.tags(REPO)) == ["v0.1.0"]


def test_dry_run_says_when_the_real_publish_would_refuse(hub, folder, capsys):
    publish(folder, REPO, backoff=0)
    capsys.readouterr()
    plan = publish(folder, REPO, dry_run=True, backoff=0)
    assert plan.refusal and "already has tag v0.1.0" in plan.refusal
    assert "publish would refuse" in capsys.readouterr().err
    assert list(hub.tags(REPO)) == ["v0.1.0"]


def test_an_older_version_than_the_published_ones_is_refused(hub, folder, tmp_path):
    older = tmp_path / "older"
    shutil.copytree(folder, older)
    bump(folder, "major")
    publish(folder, REPO, backoff=0)  # v1.0.0
    n = len(hub.commits(REPO))
    with pytest.raises(PublishRefused, match="already has v1.0.0, later than v0.1.0"):
        publish(older, REPO, backoff=0)
    assert len(hub.commits(REPO)) == n


def test_pull_starts_afresh_over_a_partial_folder_of_another_pull(hub, folder, tmp_path):
    publish(folder, REPO, backoff=0)
    partial = tmp_path / ".out.partial"
    (partial / "data" / "malicious_use").mkdir(parents=True)
    (partial / "data" / "malicious_use" / "train-00001-of-00002.parquet").write_bytes(b"stale")
    (partial / ".spa_vl_pull.json").write_text(json.dumps({"repo_id": "org/other", "revision": None}))
    pull(REPO, tmp_path / "out", revision="v0.1.0")
    assert _files(tmp_path / "out") == _files(folder)
    assert not partial.exists()


# --- the command line refuses before it acts ------------------------------------------------------------
def _cli(*args, env_extra=None):
    env = {**os.environ, "HF_TOKEN": TOKEN, **(env_extra or {})}
    return subprocess.run([SPA_VL, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("typo, nearest", [
    (["--dryrun"], "--dry_run"),
    (["--dry_rn"], "--dry_run"),
    (["--no-privat", "--no-gated"], "--no-private"),
    (["--no-private", "--nogatd"], "--no-gated"),
    (["--no-private", "--no_gate"], "--no-gated"),
    (["--retry", "3"], "--retries"),
])
def test_a_mistyped_publish_flag_publishes_nothing(hub, folder, typo, nearest):
    before = _files(folder)
    proc = _cli("publish", folder, REPO, *typo)
    assert proc.returncode == 2 and f"did you mean {nearest}?" in proc.stderr, proc.stderr
    assert hub.requests == [] and _files(folder) == before  # not one call to the Hub, not one byte written
    assert not (folder / ".spa_vl").exists()  # no row ids recorded either


def test_no_private_and_no_gated_are_honoured(hub, folder):
    proc = _cli("publish", folder, REPO, "--no-private", "--no-gated")
    assert proc.returncode == 0, proc.stderr
    assert hub.repo_settings(REPO) == {"private": False, "gated": False}


def test_a_mistyped_version_flag_bumps_nothing(folder):
    before = _files(folder)
    proc = _cli("version", folder, "--bunp", "minor")
    assert proc.returncode == 2 and "did you mean --bump?" in proc.stderr
    assert _files(folder) == before and not (folder / "CHANGELOG.md").exists()
    assert json.loads((folder / "manifest.json").read_text())["version"] == "0.1.0"
    proc = _cli("version", folder, "--bump", "minr")
    assert proc.returncode == 2 and "did you mean minor?" in proc.stderr and _files(folder) == before


# --- an unreachable Hub -------------------------------------------------------------------------------
def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def test_pull_with_the_hub_unreachable_says_so_and_writes_nothing(tmp_path, monkeypatch):
    hub_env(monkeypatch, f"http://127.0.0.1:{_closed_port()}", tmp_path / "hf_home")
    proc = _cli("pull", REPO, tmp_path / "copy", "--revision", "v0.1.0")
    assert proc.returncode == 1, proc.stderr
    assert "could not be reached" in proc.stderr and "manifest.json" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_home"]  # no copy, no .copy.partial


def test_publish_dry_run_exits_1_when_it_could_not_read_the_hub(folder, tmp_path, monkeypatch):
    hub_env(monkeypatch, f"http://127.0.0.1:{_closed_port()}", tmp_path / "hf_home")
    proc = _cli("publish", folder, REPO, "--dry_run", "--retries", 0)
    assert proc.returncode == 1 and "the Hub could not be read" in proc.stderr


def test_pull_never_overwrites_a_folder_spa_vl_did_not_write(hub, folder, tmp_path):
    publish(folder, REPO, backoff=0)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    hub.requests.clear()
    proc = _cli("pull", REPO, mine, "--overwrite")
    assert proc.returncode == 2 and "--overwrite replaces only" in proc.stderr
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"] and hub.requests == []
    copy = tmp_path / "copy"
    pull(REPO, copy)
    assert pull(REPO, copy, overwrite=True).files == len(_files(copy))  # a pulled folder is ours to replace


def test_a_pull_in_progress_is_not_disturbed(hub, folder, tmp_path):
    publish(folder, REPO, backoff=0)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        partial = tmp_path / ".copy.partial"
        partial.mkdir()
        (partial / ".spa_vl_pull.json").write_text(json.dumps({"repo_id": "org/other", "revision": None,
                                                               "pid": other.pid}))
        with pytest.raises(DataError, match=f"another pull \\(pid {other.pid}\\)"):
            pull(REPO, tmp_path / "copy")
        assert (partial / ".spa_vl_pull.json").exists()
    finally:
        other.kill()
        other.wait()
    pull(REPO, tmp_path / "copy")  # its process is gone: the partial folder is swept
    assert not partial.exists() and _files(tmp_path / "copy") == _files(folder)


# --- a folder carries its taxonomy ------------------------------------------------------------------
def test_a_folder_with_its_own_taxonomy_validates_publishes_and_loads_without_flags(hub, tmp_path):
    from custom_taxonomy import custom_folder

    import spa_vl

    root = custom_folder(tmp_path / "custom", eval_rows=4)
    assert _cli("validate", root, "--no-progress").returncode == 0
    assert _cli("card", root).returncode == 0
    assert _cli("version", root, "--bump", "minor").returncode == 0
    proc = _cli("publish", root, REPO)
    assert proc.returncode == 0, proc.stderr
    published = hub.folder(REPO, "v0.2.0")
    assert (published / "taxonomy.yaml").read_bytes() == (root / "taxonomy.yaml").read_bytes()
    assert "Heist Harms" in (published / "README.md").read_text()  # the card shows the folder's own labels
    copy = tmp_path / "copy"
    pull(REPO, copy, revision="v0.2.0")
    assert (copy / "taxonomy.yaml").read_bytes() == (root / "taxonomy.yaml").read_bytes()
    ds = spa_vl.load("heists", "train", source=REPO, revision="v0.2.0", cache_dir=str(tmp_path / "ds"))
    assert set(ds["class1"]) == {"Heist Harms"}


def test_pull_checks_the_taxonomy_file_against_the_manifest(folder, tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "taxonomy.yaml").write_text((bad / "taxonomy.yaml").read_text() + "\n# edited\n")
    with HubServer({"org/bad": {"main": bad}}) as server:
        hub_env(monkeypatch, server, tmp_path / "hf_home")
        with pytest.raises(VerifyFailed, match="taxonomy.yaml: field taxonomy.sha256"):
            pull("org/bad", tmp_path / "out")
    assert not (tmp_path / "out").exists()
