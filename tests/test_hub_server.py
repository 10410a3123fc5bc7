"""The loopback Hub server, driven by the real huggingface_hub and datasets clients over HTTP."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from hub_server import HubServer, hub_env

REPO = "org/SPA-VL"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two revisions of a dataset folder: v0.1.0 (a small fixture) and main (the same plus a file)."""
    from builder.dev.fixture import write_fixture

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
    assert top == {p.name: RepoFolder if p.is_dir() else RepoFile for p in folders["v0.1.0"].iterdir()}
    assert {"README.md": RepoFile, "manifest.json": RepoFile, "data": RepoFolder}.items() <= top.items()
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


# --- the write side, driven by HfApi ------------------------------------------------------------------
NEW = "org/published"
TOKEN = "hf_loopback_test_token"  # made up; hub_env removes any real token from the environment


@pytest.fixture
def writable(tmp_path, monkeypatch):
    """A server with no repos that accepts only TOKEN; the clients point at it and send TOKEN."""
    with HubServer({}, token=TOKEN) as server:
        hub_env(monkeypatch, server, tmp_path / "hf_home")
        monkeypatch.setenv("HF_TOKEN", TOKEN)  # after hub_env, which removes HF_TOKEN
        yield server


def _additions(folder: Path, prefix: str = "") -> list:
    from huggingface_hub import CommitOperationAdd

    return [CommitOperationAdd(prefix + p.relative_to(folder).as_posix(), p)
            for p in sorted(folder.rglob("*")) if p.is_file()]


def _add(path: str, data: bytes):
    from huggingface_hub import CommitOperationAdd

    return CommitOperationAdd(path, data)


def _new_repo(api) -> str:
    """Create NEW and return the sha of its first commit."""
    api.create_repo(NEW, repo_type="dataset", exist_ok=True)
    return api.dataset_info(NEW).sha


def _is_text(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_create_repo_makes_a_first_commit_and_exist_ok_accepts_a_second_call(writable):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    url = api.create_repo(NEW, repo_type="dataset", private=False, exist_ok=True)
    assert (url.repo_id, url.repo_type) == (NEW, "dataset")
    assert api.create_repo(NEW, repo_type="dataset", exist_ok=True).repo_id == NEW  # a 409 that exist_ok accepts
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(NEW, repo_type="dataset")
    assert err.value.response.status_code == 409 and "already created" in str(err.value)
    assert [r.status for r in writable.log if r.path == "/api/repos/create"] == [200, 409, 409]

    info = api.dataset_info(NEW)
    assert [s.rfilename for s in info.siblings] == [".gitattributes"] and info.private is False
    [first] = api.list_repo_commits(NEW, repo_type="dataset")
    assert (first.commit_id, first.title, first.authors) == (info.sha, "initial commit", ["system"])
    assert writable.commits(NEW) == [{"id": info.sha, "title": "initial commit", "message": "", "parent": None}]


def test_update_repo_settings_shows_in_repo_info_and_a_private_repo_hides(writable):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    api = HfApi()
    _new_repo(api)
    api.update_repo_settings(NEW, repo_type="dataset", gated="auto", private=True)
    info = api.dataset_info(NEW)
    assert (info.private, info.gated) == (True, "auto")
    assert writable.repo_settings(NEW) == {"private": True, "gated": "auto"}
    with pytest.raises(RepositoryNotFoundError):  # as on the Hub, a private repo is invisible without a token
        api.dataset_info(NEW, token=False)
    api.update_repo_settings(NEW, repo_type="dataset", gated=False, private=False)
    info = api.dataset_info(NEW, token=False)
    assert (info.private, info.gated) == (False, False)


def test_commit_and_tag_then_download_and_load_the_tag(writable, folders, tmp_path):
    from datasets import load_dataset
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi()
    first = _new_repo(api)
    source = folders["v0.1.0"]
    sha = api.create_commit(NEW, _additions(source), commit_message="Release v0.1.0", commit_description="notes",
                            repo_type="dataset", parent_commit=first).oid
    assert writable.commits(NEW)[0] == {"id": sha, "title": "Release v0.1.0", "message": "notes", "parent": first}

    # Text files went inline in the commit; binary ones took the LFS path (batch, one PUT each), never Xet.
    binary = {path for path, data in _files(source).items() if not _is_text(data)}
    assert ("POST", f"/datasets/{NEW}.git/info/lfs/objects/batch") in writable.requests
    puts = [p for m, p in writable.requests if m == "PUT"]
    assert len(puts) == len(binary) == writable.uploads and any(p.endswith(".parquet") for p in binary)
    assert not [p for _, p in writable.requests if "xet" in p]
    tree = api.list_repo_tree(NEW, repo_type="dataset", revision=sha, recursive=True)
    assert {e.path for e in tree if getattr(e, "lfs", None)} == binary

    api.create_tag(NEW, tag="v0.1.0", revision=sha, repo_type="dataset")
    refs = api.list_repo_refs(NEW, repo_type="dataset")
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v0.1.0", "refs/tags/v0.1.0", sha)]
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", sha)]

    path = Path(snapshot_download(NEW, repo_type="dataset", revision="v0.1.0"))
    assert path.name == sha
    assert _files(path) == {".gitattributes": (writable.folder(NEW, first) / ".gitattributes").read_bytes(),
                            **_files(source)}

    assert api.dataset_info(NEW, revision="v0.1.0").sha == sha  # what datasets resolves the tag with
    ds = load_dataset(NEW, "malicious_use", revision="v0.1.0", cache_dir=str(tmp_path / "ds"))
    assert {s: ds[s].num_rows for s in ds} == folders["summary"].config_rows["malicious_use"]
    # datasets pinned the tag to the commit repo info reported, and read the files at that commit
    data_reads = [p for m, p in writable.requests if m == "GET" and "/resolve/" in p and "/data/" in p]
    assert data_reads and all(f"/resolve/{sha}/" in p for p in data_reads)


def test_a_second_commit_deletes_adds_and_leaves_the_tag_where_it_was(writable, folders):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi()
    _new_repo(api)
    source = folders["v0.1.0"]
    release = api.create_commit(NEW, _additions(source), commit_message="v0.1.0", repo_type="dataset").oid
    api.create_tag(NEW, tag="v0.1.0", revision=release, repo_type="dataset")
    uploads, parquet = writable.uploads, "data/test/harm-00000-of-00001.parquet"
    doomed = min(p.rsplit("/", 1)[0] for p in _files(source) if p.startswith("data/") and "/test/" not in p)
    ops = [
        CommitOperationDelete("manifest.json"),
        CommitOperationAdd("CHANGELOG.md", b"# Changelog\n"),
        CommitOperationAdd(parquet, source / parquet),  # unchanged: preupload's oid lets the client drop it
        CommitOperationAdd("extra/copy.parquet", source / parquet),  # bytes the repo holds: the batch asks no PUT
        CommitOperationDelete(f"{doomed}/"),
    ]
    second = api.create_commit(NEW, ops, commit_message="v0.1.1", repo_type="dataset", parent_commit=release).oid
    assert writable.uploads == uploads and [c["parent"] for c in writable.commits(NEW)[:1]] == [release]

    def paths(revision):
        return {e.path for e in api.list_repo_tree(NEW, repo_type="dataset", revision=revision, recursive=True)
                if isinstance(e, RepoFile)}

    now, then = paths(second), paths("v0.1.0")
    assert now == (then - {"manifest.json"} - {p for p in then if p.startswith(f"{doomed}/")}
                   | {"CHANGELOG.md", "extra/copy.parquet"})
    assert "manifest.json" in then and writable.tags(NEW) == {"v0.1.0": release}
    assert (writable.folder(NEW, second) / "extra/copy.parquet").read_bytes() == (source / parquet).read_bytes()


def test_upload_folder_is_one_commit_over_lfs(writable, folders):
    from huggingface_hub import HfApi

    api = HfApi()
    first = _new_repo(api)
    info = api.upload_folder(folder_path=folders["v0.1.0"], repo_id=NEW, repo_type="dataset",
                             commit_message="upload", parent_commit=first)
    assert [c["id"] for c in writable.commits(NEW)] == [info.oid, first]  # with Xet on, it may split into several
    assert writable.uploads > 0 and ("POST", f"/datasets/{NEW}.git/info/lfs/objects/batch") in writable.requests


def test_a_parent_commit_that_is_not_the_head_gets_412(writable):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    first = _new_repo(api)
    api.create_commit(NEW, [_add("a.txt", b"a\n")], commit_message="a", repo_type="dataset", parent_commit=first[:7])
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(NEW, [_add("b.txt", b"b\n")], commit_message="b", repo_type="dataset", parent_commit=first)
    assert err.value.response.status_code == 412 and "A commit has happened since" in str(err.value)
    assert [c["title"] for c in writable.commits(NEW)] == ["a", "initial commit"]


def test_an_existing_tag_gets_409_and_never_moves(writable):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    api = HfApi()
    first = _new_repo(api)
    api.create_tag(NEW, tag="v1", repo_type="dataset")  # on main
    second = api.create_commit(NEW, [_add("a.txt", b"a\n")], commit_message="a", repo_type="dataset").oid
    with pytest.raises(HfHubHTTPError) as err:
        api.create_tag(NEW, tag="v1", revision=second, repo_type="dataset")
    assert err.value.response.status_code == 409
    api.create_tag(NEW, tag="v1", revision=second, repo_type="dataset", exist_ok=True)  # accepted, not moved
    refs = api.list_repo_refs(NEW, repo_type="dataset")
    assert writable.tags(NEW) == {"v1": first} == {t.name: t.target_commit for t in refs.tags}
    with pytest.raises(RevisionNotFoundError):
        api.create_tag(NEW, tag="v2", revision="no-such-branch", repo_type="dataset")
    api.delete_tag(NEW, tag="v1", repo_type="dataset")
    assert writable.tags(NEW) == {}


def test_commit_history_is_paged_and_the_client_reads_every_page(writable):
    from huggingface_hub import HfApi

    api = HfApi()
    _new_repo(api)
    writable.commits_per_page = 2
    shas = [api.create_commit(NEW, [_add(f"{i}.txt", b"%d\n" % i)], commit_message=f"c{i}", repo_type="dataset").oid
            for i in range(4)]
    titles = [c.title for c in api.list_repo_commits(NEW, repo_type="dataset")]
    assert titles == ["c3", "c2", "c1", "c0", "initial commit"]
    assert len([r for r in writable.log if r.path == f"/api/datasets/{NEW}/commits/main"]) == 3
    assert [c.commit_id for c in api.list_repo_commits(NEW, repo_type="dataset", revision=shas[1])][:2] == shas[1::-1]


def test_fail_next_commit_applies_nothing_and_fires_once(writable):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    head = _new_repo(api)
    writable.fail_next_commit(503)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(NEW, [_add("a.txt", b"a\n")], commit_message="a", repo_type="dataset")
    assert err.value.response.status_code == 503 and writable.commit(NEW) == head
    # create_commit sends the commit once: no retry, even on a 5xx (preupload and LFS calls do retry)
    assert len([r for r in writable.log if r.path == f"/api/datasets/{NEW}/commit/main"]) == 1
    sha = api.create_commit(NEW, [_add("a.txt", b"a\n")], commit_message="a", repo_type="dataset",
                            parent_commit=head).oid
    assert writable.commits(NEW)[0] == {"id": sha, "title": "a", "message": "", "parent": head}


def test_fail_after_next_commit_leaves_the_commit_applied(writable):
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    head = _new_repo(api)
    writable.fail_after_next_commit()
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(NEW, [_add("a.txt", b"a\n")], commit_message="a", repo_type="dataset", parent_commit=head)
    assert err.value.response.status_code == 500
    # The commit landed: a publisher must look (history, refs) before it commits again.
    landed = writable.commit(NEW)
    assert [(c.title, c.commit_id) for c in api.list_repo_commits(NEW, repo_type="dataset")][0] == ("a", landed)
    # Sending the same files again is no commit at all: preupload reports each file's oid, the client drops
    # unchanged files and, with nothing left, returns the head without a request (parent_commit unchecked).
    again = api.create_commit(NEW, [_add("a.txt", b"a\n")], commit_message="a", repo_type="dataset", parent_commit=head)
    assert again.oid == landed and len(writable.commits(NEW)) == 2
    # Different files on the old parent are refused; without parent_commit they would land on top.
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(NEW, [_add("a.txt", b"A\n")], commit_message="a", repo_type="dataset", parent_commit=head)
    assert err.value.response.status_code == 412

    writable.fail_after_next_commit(status=None)  # the connection drops instead of a 500
    with pytest.raises(httpx2.RemoteProtocolError):  # the transport's error, not an HfHubHTTPError
        api.create_commit(NEW, [_add("b.txt", b"b\n")], commit_message="b", repo_type="dataset")
    assert [c["title"] for c in writable.commits(NEW)] == ["b", "a", "initial commit"]
    api.create_commit(NEW, [_add("c.txt", b"c\n")], commit_message="c", repo_type="dataset")  # fired once
    assert writable.commits(NEW)[0]["title"] == "c"


def test_a_dropped_upload_is_sent_again_by_the_client(writable):
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi()
    _new_repo(api)
    data = bytes(range(256)) * 256  # binary: an LFS upload
    writable.drop_next_upload()
    # huggingface_hub sends the LFS PUT through http_backoff, which retries a dropped connection itself
    # (after 1 s, up to 5 times): the second PUT stores the object and create_commit succeeds.
    sha = api.create_commit(NEW, [_add("blob.bin", data)], commit_message="blob", repo_type="dataset").oid
    puts = [r for r in writable.log if r.method == "PUT"]
    assert [r.status for r in puts] == [None, 200] and puts[0].path == puts[1].path and writable.uploads == 1
    assert Path(hf_hub_download(NEW, "blob.bin", repo_type="dataset", revision=sha)).read_bytes() == data


def test_fail_next_tag_creates_nothing_and_fires_once(writable):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    head = _new_repo(api)
    writable.fail_next_tag()
    with pytest.raises(HfHubHTTPError) as err:
        api.create_tag(NEW, tag="v1", repo_type="dataset")
    assert err.value.response.status_code == 500 and writable.tags(NEW) == {}  # create_tag does not retry
    api.create_tag(NEW, tag="v1", repo_type="dataset")
    assert writable.tags(NEW) == {"v1": head}


def test_writes_need_the_token_and_it_is_never_kept(writable, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    head = _new_repo(api)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("org/other", repo_type="dataset")
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(NEW, [_add("a.txt", b"a\n")], commit_message="a", repo_type="dataset")
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        api.create_tag(NEW, tag="v1", repo_type="dataset", token="hf_some_other_token")
    assert err.value.response.status_code == 403
    assert api.dataset_info(NEW).sha == head and writable.tags(NEW) == {}  # reading a public repo needs none
    assert [r.auth for r in writable.log if r.path == "/api/repos/create"] == [True, False]
    assert TOKEN not in repr(writable.log) + repr(writable.requests)


def test_commit_refuses_unknown_lfs_objects_missing_files_and_tags(writable):
    import json

    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import EntryNotFoundError

    api = HfApi()
    head = _new_repo(api)
    api.create_tag(NEW, tag="v0", repo_type="dataset")
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def commit(revision: str, *operations: dict) -> httpx2.Response:
        lines = [{"key": "header", "value": {"summary": "raw"}}, *operations]
        return httpx2.post(f"{writable.endpoint}/api/datasets/{NEW}/commit/{revision}", headers=auth,
                           content="".join(json.dumps(line) + "\n" for line in lines))

    never = commit("main", {"key": "lfsFile", "value": {"path": "x.parquet", "algo": "sha256", "oid": "0" * 64}})
    assert never.status_code == 400 and "LFS pointer" in never.json()["error"]
    to_tag = commit("v0", {"key": "file", "value": {"path": "a.txt", "content": "YQo=", "encoding": "base64"}})
    assert to_tag.status_code == 400 and "not a branch" in to_tag.json()["error"]
    assert commit("main", {"key": "file", "value": {"path": "../a.txt", "content": "YQo="}}).status_code == 400
    with pytest.raises(EntryNotFoundError):
        api.delete_file("absent.txt", NEW, repo_type="dataset")
    assert writable.commit(NEW) == head

    # An upload needs an announcement from the batch endpoint, and must hash to the announced oid and size.
    objects = f"{writable.endpoint}/datasets/{NEW}.git/info/lfs/objects"
    oid = hashlib.sha256(b"abc").hexdigest()
    assert httpx2.put(f"{objects}/{oid}", content=b"abc").status_code == 403
    batch = httpx2.post(f"{objects}/batch", headers=auth,
                        json={"operation": "upload", "objects": [{"oid": oid, "size": 3}]}).json()
    href = batch["objects"][0]["actions"]["upload"]["href"]
    assert httpx2.put(href, content=b"abd").status_code == 400 and writable.uploads == 0
    assert httpx2.put(href, content=b"abc").status_code == 200 and writable.uploads == 1
