"""The loopback Hub server, driven by the real huggingface_hub and datasets clients over HTTP."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hub_server import HubServer, hub_env

REPO = "org/SPA-VL"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two revisions of a dataset folder: v0.1.0 (a small fixture) and main (the same plus a file)."""
    from builder.fixture import write_fixture

    root = tmp_path_factory.mktemp("hub")
    v1 = root / "v0.1.0"
    # 4 images per domain: malicious_use has rows in both train and validation
    summary = write_fixture(v1, rows_per_domain=12, eval_rows=2, progress=False)
    main = root / "main"
    shutil.copytree(v1, main)
    (main / "CHANGELOG.md").write_text("# Changelog\n\n## 0.1.1\n- added a changelog\n")
    return {"main": main, "v0.1.0": v1, "summary": summary}


@pytest.fixture
def hub(folders, tmp_path, monkeypatch):
    with HubServer({REPO: {"main": folders["main"], "v0.1.0": folders["v0.1.0"]}}) as server:
        hub_env(monkeypatch, server, tmp_path / "hf_home")
        yield server


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_snapshot_download_at_a_tag_gets_that_revision(hub, folders):
    from huggingface_hub import snapshot_download

    path = Path(snapshot_download(REPO, repo_type="dataset", revision="v0.1.0"))
    assert _files(path) == _files(folders["v0.1.0"])  # no CHANGELOG.md: that is on main only
    assert path.name == hub.commit(REPO, "v0.1.0") != hub.commit(REPO, "main")
    assert ("GET", f"/api/datasets/{REPO}/revision/v0.1.0") in hub.requests

    main = Path(snapshot_download(REPO, repo_type="dataset"))
    assert (main / "CHANGELOG.md").exists() and main.name == hub.commit(REPO)


def test_snapshot_download_with_allow_patterns_fetches_only_matches(hub):
    from huggingface_hub import snapshot_download

    path = Path(snapshot_download(REPO, repo_type="dataset", revision="v0.1.0", allow_patterns=["data/test/*"]))
    assert sorted(_files(path)) == ["data/test/harm-00000-of-00001.parquet", "data/test/help-00000-of-00001.parquet"]
    fetched = {p for m, p in hub.requests if m == "GET" and "/resolve/" in p}
    assert all("/data/test/" in p for p in fetched) and len(fetched) == 2


def test_load_dataset_domain_config_at_a_tag(hub, folders, tmp_path):
    from datasets import load_dataset

    ds = load_dataset(REPO, "malicious_use", revision="v0.1.0", cache_dir=str(tmp_path / "ds"))
    expected = folders["summary"].config_rows["malicious_use"]
    assert {s: ds[s].num_rows for s in ds} == expected and sum(expected.values()) > 0
    for split in ds:
        assert set(ds[split]["class1"]) == {"Malicious Use"}
    test = load_dataset(REPO, "test", revision="v0.1.0", cache_dir=str(tmp_path / "ds"))
    assert {s: test[s].num_rows for s in test} == {"harm": 2, "help": 2}


def test_tree_and_paths_info_list_what_the_folder_holds(hub, folders):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile, RepoFolder

    api = HfApi()
    top = {e.path: type(e) for e in api.list_repo_tree(REPO, repo_type="dataset", revision="v0.1.0")}
    assert top == {"README.md": RepoFile, "manifest.json": RepoFile, "data": RepoFolder}
    nested = [e.path for e in api.list_repo_tree(REPO, "data/test", repo_type="dataset", recursive=True)]
    assert nested == ["data/test/harm-00000-of-00001.parquet", "data/test/help-00000-of-00001.parquet"]

    infos = api.get_paths_info(REPO, ["README.md", "data", "nope.txt"], repo_type="dataset", revision="v0.1.0")
    readme, data = infos
    assert [readme.path, data.path] == ["README.md", "data"] and isinstance(data, RepoFolder)
    assert readme.size == (folders["v0.1.0"] / "README.md").stat().st_size and readme.lfs is None
    parquet = api.get_paths_info(REPO, "data/test/harm-00000-of-00001.parquet", repo_type="dataset")[0]
    assert parquet.lfs is not None and len(parquet.lfs.sha256) == 64  # binary files are LFS, as on the Hub


def test_range_reads_through_hf_file_system(hub, folders):
    from huggingface_hub import HfFileSystem

    want = (folders["v0.1.0"] / "data/test/harm-00000-of-00001.parquet").read_bytes()
    with HfFileSystem().open(f"datasets/{REPO}@v0.1.0/data/test/harm-00000-of-00001.parquet", "rb",
                             block_size=64) as f:
        f.seek(len(want) - 100)
        assert f.read(100) == want[-100:]
    assert f.size == len(want)


def test_missing_repo_revision_and_file_raise_the_client_errors(hub):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    with pytest.raises(RepositoryNotFoundError):
        HfApi().dataset_info("org/absent")
    with pytest.raises(RevisionNotFoundError):
        HfApi().dataset_info(REPO, revision="v9.9.9")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "absent.txt", repo_type="dataset")
    with pytest.raises(EntryNotFoundError):
        list(HfApi().list_repo_tree(REPO, "absent", repo_type="dataset"))


def test_resolve_headers_and_ranges_over_plain_http(hub, folders):
    import httpx2

    url = f"{hub.endpoint}/datasets/{REPO}/resolve/v0.1.0/README.md"
    body = (folders["v0.1.0"] / "README.md").read_bytes()
    head = httpx2.head(url)
    assert head.status_code == 200 and head.headers["X-Repo-Commit"] == hub.commit(REPO, "v0.1.0")
    assert head.headers["Content-Length"] == str(len(body)) and head.headers["ETag"].startswith('"')
    part = httpx2.get(url, headers={"Range": "bytes=4-9"})
    assert part.status_code == 206 and part.content == body[4:10]
    assert part.headers["Content-Range"] == f"bytes 4-9/{len(body)}"
    assert httpx2.get(url, headers={"Range": f"bytes={len(body)}-"}).status_code == 416
