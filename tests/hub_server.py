"""A loopback Hub-API server for tests: dataset repos served and published over real HTTP.

The real ``huggingface_hub`` client (which sends HTTP through ``httpx2``) and ``datasets.load_dataset``
talk to it exactly as they talk to huggingface.co; nothing is mocked. Each repo has branches and tags
pointing at commits, and each commit's files lie in a folder. Repos given to the constructor map
revision names to folders: ``main`` is the branch, every other name a tag. Such a revision's commit
sha is a hash of its folder's files, so two names that point at the same folder share a commit, as a
tag on ``main`` does::

    with HubServer({"org/SPA-VL": {"main": folder, "v0.1.0": folder}}) as hub:
        hub_env(monkeypatch, hub, tmp_path / "hf_home")
        path = snapshot_download("org/SPA-VL", repo_type="dataset", revision="v0.1.0")
        ds = load_dataset("org/SPA-VL", "malicious_use", revision="v0.1.0", cache_dir=tmp_path / "ds")
        hub.requests     # [("GET", "/api/datasets/org/SPA-VL/revision/v0.1.0"), ...]

Read side: repo info (``/api/datasets/{repo}[/revision/{rev}]``), tree listings
(``/api/datasets/{repo}/tree/{rev}[/{path}]``, ``recursive``, ``expand``), ``POST .../paths-info/{rev}``,
``HEAD``/``GET /datasets/{repo}/resolve/{rev}/{path}`` with single-range requests, refs
(``/api/datasets/{repo}/refs``) and commit history (``/api/datasets/{repo}/commits/{rev}``, paged with
``?p=`` and a ``Link: rel="next"`` header, ``commits_per_page`` to a page). Errors carry the
``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) that the client turns
into ``RepositoryNotFoundError``, ``RevisionNotFoundError`` and ``EntryNotFoundError``.

Write side, in the order ``HfApi`` uses it:

- ``POST /api/repos/create`` (``create_repo``): a new repo gets a first commit holding ``.gitattributes``,
  as on the Hub; an existing one answers 409 with the Hub's body (``error`` and ``url``), which
  ``exist_ok=True`` accepts. ``PUT /api/datasets/{repo}/settings`` stores ``private`` and ``gated``,
  which repo info reports. A private repo answers reads without a valid token with 401 ``RepoNotFound``.
- ``create_commit``: ``POST /api/validate-yaml`` (when a README.md is added), ``POST .../preupload/{branch}``
  (``uploadMode`` "lfs" for binary files and files of 10 MB or more, by the same rule the read side
  uses, and the ``oid`` of the file already at that path so the client can drop unchanged files), the
  LFS batch endpoint ``POST /datasets/{repo}.git/info/lfs/objects/batch`` (basic transfer; objects the
  repo already holds get no actions), ``PUT /datasets/{repo}.git/info/lfs/objects/{oid}`` (the upload,
  checked against the oid and size; like a pre-signed S3 URL it needs no token, only an earlier batch
  answer), ``POST .../objects/verify``, and the NDJSON ``POST /api/datasets/{repo}/commit/{branch}``
  (``header``, ``file``, ``lfsFile``, ``deletedFile``, ``deletedFolder``). A ``parentCommit`` that is not
  the branch head answers 412 with the Hub's "A commit has happened since" message. Each commit is
  materialised as a new folder under the server's storage (files of the parent hard-linked, or copied
  across file systems), so the read routes serve it; its sha hashes the parent, the message and the
  tree, so it is unique per commit.
- ``POST /api/datasets/{repo}/tag/{rev}`` (``create_tag``; 409 if the tag exists, and a tag never
  moves), ``DELETE .../tag/{tag}``, ``GET /api/whoami-v2``.

Write routes need ``Authorization: Bearer <token>`` (401 without, 403 if ``HubServer(token=...)`` was given
and the token differs). The token is only compared, never kept: ``hub.log`` records for each request
whether an Authorization header was sent. Fault switches (``fail_next_commit``, ``fail_after_next_commit``,
``drop_next_upload``, ``fail_next_tag``) each fire once; assertion helpers (``commits``, ``tags``,
``repo_settings``, ``folder``, ``uploads``) read the state under the same lock the handlers use.

Pointing the clients at the server (``hub_env``). ``huggingface_hub.constants`` and ``datasets.config``
read ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_OFFLINE`` and the cache paths once, at import; the
server's port is known only once it runs, long after pytest imported both libraries. So setting the
environment is not enough: ``hub_env`` sets it (for subprocesses such as the CLI) and also patches the
import-time copies with ``monkeypatch`` (undone after the test):

- ``huggingface_hub.constants``: ``ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_URL_HOSTS``,
  ``HF_HUB_OFFLINE``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN_PATH`` and every other path derived from
  ``HF_HOME`` (``HfApi()``, ``snapshot_download`` and ``HfFileSystem`` read these at call time, and
  ``HfFileSystem`` instances are cached per endpoint, so a new port gets a fresh one);
  ``HF_HUB_DISABLE_XET``: with the ``hf_xet`` package installed, ``huggingface_hub`` 2.x uploads through
  the Xet protocol (and ``upload_folder`` splits a folder into several commits); this server speaks
  plain LFS, so Xet is switched off (``HF_HUB_DISABLE_XET=1`` for subprocesses too);
- ``huggingface_hub.hf_api.api.endpoint``: the module-level ``HfApi`` behind ``huggingface_hub.dataset_info``
  and friends captured the endpoint when it was created;
- ``datasets.config``: ``HF_ENDPOINT``, ``HUB_DATASETS_URL``, ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``,
  the cache paths (``HF_DATASETS_CACHE`` and those under it), and two switches that would otherwise
  reach the internet: ``HF_UPDATE_DOWNLOAD_COUNTS`` (a HEAD to S3 on every load) and
  ``USE_PARQUET_EXPORT`` (the dataset viewer at ``datasets-server.<host>``).

``HF_TOKEN`` is removed for the test, so no real token is ever sent to the loopback server; a test that
writes sets a made-up one after ``hub_env`` (or passes ``token=`` to ``HfApi``).
"""

from __future__ import annotations

import base64
import codecs
import dataclasses
import datetime as _dt
import hashlib
import hmac
import html
import itertools
import json
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import yaml

LFS_MIN_TEXT_BYTES = 10 * 1024 * 1024  # the Hub stores text files above 10 MB in LFS, and every binary file
LFS_POINTER_SIZE = 134  # size of a git-lfs pointer file, as the Hub reports it
CHUNK = 1 << 20  # bytes per read or write when streaming a file body
USER = "loopback-user"  # the account every token belongs to: commit author, default namespace
SERVED_TITLE = "served by the loopback Hub"  # title of the commits made from the constructor's folders
INTERNAL_ERROR = "Internal Error - We're working hard to fix this as soon as possible!"
COMMIT_RACE = "A commit has happened since. Please refresh and try again."
# The start of the .gitattributes the Hub writes into a new repo.
GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.7z", "*.arrow", "*.bin", "*.gz", "*.h5", "*.parquet", "*.pt", "*.safetensors", "*.tar",
                    "*.zip", "*.zst", "*tfevents*", "*.jpg", "*.jpeg", "*.png", "*.webp", "*.mp3", "*.wav")
)
_OID = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")


# --- repository state ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RepoEntry:
    """One file of a revision, with the hashes the Hub reports for it."""

    path: str  # posix path inside the repo
    size: int
    blob_oid: str  # git blob sha1
    sha256: str
    lfs: bool

    @property
    def etag(self) -> str:
        # The Hub's ETag is the LFS sha256 for LFS files and the git blob id otherwise.
        return self.sha256 if self.lfs else self.blob_oid


@dataclass(frozen=True)
class Snapshot:
    """A revision's folder read once: its files by path, its commit sha and modification date."""

    folder: Path
    files: dict[str, RepoEntry]
    sha: str
    last_modified: str

    @classmethod
    def read(cls, repo_id: str, folder: Path, lfs: Mapping[str, bool] | None = None) -> "Snapshot":
        """Hash every file. ``lfs`` says how committed files were stored; unlisted files follow the rule."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{repo_id}: revision folder {folder} does not exist")
        files, mtime = {}, 0.0
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                rel = p.relative_to(folder).as_posix()
                files[rel] = _entry(rel, p, (lfs or {}).get(rel))
                mtime = max(mtime, p.stat().st_mtime)
        tree = "\n".join(f"{e.path} {e.blob_oid}" for e in files.values())
        sha = hashlib.sha1(f"{repo_id}\n{tree}".encode()).hexdigest()
        return cls(folder, files, sha, _timestamp(_dt.datetime.fromtimestamp(mtime, _dt.timezone.utc)))

    def directories(self) -> set[str]:
        return {"/".join(parts[:i]) for path in self.files for parts in [path.split("/")] for i in range(1, len(parts))}


def _timestamp(when: _dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _is_binary(data: bytes, final: bool, decoder=None) -> bool:
    """Not UTF-8 text. ``final=False`` for a prefix: a character cut at its end is not an error."""
    try:
        (decoder or codecs.getincrementaldecoder("utf-8")()).decode(data, final=final)
        return False
    except UnicodeDecodeError:
        return True


def _lfs_rule(binary: bool, size: int) -> bool:
    return binary or size >= LFS_MIN_TEXT_BYTES


def _entry(rel: str, path: Path, lfs: bool | None = None) -> RepoEntry:
    """Hash a file in blocks: git blob id (sha1 of a size header and the bytes), sha256, LFS or not."""
    size = path.stat().st_size
    sha1, sha256 = hashlib.sha1(b"blob %d\0" % size), hashlib.sha256()
    text = codecs.getincrementaldecoder("utf-8")()
    binary = False
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            sha1.update(block)
            sha256.update(block)
            binary = binary or _is_binary(block, False, text)
    binary = binary or _is_binary(b"", True, text)
    return RepoEntry(rel, size, sha1.hexdigest(), sha256.hexdigest(), _lfs_rule(binary, size) if lfs is None else lfs)


@dataclass(frozen=True)
class Commit:
    """A commit: the revision it made (``snapshot``, whose ``sha`` is this commit's), its parent, its message."""

    sha: str
    snapshot: Snapshot
    parent: str | None
    title: str
    message: str = ""
    author: str = USER
    date: str = ""

    def as_json(self, formatted: bool = False) -> dict:
        out = {"id": self.sha, "title": self.title, "message": self.message,
               "authors": [{"user": self.author}], "date": self.date}
        if formatted:
            out["formatted"] = {"title": html.escape(self.title), "message": html.escape(self.message)}
        return out


class HubRepo:
    """A dataset repo: branches and tags (name → commit sha), its commits, settings and LFS objects.

    Mutated only by ``HubServer`` under its lock; commits and snapshots are immutable once made.
    """

    def __init__(self, repo_id: str, revisions: dict[str, Path] | None = None):
        if revisions is not None and "main" not in revisions:
            raise ValueError(f"{repo_id}: a repo needs a 'main' revision (the Hub's default branch)")
        self.repo_id = repo_id
        self.private = False
        self.gated: bool | str = False  # False, "auto" or "manual", as the Hub reports it
        self.commits: dict[str, Commit] = {}
        self.branches: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.lfs_objects: dict[str, Path] = {}  # sha256 → a file holding those bytes
        for name, folder in (revisions or {}).items():
            snap = Snapshot.read(repo_id, folder)
            self.add(Commit(snap.sha, snap, None, SERVED_TITLE, date=snap.last_modified))
            (self.branches if name == "main" else self.tags)[name] = snap.sha

    def add(self, commit: Commit) -> None:
        self.commits.setdefault(commit.sha, commit)
        for e in commit.snapshot.files.values():
            if e.lfs:
                self.lfs_objects.setdefault(e.sha256, commit.snapshot.folder / e.path)

    def resolve(self, revision: str) -> Commit | None:
        """A branch, a tag, a commit sha, or a commit sha's first 5+ characters when only one matches."""
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha is None and re.fullmatch(r"[0-9a-fA-F]{5,40}", revision or ""):
            matches = [s for s in self.commits if s.startswith(revision.lower())]
            sha = matches[0] if len(matches) == 1 else None
        return self.commits.get(sha) if sha else None

    def history(self, sha: str) -> list[Commit]:
        """The commit and its ancestors, newest first."""
        out = []
        while sha is not None:
            out.append(self.commits[sha])
            sha = out[-1].parent
        return out


@dataclass
class LoggedRequest:
    """One request as the server saw it. Whether it carried a token is kept; the token never is."""

    method: str
    path: str  # decoded, without the query
    auth: bool  # an Authorization header was sent
    status: int | None = None  # the status answered; None while running, or when the connection was dropped


# --- the server ------------------------------------------------------------------------------------
class HubServer:
    """A Hub-API server on 127.0.0.1 in a background thread. Use as a context manager.

    ``repos`` maps ``"namespace/name"`` to ``{revision name: folder}``; every repo needs ``main`` (the
    branch; other names are tags). Folders are read when the server is built and must not change while
    it runs; commits never write into them. ``storage`` holds uploaded LFS objects and the folders of new
    commits (default: a temporary folder removed when the server stops). ``token``: the only token write
    routes accept (default: any ``Bearer`` token).
    """

    commits_per_page = 50  # page size of the commit history, as on the Hub

    def __init__(self, repos: dict[str, dict[str, Path]] | None = None, *, storage: Path | None = None,
                 token: str | None = None):
        self.repos = {repo_id: HubRepo(repo_id, revs) for repo_id, revs in (repos or {}).items()}
        self.requests: list[tuple[str, str]] = []  # (method, decoded path without query), in arrival order
        self.log: list[LoggedRequest] = []  # the same requests with whether a token was sent and the status
        self.uploads = 0  # LFS objects received and stored (PUTs that succeeded)
        self._token = token
        self._storage = Path(storage) if storage is not None else None
        self._owns_storage = storage is None
        self._lock = threading.RLock()  # guards repos, their refs and commits, tickets, faults and the logs
        self._faults: dict[str, int | str] = {}
        self._route_faults: dict[str, tuple[int, int]] = {}  # handler name → (status, times left)
        self._tickets: dict[tuple[str, str], int] = {}  # (repo, oid) → size, handed out by the LFS batch endpoint
        self._sequence = itertools.count(1)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not running; use it as a context manager")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # --- assertions -------------------------------------------------------------------------------------
    def commit(self, repo_id: str, revision: str = "main") -> str:
        """The 40-hex commit sha the server reports for a revision (branch, tag or sha)."""
        with self._lock:
            commit = self.repos[repo_id].resolve(revision)
        if commit is None:
            raise KeyError(f"{repo_id}: no revision {revision!r}")
        return commit.sha

    def commits(self, repo_id: str, branch: str = "main") -> list[dict]:
        """A branch's history, newest first: ``{"id", "title", "message", "parent"}`` per commit."""
        with self._lock:
            repo = self.repos[repo_id]
            return [{"id": c.sha, "title": c.title, "message": c.message, "parent": c.parent}
                    for c in repo.history(repo.branches[branch])]

    def tags(self, repo_id: str) -> dict[str, str]:
        """Tag name → commit sha."""
        with self._lock:
            return dict(self.repos[repo_id].tags)

    def branches(self, repo_id: str) -> dict[str, str]:
        """Branch name → head commit sha."""
        with self._lock:
            return dict(self.repos[repo_id].branches)

    def repo_settings(self, repo_id: str) -> dict:
        """``{"private": bool, "gated": False | "auto" | "manual"}``."""
        with self._lock:
            repo = self.repos[repo_id]
            return {"private": repo.private, "gated": repo.gated}

    def folder(self, repo_id: str, revision: str = "main") -> Path:
        """The folder holding a revision's files (read-only: other revisions may share its files)."""
        with self._lock:
            commit = self.repos[repo_id].resolve(revision)
        if commit is None:
            raise KeyError(f"{repo_id}: no revision {revision!r}")
        return commit.snapshot.folder

    # --- fault switches: each fires on the next matching request, then clears ------------------------
    def fail_next_commit(self, status: int = 500) -> None:
        """The next commit request answers ``status`` and applies nothing."""
        self._set_fault("commit", status)

    def fail_after_next_commit(self, status: int | None = 500) -> None:
        """The next commit is applied, but the client gets ``status`` (None: the connection is closed
        without an answer), as when the server commits and the response is lost."""
        self._set_fault("after_commit", "drop" if status is None else status)

    def drop_next_upload(self) -> None:
        """The next LFS upload (PUT) reads part of the body, then closes the connection without an
        answer; nothing is stored."""
        self._set_fault("upload", "drop")

    def fail_next_tag(self, status: int = 500) -> None:
        """The next tag creation answers ``status`` and creates nothing."""
        self._set_fault("tag", status)

    def fail_next(self, route: str, status: int = 503, times: int = 1) -> None:
        """The next ``times`` requests to a route (a handler name such as ``refs``, ``tree``, ``repo_info``,
        ``create_repo``, ``settings``) answer ``status`` and do nothing."""
        with self._lock:
            self._route_faults[route] = (status, times)

    def _take_route_fault(self, route: str) -> int | None:
        with self._lock:
            status, times = self._route_faults.get(route, (None, 0))
            if not times:
                return None
            self._route_faults[route] = (status, times - 1)
            return status

    def _set_fault(self, name: str, value: int | str) -> None:
        with self._lock:
            self._faults[name] = value

    def _take_fault(self, name: str) -> int | str | None:
        with self._lock:
            return self._faults.pop(name, None)

    # --- state changes (called by the handlers) ---------------------------------------------------------
    def _repo_dir(self, repo_id: str) -> Path:
        return self._storage / "repos" / repo_id

    def _create_repo(self, repo_id: str, private: bool) -> HubRepo:
        with self._lock:
            if repo_id in self.repos:
                raise HubError(409, None, "You already created this dataset repo",
                               body={"url": f"{self.endpoint}/datasets/{repo_id}"})
            repo = HubRepo(repo_id)
            repo.private = private
            first = self._make_commit(repo, None, {".gitattributes": (GITATTRIBUTES.encode(), False)},
                                      "initial commit", "", author="system")
            repo.add(first)
            repo.branches["main"] = first.sha
            self.repos[repo_id] = repo
            return repo

    def _apply_commit(self, repo: HubRepo, branch: str, header: dict, operations: list[dict]) -> Commit:
        """Apply a commit's operations to the head of ``branch`` and move the branch to the new commit."""
        with self._lock:
            head = self._branch_head(repo, branch)
            parent = header.get("parentCommit")
            if parent and not head.sha.startswith(str(parent).lower()):
                raise HubError(412, None, COMMIT_RACE)
            # path → (a file to link or bytes to write, stored in LFS)
            files: dict[str, tuple[Path | bytes, bool]] = {
                p: (head.snapshot.folder / p, e.lfs) for p, e in head.snapshot.files.items()}
            for op in operations:
                key, value = op.get("key"), op.get("value") or {}
                path = _repo_path(value.get("path"))
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, None, f"{path}: unsupported encoding {value.get('encoding')!r}")
                    files[path] = (_b64decode(value.get("content", ""), path), False)
                elif key == "lfsFile":
                    oid = str(value.get("oid", "")).lower()
                    stored = repo.lfs_objects.get(oid)
                    if stored is None or value.get("algo", "sha256") != "sha256":
                        raise HubError(400, None, "Your push was rejected because an LFS pointer pointed to a file "
                                                  f"that does not exist. Offending file: {path} ({oid})")
                    if "size" in value and value["size"] != stored.stat().st_size:
                        raise HubError(400, None, f"{path}: size {value['size']} does not match LFS object {oid}")
                    files[path] = (stored, True)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
                elif key == "deletedFolder":
                    inside = [p for p in files if p.startswith(f"{path}/")]
                    if not inside:
                        raise HubError(404, "EntryNotFound", f"A folder with this name doesn't exist: {path}")
                    for p in inside:
                        del files[p]
                else:
                    raise HubError(400, None, f"unknown commit operation {key!r}")
            for p in files:
                folders = itertools.accumulate(p.split("/")[:-1], "{}/{}".format)  # "a", "a/b" for "a/b/c"
                if any(f in files for f in folders):
                    raise HubError(400, None, f"{p}: a file is in the way of this path")
            commit = self._make_commit(repo, head, files, str(header.get("summary", "")),
                                       str(header.get("description", "")))
            repo.add(commit)
            repo.branches[branch] = commit.sha
            return commit

    def _make_commit(self, repo: HubRepo, parent: Commit | None, files: dict[str, tuple[Path | bytes, bool]],
                     title: str, message: str, author: str = USER) -> Commit:
        """Materialise ``files`` as a new folder under storage and wrap it in a commit (caller holds the lock)."""
        tmp = Path(tempfile.mkdtemp(dir=self._storage / "tmp"))
        for path, (source, _) in files.items():
            dst = tmp / path
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, bytes):
                dst.write_bytes(source)
            else:
                _link_or_copy(source, dst)
        snap = Snapshot.read(repo.repo_id, tmp, {p: lfs for p, (_, lfs) in files.items()})
        date = _timestamp(_dt.datetime.now(_dt.timezone.utc))
        # Like git: parent, tree, date and message; the sequence number keeps it unique even within a millisecond.
        seed = (f"parent {parent.sha if parent else '-'}\ntree {snap.sha}\nseq {next(self._sequence)}\n"
                f"date {date}\n\n{title}\n\n{message}")
        sha = hashlib.sha1(seed.encode()).hexdigest()
        folder = self._repo_dir(repo.repo_id) / "commits" / sha
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(folder)
        snap = dataclasses.replace(snap, folder=folder, sha=sha, last_modified=date)
        return Commit(sha, snap, parent.sha if parent else None, title, message, author, date)

    def _branch_head(self, repo: HubRepo, branch: str) -> Commit:
        if branch in repo.branches:
            return repo.commits[repo.branches[branch]]
        if repo.resolve(branch) is not None:
            raise HubError(400, None, f"{branch} is not a branch: commits go to branches")
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {branch}")

    def _store_object(self, repo: HubRepo, oid: str, received: Path) -> None:
        """Keep an uploaded, already checked LFS object (``received`` is moved into the store)."""
        with self._lock:
            if oid in repo.lfs_objects:
                received.unlink()
            else:
                target = self._repo_dir(repo.repo_id) / "lfs" / oid
                target.parent.mkdir(parents=True, exist_ok=True)
                received.rename(target)
                repo.lfs_objects[oid] = target
            self._tickets.pop((repo.repo_id, oid), None)
            self.uploads += 1

    def _authorization(self, header: str | None) -> tuple[int, str] | None:
        """None when ``header`` carries an accepted token, else the (status, message) to refuse with."""
        if header is None:
            return 401, "Invalid username or password."
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return 401, "Invalid credentials in Authorization header"
        if self._token is not None and not hmac.compare_digest(token.strip().encode(), self._token.encode()):
            return 403, "This token does not have write access to this repository"
        return None

    # --- lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> "HubServer":
        if self._storage is None:
            self._storage = Path(tempfile.mkdtemp(prefix="loopback-hub-"))
        (self._storage / "tmp").mkdir(parents=True, exist_ok=True)  # commits and uploads are built here
        handler = type("BoundHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        # A short poll interval: `shutdown()` waits for the loop to notice, and tests start many servers.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hub-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = self._thread = None
        if self._owns_storage and self._storage is not None:
            shutil.rmtree(self._storage, ignore_errors=True)
            self._storage = None


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link (files are never written in place, so revisions may share them); copy across devices."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _repo_path(path) -> str:
    """A path inside the repo from a commit operation; 400 for anything that would leave it or touch .git."""
    parts = path.strip("/").split("/") if isinstance(path, str) else []
    if not parts or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise HubError(400, None, f"invalid path in repo: {path!r}")
    return "/".join(parts)


def _read_exactly(stream, size: int) -> Iterator[bytes]:
    """``size`` bytes from ``stream`` in blocks; stops early if the peer hangs up."""
    while size > 0 and (block := stream.read(min(CHUNK, size))):
        size -= len(block)
        yield block


def _b64decode(content: str, path: str) -> bytes:
    try:
        return base64.b64decode(content, validate=True)
    except ValueError:
        raise HubError(400, None, f"{path}: content is not valid base64") from None


class HubError(Exception):
    """An error response in the Hub's shape: status, ``X-Error-Code``, a JSON ``{"error": ...}`` body
    (plus ``body``'s fields, such as the ``url`` of a repo that already exists)."""

    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit, self.body = status, code, message, commit, body or {}


_GLOBAL_ROUTES = {
    ("POST", "/api/repos/create"): "create_repo",
    ("POST", "/api/validate-yaml"): "validate_yaml",
    ("GET", "/api/whoami-v2"): "whoami",
}
_API = re.compile(r"^/api/datasets/(?P<rest>.+)$")
_LFS = re.compile(r"^/datasets/(?P<repo>.+?)\.git/info/lfs/objects/(?P<rest>[^/]+)$")
_RESOLVE = re.compile(r"^/datasets/(?P<rest>.+)$")


class _Handler(BaseHTTPRequestHandler):
    """Routes a request to a method by (HTTP method, action); actions follow the repo id in the URL."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    timeout = 30  # an idle keep-alive connection frees its thread after this many seconds
    hub: HubServer  # set on the subclass that HubServer builds

    # (method, action) → handler. ``None`` is the bare repo URL; ``lfs:*`` are the LFS endpoints under
    # ``/datasets/{repo}.git/info/lfs/objects/`` (``lfs:object`` is an upload URL from the batch answer).
    ROUTES = {
        ("GET", None): "repo_info",
        ("GET", "revision"): "repo_info",
        ("GET", "tree"): "tree",
        ("POST", "paths-info"): "paths_info",
        ("GET", "resolve"): "resolve",
        ("HEAD", "resolve"): "resolve",
        ("GET", "refs"): "list_refs",
        ("GET", "commits"): "list_commits",
        ("PUT", "settings"): "update_settings",
        ("POST", "preupload"): "preupload",
        ("POST", "commit"): "commit",
        ("POST", "tag"): "create_tag",
        ("DELETE", "tag"): "delete_tag",
        ("POST", "lfs:batch"): "lfs_batch",
        ("POST", "lfs:verify"): "lfs_verify",
        ("PUT", "lfs:object"): "lfs_upload",
    }
    # Handlers that need a token. The upload URL needs none: like a pre-signed S3 URL, only a batch answer.
    NEEDS_TOKEN = {"create_repo", "update_settings", "preupload", "commit", "create_tag", "delete_tag",
                   "lfs_batch", "lfs_verify", "whoami"}

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def log_message(self, format, *args):  # quiet: the request list is the log
        pass

    def send_response(self, code, message=None):
        if getattr(self, "record", None) is not None:  # None: an unparsable request, answered by the base class
            self.record.status = code
        super().send_response(code, message)

    # --- dispatch ---------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.record = LoggedRequest(method, unquote(url.path), "Authorization" in self.headers)
        with self.hub._lock:
            self.hub.requests.append((method, self.record.path))
            self.hub.log.append(self.record)
        # Uploads stream their body; every other body is read now, which keeps the connection in sync.
        streamed = method == "PUT" and _LFS.match(url.path) is not None
        self.body = b"" if streamed else b"".join(self._body_blocks())
        try:
            name, repo, args = self._route(method, url.path)
            failure = self.hub._take_route_fault(name)
            if failure is not None:
                raise HubError(failure, None, f"injected failure of {name}")
            if name in self.NEEDS_TOKEN:
                refusal = self.hub._authorization(self.headers.get("Authorization"))
                if refusal is not None:
                    raise HubError(refusal[0], None, refusal[1])
            elif (repo is not None and repo.private and name != "lfs_upload"
                  and self.hub._authorization(self.headers.get("Authorization"))):
                raise HubError(401, "RepoNotFound", "Repository not found")  # as the Hub hides private repos
            getattr(self, name)(method, repo, args)
        except HubError as e:
            if streamed:
                self.close_connection = True  # the upload body was not read
            headers = {"X-Error-Code": e.code, "X-Error-Message": _latin1(e.message), "X-Repo-Commit": e.commit}
            self._send_json({"error": e.message} | e.body, e.status, {k: v for k, v in headers.items() if v}, method)
        finally:
            self.record = None

    def _route(self, method: str, raw_path: str) -> tuple[str, HubRepo | None, list[str]]:
        """The handler name, the repo and the path segments after the action.

        Each path segment is unquoted on its own: the client sends a revision such as ``refs/pr/1``
        and tree paths as single ``%2F``-quoted segments.
        """
        if (method, raw_path) in _GLOBAL_ROUTES:
            return _GLOBAL_ROUTES[method, raw_path], None, []
        if m := _LFS.match(raw_path):
            repo = self._repo(unquote(m["repo"]))
            action = "lfs:object" if _OID.fullmatch(m["rest"]) else f"lfs:{m['rest']}"
            repo_args = [m["rest"]]
        elif m := _API.match(raw_path) or _RESOLVE.match(raw_path):
            segments = [unquote(s) for s in m["rest"].split("/")]
            with self.hub._lock:
                n = next((n for n in (2, 1) if "/".join(segments[:n]) in self.hub.repos), None)  # or a legacy id
            if n is None:
                raise HubError(404, "RepoNotFound", "Repository not found")
            repo, rest = self._repo("/".join(segments[:n])), segments[n:]
            if m.re is _RESOLVE and (not rest or rest[0] != "resolve"):
                raise HubError(404, None, f"not a Hub API path: {raw_path}")
            action, repo_args = (rest[0] if rest else None), rest[1:]
        else:
            raise HubError(404, None, f"not a Hub API path: {raw_path}")
        name = self.ROUTES.get((method, action))
        if name is None:
            raise HubError(404, None, f"no route for {method} {raw_path}")
        return name, repo, repo_args

    def _repo(self, repo_id: str) -> HubRepo:
        with self.hub._lock:
            repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise HubError(404, "RepoNotFound", "Repository not found")
        return repo

    def _snapshot(self, repo: HubRepo, revision: str) -> Snapshot:
        with self.hub._lock:
            commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit.snapshot

    def _json_body(self) -> dict:
        try:
            form = json.loads(self.body or b"{}")
        except ValueError:
            form = None
        if not isinstance(form, dict):
            raise HubError(400, None, "the request body is not a JSON object")
        return form

    def _body_blocks(self) -> Iterator[bytes]:
        """The request body in blocks, from ``Content-Length`` or chunked transfer encoding."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                yield from _read_exactly(self.rfile, size)
                self.rfile.readline()  # the CRLF after each chunk
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
        else:
            yield from _read_exactly(self.rfile, int(self.headers.get("Content-Length") or 0))

    def _drop_connection(self) -> None:
        """Close the connection without an answer, as a crash or network cut would."""
        self.record.status = None
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # --- read routes --------------------------------------------------------------------------------
    def repo_info(self, method: str, repo: HubRepo, args: list[str]) -> None:
        """``/api/datasets/{repo}`` (main) and ``/api/datasets/{repo}/revision/{rev}``."""
        snap = self._snapshot(repo, "/".join(args) if args else "main")
        blobs = self.query.get("blobs", "").lower() == "true"
        siblings = []
        for e in snap.files.values():
            sib = {"rfilename": e.path}
            if blobs:
                sib |= {"size": e.size, "blobId": e.blob_oid}
                if e.lfs:
                    sib["lfs"] = {"size": e.size, "sha256": e.sha256, "pointerSize": LFS_POINTER_SIZE}
            siblings.append(sib)
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": snap.sha,
            "lastModified": snap.last_modified,
            "createdAt": snap.last_modified,
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "cardData": _card_data(snap),
            "siblings": siblings,
            "usedStorage": sum(e.size for e in snap.files.values()),
        }
        self._send_json(info, 200, {}, method)

    def tree(self, method: str, repo: HubRepo, args: list[str]) -> None:
        """``/api/datasets/{repo}/tree/{rev}[/{path}]``: children of a folder, or all below it with ``recursive``."""
        if not args:
            raise HubError(400, None, "missing revision")
        snap = self._snapshot(repo, args[0])
        base = "/".join(a for a in args[1:] if a).strip("/")
        dirs = snap.directories()
        if base and base not in dirs:
            raise HubError(404, "EntryNotFound", f"{base} does not exist on {args[0]}", commit=snap.sha)
        recursive = self.query.get("recursive", "").lower() == "true"
        expand = self.query.get("expand", "").lower() == "true"
        prefix = f"{base}/" if base else ""

        def wanted(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix):])

        entries = [_dir_json(snap, d, expand) for d in sorted(dirs) if wanted(d)]
        entries += [_file_json(snap, e, expand) for p, e in snap.files.items() if wanted(p)]
        self._send_json(entries, 200, {}, method)

    def paths_info(self, method: str, repo: HubRepo, args: list[str]) -> None:
        """``POST /api/datasets/{repo}/paths-info/{rev}`` with form or JSON ``paths``; unknown paths are left out."""
        snap = self._snapshot(repo, "/".join(args) if args else "main")
        if "json" in (self.headers.get("Content-Type") or ""):
            form = json.loads(self.body or b"{}")
            paths, expand = form.get("paths", []), bool(form.get("expand"))
        else:
            form = parse_qs(self.body.decode())
            paths, expand = form.get("paths", []), form.get("expand", ["False"])[-1].lower() == "true"
        dirs, out = snap.directories(), []
        for path in paths if isinstance(paths, list) else [paths]:
            path = path.strip("/")
            if path in snap.files:
                out.append(_file_json(snap, snap.files[path], expand))
            elif path in dirs or path == "":
                out.append(_dir_json(snap, path, expand))
        self._send_json(out, 200, {}, method)

    def resolve(self, method: str, repo: HubRepo, args: list[str]) -> None:
        """``HEAD``/``GET /datasets/{repo}/resolve/{rev}/{path}``, with one ``Range`` if asked."""
        if len(args) < 2:
            raise HubError(404, "EntryNotFound", "missing file path")
        snap = self._snapshot(repo, args[0])
        path = "/".join(args[1:])
        entry = snap.files.get(path)
        if entry is None:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {args[0]}", commit=snap.sha)
        headers = {
            "X-Repo-Commit": snap.sha,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{_latin1(path.rsplit("/", 1)[-1])}"',
        }
        if entry.lfs:
            headers |= {"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)}
        start, end, status = 0, entry.size - 1, 200
        if "Range" in self.headers:
            start, end = _parse_range(self.headers["Range"], entry.size)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        length = max(0, end - start + 1)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if method == "GET" and length:
            with open(snap.folder / path, "rb") as f:
                f.seek(start)
                while length > 0:
                    block = f.read(min(CHUNK, length))
                    if not block:
                        break
                    self.wfile.write(block)
                    length -= len(block)

    def list_refs(self, method: str, repo: HubRepo, args: list[str]) -> None:
        """``GET /api/datasets/{repo}/refs[?include_prs=1]``: branches and tags with their commits."""
        with self.hub._lock:
            refs = {kind: [{"name": name, "ref": f"refs/{prefix}/{name}", "targetCommit": sha}
                           for name, sha in sorted(names.items())]
                    for kind, prefix, names in (("branches", "heads", repo.branches), ("tags", "tags", repo.tags))}
        refs["converts"] = []
        if self.query.get("include_prs"):
            refs["pullRequests"] = []
        self._send_json(refs, 200, {}, method)

    def list_commits(self, method: str, repo: HubRepo, args: list[str]) -> None:
        """``GET /api/datasets/{repo}/commits/{rev}[?p=N]``: history newest first, a page at a time."""
        revision = "/".join(args) or "main"
        with self.hub._lock:
            commit = repo.resolve(revision)
            history = repo.history(commit.sha) if commit else None
        if history is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        size = self.hub.commits_per_page
        page = int(self.query["p"]) if self.query.get("p", "").isdigit() else 0
        formatted = "formatted" in parse_qs(urlsplit(self.path).query).get("expand[]", [])
        items = [c.as_json(formatted) for c in history[page * size:(page + 1) * size]]
        headers = {}
        if (page + 1) * size < len(history):
            query = urlencode({**self.query, "p": page + 1})
            headers["Link"] = f'<{self.hub.endpoint}{urlsplit(self.path).path}?{query}>; rel="next"'
        self._send_json(items, 200, headers, method)

    # --- write routes -------------------------------------------------------------------------------
    def whoami(self, method: str, repo: None, args: list[str]) -> None:
        """``GET /api/whoami-v2``: every accepted token belongs to ``USER``, with write access."""
        self._send_json({"type": "user", "id": hashlib.sha1(USER.encode()).hexdigest()[:24], "name": USER,
                         "fullname": USER, "orgs": [], "auth": {"type": "access_token",
                         "accessToken": {"displayName": "loopback", "role": "write"}}}, 200, {}, method)

    def validate_yaml(self, method: str, repo: None, args: list[str]) -> None:
        """``POST /api/validate-yaml``: the README's YAML header must parse (to a mapping)."""
        content = str(self._json_body().get("content", ""))
        m = re.match(r"^---\n(.*?)\n---", content, re.S)
        try:
            meta = yaml.safe_load(m[1]) if m else {}
            if not isinstance(meta, (dict, type(None))):
                raise ValueError("the metadata must be a YAML mapping")
        except (yaml.YAMLError, ValueError) as e:
            self._send_json({"errors": [{"message": str(e)}], "warnings": []}, 400, {}, method)
            return
        self._send_json({"errors": [], "warnings": []}, 200, {}, method)

    def create_repo(self, method: str, repo: None, args: list[str]) -> None:
        """``POST /api/repos/create`` with ``{name, organization, type, visibility | private}``."""
        form = self._json_body()
        name, namespace = form.get("name"), form.get("organization") or USER
        if form.get("type", "model") != "dataset":
            raise HubError(400, None, "the loopback Hub serves dataset repos only")
        if not all(isinstance(s, str) and _NAME.fullmatch(s) and not s.endswith(".git") for s in (name, namespace)):
            raise HubError(400, None, f"invalid repo name: {namespace}/{name}")
        private = form.get("visibility") == "private" or form.get("private") is True
        repo = self.hub._create_repo(f"{namespace}/{name}", private)
        url = f"{self.hub.endpoint}/datasets/{repo.repo_id}"
        self._send_json({"url": url, "name": repo.repo_id, "id": repo.repo_id}, 200, {}, method)

    def update_settings(self, method: str, repo: HubRepo, args: list[str]) -> None:
        """``PUT /api/datasets/{repo}/settings`` with ``gated`` (False, "auto", "manual") and/or
        ``visibility`` ("public", "private"; older clients send ``private``)."""
        form = self._json_body()
        if "gated" in form and form["gated"] not in (False, "auto", "manual"):
            raise HubError(400, None, f"invalid gated value {form['gated']!r}")
        if "visibility" in form and form["visibility"] not in ("public", "private"):
            raise HubError(400, None, f"invalid visibility {form['visibility']!r}")
        with self.hub._lock:
            if "gated" in form:
                repo.gated = form["gated"]
            if "visibility" in form or "private" in form:
                repo.private = form.get("visibility", "private" if form.get("private") else "public") == "private"
            settings = {"private": repo.private, "gated": repo.gated}
        self._send_json(settings, 200, {}, method)

    def preupload(self, method: str, repo: HubRepo, args: list[str]) -> None:
        """``POST /api/datasets/{repo}/preupload/{branch}``: how each file will be stored, by its first
        512 bytes and size, and the oid of the file now at its path (the client drops unchanged files)."""
        branch = "/".join(args) or "main"
        with self.hub._lock:
            head = self.hub._branch_head(repo, branch)
        out = []
        for f in self._json_body().get("files", []):
            path, size = f.get("path"), f.get("size")
            if not isinstance(path, str) or not isinstance(size, int):
                raise HubError(400, None, "each file needs a path and a size")
            lfs = _lfs_rule(_is_binary(_b64decode(f.get("sample", ""), path), final=False), size)
            current = head.snapshot.files.get(path)
            out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": current.etag if current else None})
        self._send_json({"files": out, "commitOid": head.sha}, 200, {}, method)

    def lfs_batch(self, method: str, repo: HubRepo, args: list[str]) -> None:
        """``POST /datasets/{repo}.git/info/lfs/objects/batch``: basic-transfer upload and verify actions
        for the objects the repo lacks; objects it holds get none."""
        form = self._json_body()
        if form.get("operation") != "upload":
            raise HubError(400, None, "the loopback Hub's LFS batch endpoint only takes uploads")
        base = f"{self.hub.endpoint}/datasets/{quote(repo.repo_id)}.git/info/lfs/objects"
        objects = []
        with self.hub._lock:
            for obj in form.get("objects", []):
                oid, size = str(obj.get("oid", "")), obj.get("size")
                if not _OID.fullmatch(oid) or not isinstance(size, int) or size < 0:
                    objects.append({"oid": oid, "size": size if isinstance(size, int) else 0,
                                    "error": {"code": 422, "message": "invalid oid or size"}})
                elif oid in repo.lfs_objects:
                    objects.append({"oid": oid, "size": size, "authenticated": True})
                else:
                    self.hub._tickets[repo.repo_id, oid] = size
                    objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                        "upload": {"href": f"{base}/{oid}", "expires_in": 3600},
                        "verify": {"href": f"{base}/verify", "expires_in": 3600}}})
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, 200,
                        {"Content-Type": "application/vnd.git-lfs+json"}, method)

    def lfs_upload(self, method: str, repo: HubRepo, args: list[str]) -> None:
        """``PUT`` to an upload href: the body must hash to the oid and have the size the batch was told."""
        oid = args[0]
        with self.hub._lock:
            expected = self.hub._tickets.get((repo.repo_id, oid))
        if expected is None:
            raise HubError(403, None, f"no upload was requested for object {oid}")
        if self.hub._take_fault("upload") is not None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:  # read half the body (or a chunk's size line), then hang up
                self.rfile.read(max(1, length // 2))
            else:
                self.rfile.readline()
            self._drop_connection()
            return
        fd, name = tempfile.mkstemp(dir=self.hub._storage / "tmp")
        received, digest, size = Path(name), hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as f:
            for block in self._body_blocks():
                digest.update(block)
                size += len(block)
                f.write(block)
        if size != expected or digest.hexdigest() != oid:
            received.unlink()
            raise HubError(400, None, f"object {oid}: the body's sha256 or size ({size}, expected {expected}) differs")
        self.hub._store_object(repo, oid, received)
        self.send_response(200)
        self.send_header("ETag", f'"{oid}"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def lfs_verify(self, method: str, repo: HubRepo, args: list[str]) -> None:
        """``POST .../objects/verify`` with ``{oid, size}``: the object is stored, with that size."""
        form = self._json_body()
        oid = str(form.get("oid", ""))
        with self.hub._lock:
            stored = repo.lfs_objects.get(oid)
        if stored is None or stored.stat().st_size != form.get("size"):
            raise HubError(404, None, f"object {oid} is not stored with size {form.get('size')}")
        self._send_json({"message": "Verified"}, 200, {}, method)

    def commit(self, method: str, repo: HubRepo, args: list[str]) -> None:
        """``POST /api/datasets/{repo}/commit/{branch}``: an NDJSON header line, then one line per operation."""
        if self.query.get("create_pr"):
            raise HubError(400, None, "the loopback Hub does not open pull requests")
        failure = self.hub._take_fault("commit")
        if failure is not None:
            raise HubError(int(failure), None, INTERNAL_ERROR if int(failure) >= 500 else "commit refused")
        try:
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        except ValueError:
            raise HubError(400, None, "the commit body is not NDJSON") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, None, "a commit starts with a header line")
        header = lines[0].get("value") or {}
        if not str(header.get("summary", "")).strip():
            raise HubError(400, None, "a commit needs a summary")
        commit = self.hub._apply_commit(repo, "/".join(args) or "main", header, lines[1:])
        after = self.hub._take_fault("after_commit")
        if after == "drop":
            self._drop_connection()
            return
        if after is not None:
            raise HubError(int(after), None, INTERNAL_ERROR)
        url = f"{self.hub.endpoint}/datasets/{repo.repo_id}/commit/{commit.sha}"
        self._send_json({"success": True, "commitOid": commit.sha, "commitUrl": url, "hookOutput": ""},
                        200, {}, method)

    def create_tag(self, method: str, repo: HubRepo, args: list[str]) -> None:
        """``POST /api/datasets/{repo}/tag/{rev}`` with ``{tag, message?}``; a tag is never moved."""
        revision, tag = "/".join(args) or "main", self._json_body().get("tag")
        if not isinstance(tag, str) or not re.fullmatch(r"[\w][\w.+-]*(/[\w][\w.+-]*)*", tag) or ".." in tag:
            raise HubError(400, None, f"invalid tag name {tag!r}")
        failure = self.hub._take_fault("tag")
        if failure is not None:
            raise HubError(int(failure), None, INTERNAL_ERROR if int(failure) >= 500 else "tag refused")
        with self.hub._lock:
            commit = repo.resolve(revision)
            if commit is None:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            if tag in repo.tags or tag in repo.branches:
                raise HubError(409, None, f"Reference already exists: {tag}")
            repo.tags[tag] = commit.sha
        self._send_json({"name": tag, "ref": f"refs/tags/{tag}", "targetCommit": commit.sha}, 200, {}, method)

    def delete_tag(self, method: str, repo: HubRepo, args: list[str]) -> None:
        """``DELETE /api/datasets/{repo}/tag/{tag}``."""
        tag = "/".join(args)
        with self.hub._lock:
            if repo.tags.pop(tag, None) is None:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {tag}")
        self._send_json({}, 200, {}, method)

    # --- responses -----------------------------------------------------------------------------------
    def _send_json(self, payload, status: int, headers: dict[str, str], method: str) -> None:
        body = json.dumps(payload, default=str).encode()  # README YAML may hold dates
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Length", str(len(body)))
        for k, v in ({"Content-Type": "application/json; charset=utf-8"} | headers).items():
            self.send_header(k, v)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)


def _latin1(text: str) -> str:
    """Header values must be latin-1: escape anything else (paths may hold any character)."""
    return text.encode("latin-1", "backslashreplace").decode("latin-1")


def _parse_range(header: str, size: int) -> tuple[int, int]:
    """``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` → inclusive (start, end); a 416 HubError otherwise."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if m is None or m[1] == m[2] == "":
        raise HubError(416, None, f"unsupported range {header!r}")
    if m[1] == "":
        start, end = max(0, size - int(m[2])), size - 1
    else:
        start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
    if start >= size or start > end:
        raise HubError(416, None, f"range {header!r} outside 0-{size - 1}")
    return start, end


def _last_commit(snap: Snapshot) -> dict:
    return {"id": snap.sha, "title": "served by the loopback Hub", "date": snap.last_modified}


def _file_json(snap: Snapshot, e: RepoEntry, expand: bool) -> dict:
    out = {"type": "file", "oid": e.blob_oid, "size": e.size, "path": e.path}
    if e.lfs:
        out["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": LFS_POINTER_SIZE}
    if expand:
        out["lastCommit"] = _last_commit(snap)
    return out


def _dir_json(snap: Snapshot, path: str, expand: bool) -> dict:
    oid = hashlib.sha1("\n".join(p for p in snap.files if p.startswith(f"{path}/")).encode()).hexdigest()
    out = {"type": "directory", "oid": oid, "size": 0, "path": path}
    if expand:
        out["lastCommit"] = _last_commit(snap)
    return out


def _card_data(snap: Snapshot) -> dict | None:
    """The README's YAML header, which the Hub returns as ``cardData``."""
    if "README.md" not in snap.files:
        return None
    text = (snap.folder / "README.md").read_text(encoding="utf-8")
    m = re.match(r"^---\n(.*?)\n---", text, re.S)
    return yaml.safe_load(m[1]) if m else None


# --- pointing the clients at a server ----------------------------------------------------------------
def hub_env(monkeypatch, hub: HubServer | str, home: Path) -> None:
    """Point ``huggingface_hub`` and ``datasets`` (this process and its subprocesses) at ``hub`` (a
    running server or an endpoint URL), with every cache under ``home``. See the module docstring for
    why constants are patched too.

        def test_pull(tmp_path, monkeypatch):
            with HubServer({"org/x": {"main": folder}}) as hub:
                hub_env(monkeypatch, hub, tmp_path / "hf_home")
                snapshot_download("org/x", repo_type="dataset")
    """
    import datasets.config as dconfig
    import huggingface_hub.constants as hconst
    import huggingface_hub.hf_api as hf_api

    endpoint = hub if isinstance(hub, str) else hub.endpoint
    home = Path(home)
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",
        "HF_HUB_DISABLE_XET": "1",  # uploads take the LFS path this server speaks
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(k, raising=False)

    # Paths derived from the import-time HF_HOME (update checks, agent registry, xet cache...) move too.
    _rehome(monkeypatch, hconst, hconst.HF_HOME, home)
    _rehome(monkeypatch, dconfig, dconfig.HF_CACHE_HOME, home)
    host = urlsplit(endpoint).hostname
    for name, value in {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": hconst.HF_URL_HOSTS | {host},
        "HF_HUB_OFFLINE": False,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_XET": True,
    }.items():
        monkeypatch.setattr(hconst, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)

    downloads = home / "datasets" / dconfig.DOWNLOADED_DATASETS_DIR
    for name, value in {
        "HF_ENDPOINT": endpoint,
        "HUB_DATASETS_URL": endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_HUB_OFFLINE": False,
        "HF_DATASETS_OFFLINE": False,
        "HF_CACHE_HOME": str(home),
        "HF_DATASETS_CACHE": home / "datasets",
        "HF_MODULES_CACHE": home / "modules",
        "DOWNLOADED_DATASETS_PATH": downloads,
        "EXTRACTED_DATASETS_PATH": downloads / dconfig.EXTRACTED_DATASETS_DIR,
        "HF_UPDATE_DOWNLOAD_COUNTS": False,
        "USE_PARQUET_EXPORT": False,
    }.items():
        monkeypatch.setattr(dconfig, name, value)
    home.mkdir(parents=True, exist_ok=True)


def _rehome(monkeypatch, module, old: str, new: Path) -> None:
    """Patch every upper-case str or Path constant of ``module`` that lies under ``old`` to lie under ``new``."""
    old = os.path.normpath(os.path.expanduser(str(old)))
    for name, value in list(vars(module).items()):
        if name.isupper() and isinstance(value, (str, Path)) and os.path.normpath(str(value)).startswith(old + os.sep):
            moved = str(new) + os.path.normpath(str(value))[len(old):]
            monkeypatch.setattr(module, name, type(value)(moved) if isinstance(value, Path) else moved)
