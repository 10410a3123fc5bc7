"""A loopback Hub-API server for tests: dataset repos served from local folders over real HTTP.

The real ``huggingface_hub`` client (which sends HTTP through ``httpx2``) and ``datasets.load_dataset``
talk to it exactly as they talk to huggingface.co; nothing is mocked. Each repo maps revision names
(branches or tags) to folders; a revision's commit sha is a hash of its folder's files, so two names
that point at the same folder share a commit, as a tag on ``main`` does::

    with HubServer({"org/SPA-VL": {"main": folder, "v0.1.0": folder}}) as hub:
        hub_env(monkeypatch, hub, tmp_path / "hf_home")
        path = snapshot_download("org/SPA-VL", repo_type="dataset", revision="v0.1.0")
        ds = load_dataset("org/SPA-VL", "malicious_use", revision="v0.1.0", cache_dir=tmp_path / "ds")
        hub.requests     # [("GET", "/api/datasets/org/SPA-VL/revision/v0.1.0"), ...]

Read side served here: repo info (``/api/datasets/{repo}[/revision/{rev}]``), tree listings
(``/api/datasets/{repo}/tree/{rev}[/{path}]``, ``recursive``, ``expand``), ``POST .../paths-info/{rev}``,
and ``HEAD``/``GET /datasets/{repo}/resolve/{rev}/{path}`` with single-range requests. Errors carry
the ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) that the
client turns into ``RepositoryNotFoundError``, ``RevisionNotFoundError`` and ``EntryNotFoundError``.
The write side (preupload, LFS batch, commit, tags) goes in ``_Handler.ROUTES`` when it is needed.

Pointing the clients at the server (``hub_env``). ``huggingface_hub.constants`` and ``datasets.config``
read ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_OFFLINE`` and the cache paths once, at import; the
server's port is known only once it runs, long after pytest imported both libraries. So setting the
environment is not enough: ``hub_env`` sets it (for subprocesses such as the CLI) and also patches the
import-time copies with ``monkeypatch`` (undone after the test):

- ``huggingface_hub.constants``: ``ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_URL_HOSTS``,
  ``HF_HUB_OFFLINE``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN_PATH`` and every other path derived from
  ``HF_HOME`` (``HfApi()``, ``snapshot_download`` and ``HfFileSystem`` read these at call time, and
  ``HfFileSystem`` instances are cached per endpoint, so a new port gets a fresh one);
- ``huggingface_hub.hf_api.api.endpoint``: the module-level ``HfApi`` behind ``huggingface_hub.dataset_info``
  and friends captured the endpoint when it was created;
- ``datasets.config``: ``HF_ENDPOINT``, ``HUB_DATASETS_URL``, ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``,
  the cache paths (``HF_DATASETS_CACHE`` and those under it), and two switches that would otherwise
  reach the internet: ``HF_UPDATE_DOWNLOAD_COUNTS`` (a HEAD to S3 on every load) and
  ``USE_PARQUET_EXPORT`` (the dataset viewer at ``datasets-server.<host>``).

``HF_TOKEN`` is removed for the test, so no real token is ever sent to the loopback server.
"""

from __future__ import annotations

import codecs
import datetime as _dt
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_MIN_TEXT_BYTES = 10 * 1024 * 1024  # the Hub stores text files above 10 MB in LFS, and every binary file
LFS_POINTER_SIZE = 134  # size of a git-lfs pointer file, as the Hub reports it
CHUNK = 1 << 20  # bytes per write when streaming a file body


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
    def read(cls, repo_id: str, folder: Path) -> "Snapshot":
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{repo_id}: revision folder {folder} does not exist")
        files, mtime = {}, 0.0
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                rel = p.relative_to(folder).as_posix()
                files[rel] = _entry(rel, p)
                mtime = max(mtime, p.stat().st_mtime)
        tree = "\n".join(f"{e.path} {e.blob_oid}" for e in files.values())
        sha = hashlib.sha1(f"{repo_id}\n{tree}".encode()).hexdigest()
        when = _dt.datetime.fromtimestamp(mtime, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return cls(folder, files, sha, when)

    def directories(self) -> set[str]:
        return {"/".join(parts[:i]) for path in self.files for parts in [path.split("/")] for i in range(1, len(parts))}


def _entry(rel: str, path: Path) -> RepoEntry:
    """Hash a file in blocks: git blob id (sha1 of a size header and the bytes), sha256, LFS or not."""
    size = path.stat().st_size
    sha1, sha256 = hashlib.sha1(b"blob %d\0" % size), hashlib.sha256()
    text = codecs.getincrementaldecoder("utf-8")()
    binary = False
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            sha1.update(block)
            sha256.update(block)
            if not binary:
                try:
                    text.decode(block)
                except UnicodeDecodeError:
                    binary = True
    if not binary:
        try:
            text.decode(b"", final=True)
        except UnicodeDecodeError:
            binary = True
    return RepoEntry(rel, size, sha1.hexdigest(), sha256.hexdigest(), binary or size >= LFS_MIN_TEXT_BYTES)


class HubRepo:
    """A dataset repo: revision name → snapshot. A revision may also be asked for by its commit sha."""

    def __init__(self, repo_id: str, revisions: dict[str, Path]):
        if "main" not in revisions:
            raise ValueError(f"{repo_id}: a repo needs a 'main' revision (the Hub's default branch)")
        self.repo_id = repo_id
        self.refs = {name: Snapshot.read(repo_id, folder) for name, folder in revisions.items()}

    def resolve(self, revision: str) -> Snapshot | None:
        if revision in self.refs:
            return self.refs[revision]
        return next((s for s in self.refs.values() if s.sha == revision), None)


# --- the server ------------------------------------------------------------------------------------
class HubServer:
    """A Hub-API server on 127.0.0.1 in a background thread. Use as a context manager.

    ``repos`` maps ``"namespace/name"`` to ``{revision name: folder}``; every repo needs ``main``.
    Folders are read when the server is built and must not change while it runs.
    """

    def __init__(self, repos: dict[str, dict[str, Path]]):
        self.repos = {repo_id: HubRepo(repo_id, revs) for repo_id, revs in repos.items()}
        self.requests: list[tuple[str, str]] = []  # (method, decoded path without query), in arrival order
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not running; use it as a context manager")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def commit(self, repo_id: str, revision: str = "main") -> str:
        """The 40-hex commit sha the server reports for a revision."""
        return self.repos[repo_id].refs[revision].sha

    def __enter__(self) -> "HubServer":
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


class HubError(Exception):
    """An error response in the Hub's shape: status, ``X-Error-Code``, a JSON ``{"error": ...}`` body."""

    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


_API = re.compile(r"^/api/datasets/(?P<rest>.+)$")
_RESOLVE = re.compile(r"^/datasets/(?P<rest>.+)$")


class _Handler(BaseHTTPRequestHandler):
    """Routes a request to a method by (HTTP method, action); actions follow the repo id in the URL."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    timeout = 30  # an idle keep-alive connection frees its thread after this many seconds
    hub: HubServer  # set on the subclass that HubServer builds

    # (method, action) → handler. ``None`` is the bare repo URL. Write routes (``preupload``, ``commit``,
    # ``tag``, the LFS batch endpoint) belong here too.
    ROUTES = {
        ("GET", None): "repo_info",
        ("GET", "revision"): "repo_info",
        ("GET", "tree"): "tree",
        ("POST", "paths-info"): "paths_info",
        ("GET", "resolve"): "resolve",
        ("HEAD", "resolve"): "resolve",
    }

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def log_message(self, format, *args):  # quiet: the request list is the log
        pass

    # --- dispatch ---------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))  # keeps the connection in sync
        self.hub.requests.append((method, unquote(url.path)))
        try:
            repo, action, args = self._parse(url.path)
            name = self.ROUTES.get((method, action))
            if name is None:
                raise HubError(404, None, f"no route for {method} {url.path}")
            getattr(self, name)(method, repo, args)
        except HubError as e:
            headers = {"X-Error-Code": e.code, "X-Error-Message": _latin1(e.message), "X-Repo-Commit": e.commit}
            self._send_json({"error": e.message}, e.status, {k: v for k, v in headers.items() if v}, method)

    def _parse(self, raw_path: str) -> tuple[HubRepo, str | None, list[str]]:
        """Split ``/api/datasets/{repo}/{action}/...`` or ``/datasets/{repo}/resolve/...`` into parts.

        Each path segment is unquoted on its own: the client sends a revision such as ``refs/pr/1``
        and tree paths as single ``%2F``-quoted segments.
        """
        m = _API.match(raw_path) or _RESOLVE.match(raw_path)
        if m is None:
            raise HubError(404, None, f"not a Hub API path: {raw_path}")
        segments = [unquote(s) for s in m["rest"].split("/")]
        for n in (2, 1):  # "namespace/name", or a legacy id without namespace
            repo = self.hub.repos.get("/".join(segments[:n]))
            if repo is not None:
                rest = segments[n:]
                break
        else:
            raise HubError(404, "RepoNotFound", "Repository not found")
        if m.re is _RESOLVE:
            if not rest or rest[0] != "resolve":
                raise HubError(404, None, f"not a Hub API path: {raw_path}")
        return repo, (rest[0] if rest else None), rest[1:]

    def _snapshot(self, repo: HubRepo, revision: str) -> Snapshot:
        snap = repo.resolve(revision)
        if snap is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return snap

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
            "private": False,
            "gated": False,
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

    # --- responses -----------------------------------------------------------------------------------
    def _send_json(self, payload, status: int, headers: dict[str, str], method: str) -> None:
        body = json.dumps(payload, default=str).encode()  # README YAML may hold dates
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
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
