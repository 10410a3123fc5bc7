"""Publish a dataset folder to the Hugging Face Hub as one commit plus a tag per version, and pull it back.

``publish`` refuses unless ``validate`` passes and the version's tag does not exist yet (a tag never
moves). It compares the folder with the repo's ``main`` (one tree listing), uploads what differs and
deletes what the folder no longer has, all in **one commit**, then creates the tag ``vX.Y.Z`` on that
commit. Faults are retried; after a crash, re-running finds the commit already on ``main`` (same
tree) and only adds the tag, so a version never gets a second commit or a second tag::

    result = publish("out/spa_vl", "org/SPA-VL")          # private and gated unless told otherwise
    result.commit, result.tag                              # "3f2a...", "v0.2.0"
    pull("org/SPA-VL", "copy", revision="v0.2.0")          # snapshot_download + manifest checksums

The token comes from ``HF_TOKEN`` or the ``huggingface_hub`` login (``hf auth login``); it is handed
to ``HfApi`` and never printed, logged or written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from builder.errors import DataError
from builder.format.folder import (
    CHANGELOG,
    PARTIAL_MARK,
    TAXONOMY_FILE,
    folder_taxonomy,
    parse_version,
    prepare_output,
    process_alive,
    read_manifest,
    swap_into_place,
)
from builder.format.shards import file_sha256

REPO_TYPE = "dataset"
PUBLISHED_DIRS = ("assets", "review")  # besides README.md, CHANGELOG.md, manifest.json and the manifest's files
KEEP_REMOTE = (".gitattributes",)  # files the Hub manages; never deleted by a publish


class PublishRefused(Exception):
    """Publishing would break a rule (validation failed, version already published): exit code 1."""


@dataclass
class LocalFile:
    path: str  # posix path in the repo
    local: Path
    size: int
    sha256: str
    git_oid: str  # git blob sha1, which the Hub reports for regular (non-LFS) files


@dataclass
class Plan:
    repo_id: str
    version: str
    tag: str
    files: list[LocalFile]
    upload: list[LocalFile] = field(default_factory=list)  # new or changed against main
    delete: list[str] = field(default_factory=list)
    repo_exists: bool | None = None  # None: could not be checked (no access)
    head: str | None = None  # main's commit before this publish
    tag_commit: str | None = None  # where the tag already points, if it exists
    tags: dict[str, str] = field(default_factory=dict)  # every tag of the repo → commit
    remote: dict = field(default_factory=dict)  # main's files: path → RepoFile
    note: str = ""
    refusal: str | None = None  # dry run: why the real publish would refuse

    @property
    def commit_message(self) -> str:
        return f"Release {self.tag}"

    @property
    def bytes_total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def bytes_upload(self) -> int:
        return sum(f.size for f in self.upload)

    def describe(self, *, private: bool, gated: bool) -> str:
        lines = [f"publish plan for {self.repo_id} (dataset repo), version {self.version}"]
        if self.repo_exists is False:
            lines.append(f"  create repo: yes ({'private' if private else 'public'}, {'gated' if gated else 'not gated'})")
        elif self.repo_exists is None:
            lines.append(f"  repo: could not be read ({self.note}); it would be created if missing")
        else:
            versions = sorted((t for t in self.tags if t.startswith("v")), key=lambda t: t)
            lines.append(f"  repo: exists, main at {self.head[:12] if self.head else '(empty)'}; "
                         f"version tags: {', '.join(versions) or 'none'}")
        lines.append(f"  files: {len(self.files)} ({_mb(self.bytes_total)}); to upload: {len(self.upload)} ({_mb(self.bytes_upload)}); "
                     f"to delete: {len(self.delete)}")
        for f in self.upload:
            lines.append(f"    + {f.path}  {f.size:,} B")
        for p in self.delete:
            lines.append(f"    - {p}")
        lines.append(f"  commit message: {self.commit_message!r} (one commit)")
        lines.append(f"  tag: {self.tag} on that commit")
        return "\n".join(lines)


@dataclass
class PublishResult:
    repo_id: str
    version: str
    tag: str
    commit: str
    files: int
    uploaded: int
    deleted: int
    bytes_uploaded: int
    created_repo: bool
    resumed: bool  # the commit was already on main (a re-run after a crash): only the tag was added
    attempts: int
    seconds: float

    def summary_line(self) -> str:
        how = "resumed: commit already on main, tag added" if self.resumed else f"{self.uploaded} uploaded, {self.deleted} deleted"
        return (f"published {self.repo_id} {self.tag}: {self.files} files ({how}, {_mb(self.bytes_uploaded)} sent), "
                f"commit {self.commit[:12]}, {self.attempts} attempt(s), {self.seconds:.1f} s")


# --- the folder's files --------------------------------------------------------------------------
def publishable_files(root: str | Path) -> list[LocalFile]:
    """README.md, CHANGELOG.md, manifest.json, taxonomy.yaml, every file the manifest lists, and the card's plots.

    Anything else in the folder (``.spa_vl/`` history, editor files) stays local.
    """
    root = Path(root)
    manifest = read_manifest(root)
    paths = ["README.md", "manifest.json", *manifest.get("files", {})]
    for name in (CHANGELOG, TAXONOMY_FILE):
        if (root / name).is_file():
            paths.append(name)
    for d in PUBLISHED_DIRS:
        paths += [p.relative_to(root).as_posix() for p in sorted((root / d).glob("*")) if p.is_file()]
    out = []
    for rel in sorted(set(paths)):
        local = root / rel
        if not local.is_file():
            raise DataError("file missing from the dataset folder", file=str(local))
        out.append(LocalFile(rel, local, local.stat().st_size, file_sha256(local), git_blob_oid(local)))
    return out


def git_blob_oid(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# --- publish ---------------------------------------------------------------------------------------
class HubUnreachable(Exception):
    """The Hub could not be read after retries (network, timeouts, 5xx): exit code 1."""


@contextlib.contextmanager
def hub_timeouts(connect: float = 10.0, read: float = 120.0):
    """huggingface_hub's HTTP client has no timeout by default; give every call one while we run."""
    import httpx2
    from huggingface_hub.utils import _http

    def factory():
        client = _http.default_client_factory()
        client.timeout = httpx2.Timeout(read, connect=connect)
        return client

    _http.set_client_factory(factory)
    try:
        yield
    finally:
        _http.set_client_factory(_http.default_client_factory)


def publish(
    root: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    gated: bool = True,
    dry_run: bool = False,
    token: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    full_decode: bool = False,
    log: Callable[[str], None] | None = None,
) -> PublishResult | Plan:
    """Publish ``root`` to ``repo_id``; returns the plan on ``dry_run``. See the module docstring.

    Order: every check that can refuse runs before anything is written, locally or on the Hub:
    repo id, manifest version, token, ``validate``, the repo's tags (the version must be new and above
    every published one). Then the card is re-rendered for the repo, the repo created (private and
    gated by default) and the version committed and tagged.
    """
    from huggingface_hub import HfApi, get_token

    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.monotonic()
    root = Path(root)
    _check_repo_id(repo_id)
    manifest = read_manifest(root)
    version = ".".join(map(str, parse_version(manifest.get("version", ""))))
    token = token or get_token()
    if token is None and not dry_run:
        raise DataError("no Hugging Face token: set HF_TOKEN or run `hf auth login`", field="token")

    from builder.validate import validate

    report = validate(root, full_decode=full_decode, progress=False)
    if not report.ok and not dry_run:
        raise PublishRefused(f"validation failed; fix the folder before publishing:\n{report.format_table()}")

    with hub_timeouts():
        api = HfApi(token=token)
        plan = Plan(repo_id, version, f"v{version}", publishable_files(root))
        try:
            _retry(lambda: _read_remote(api, plan), retries, backoff, log, "read the repo")
        except Exception as e:  # noqa: BLE001 - in a dry run, say what could not be read
            if not dry_run:
                raise HubUnreachable(f"cannot read {repo_id} on the Hub: {_short(e)}") from e
            plan.repo_exists, plan.note = None, _short(e)
        _diff(plan)
        refusal = _refusal(plan)
        if dry_run:
            extra = []
            if not report.ok:
                extra.append("validation FAILS: publish would refuse\n" + report.format_table())
            if refusal:
                extra.append(f"publish would refuse: {refusal}")
            extra.append("README.md and manifest.json are re-rendered for this repo before the upload "
                         "(the load examples name it), so their sizes may differ by a few bytes")
            log(plan.describe(private=private, gated=gated) + "\n  " + "\n  ".join(extra))
            plan.refusal = refusal or ("validation fails" if not report.ok else None)
            return plan
        if refusal:
            raise PublishRefused(refusal)

        from dataset_card.card import render_folder_card

        # the card's load examples name this repo and version
        render_folder_card(root, repo_id=repo_id, taxonomy=folder_taxonomy(root))
        plan.files = publishable_files(root)
        _diff(plan)

        created = False
        if not plan.repo_exists:
            created = _create_repo(api, repo_id, private, retries, backoff, log)
            _retry(lambda: _read_remote(api, plan), retries, backoff, log, "read the repo")
            _diff(plan)
        if gated:
            _ensure_gated(api, plan, created, retries, backoff, log)

        commit, attempts, resumed = _commit_version(api, root, plan, retries, backoff, log)
        _tag(api, repo_id, plan.tag, commit, retries, backoff, log)

    from builder.versioning import record_ids

    record_ids(root, version)  # the baseline of the next `spa-vl version`
    return PublishResult(repo_id, version, plan.tag, commit, len(plan.files), 0 if resumed else len(plan.upload),
                         0 if resumed else len(plan.delete), 0 if resumed else plan.bytes_upload, created, resumed,
                         attempts, time.monotonic() - t0)


def _read_remote(api, plan: Plan) -> None:
    """Fill the plan's view of the repo: exists?, main's head and files, the version tags."""
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        refs = api.list_repo_refs(plan.repo_id, repo_type=REPO_TYPE)
    except RepositoryNotFoundError:
        plan.repo_exists, plan.head, plan.tags, plan.remote = False, None, {}, {}
        return
    plan.repo_exists = True
    plan.tags = {t.name: t.target_commit for t in refs.tags}
    plan.tag_commit = plan.tags.get(plan.tag)
    plan.head = next((b.target_commit for b in refs.branches if b.name == "main"), None)
    plan.remote = {}
    if plan.head is not None:
        tree = api.list_repo_tree(plan.repo_id, repo_type=REPO_TYPE, revision=plan.head, recursive=True)
        plan.remote = {e.path: e for e in tree if isinstance(e, RepoFile)}


def _diff(plan: Plan) -> None:
    local = {f.path for f in plan.files}
    plan.upload = [f for f in plan.files if not _same(f, plan.remote.get(f.path))]
    plan.delete = sorted(p for p in plan.remote if p not in local and p not in KEEP_REMOTE)


def _refusal(plan: Plan) -> str | None:
    """Why this version may not be published, if it may not: its tag exists, or a later version is out."""
    if plan.tag_commit is not None:
        return (f"{plan.repo_id} already has tag {plan.tag} (commit {plan.tag_commit[:12]}); a published version never "
                "changes: bump it with `spa-vl version DIR --bump patch|minor|major`")
    published = []
    for name in plan.tags:
        try:
            published.append((parse_version(name), name))
        except DataError:
            continue  # a tag that is not a version
    if published and max(published)[0] > parse_version(plan.version):
        return (f"{plan.repo_id} already has {max(published)[1]}, later than {plan.tag}: publishing would take main back; "
                "bump the version above it")
    return None


def _create_repo(api, repo_id: str, private: bool, retries: int, backoff: float, log) -> bool:
    """Create the repo; True if this call created it (False if it appeared meanwhile)."""
    from huggingface_hub.errors import HfHubHTTPError

    def create() -> bool:
        try:
            api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=False)
            return True
        except HfHubHTTPError as e:
            if getattr(e.response, "status_code", None) == 409:
                return False
            raise

    created = _retry(create, retries, backoff, log, "create repo")
    log(f"publish: {'created' if created else 'found'} {repo_id} ({'private' if private else 'public'})")
    return created


def _ensure_gated(api, plan: Plan, created: bool, retries: int, backoff: float, log) -> None:
    """Gate a repo this publish created, or one that has no version yet (a publish that crashed between
    creating and gating it). An existing repo with published versions keeps its settings."""
    info = _retry(lambda: api.dataset_info(plan.repo_id), retries, backoff, log, "read repo settings")
    if getattr(info, "gated", False):
        return
    has_versions = any(_is_version(t) for t in plan.tags)
    if created or not has_versions:
        _retry(lambda: api.update_repo_settings(plan.repo_id, repo_type=REPO_TYPE, gated="auto"), retries, backoff,
               log, "gate repo")
        log(f"publish: {plan.repo_id} gated (users accept the card's prompt before downloading)")
    else:
        log(f"publish: warning: {plan.repo_id} is not gated and already has published versions; its settings are "
            "left as they are (gate it on the Hub if it should be)")


def _is_version(tag: str) -> bool:
    try:
        parse_version(tag)
        return True
    except DataError:
        return False


def _same(local: LocalFile, remote) -> bool:
    if remote is None or getattr(remote, "size", None) != local.size:
        return False
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        return getattr(lfs, "sha256", None) == local.sha256
    return getattr(remote, "blob_id", None) == local.git_oid


def _commit_version(api, root: Path, plan: Plan, retries: int, backoff: float, log) -> tuple[str, int, bool]:
    """One commit with every change; retried. Before each retry, main is compared with the folder again,
    so a commit that landed although the client saw an error is found and never made twice."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    if not plan.upload and not plan.delete and plan.head is not None:
        log(f"publish: main ({plan.head[:12]}) already holds this version's files; adding the tag only")
        return plan.head, 0, True
    attempt = 0
    while True:
        attempt += 1
        ops = [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(f.local)) for f in plan.upload]
        ops += [CommitOperationDelete(path_in_repo=p) for p in plan.delete]
        log(f"publish: commit {plan.commit_message!r}: {len(plan.upload)} files to upload ({_mb(plan.bytes_upload)}), "
            f"{len(plan.delete)} to delete (attempt {attempt})")
        try:
            info = api.create_commit(plan.repo_id, ops, commit_message=plan.commit_message, repo_type=REPO_TYPE,
                                     parent_commit=plan.head,
                                     commit_description=f"spa-vl dataset version {plan.version}; see CHANGELOG.md.")
            return info.oid, attempt, False
        except Exception as e:  # noqa: BLE001 - classified below
            if not _transient(e) and not _conflict(e):
                raise
            if attempt > retries:
                raise HubUnreachable(f"the commit failed {attempt} times: {_short(e)}; re-run `spa-vl publish` to "
                                     "finish this version (nothing is committed twice)") from e
            log(f"publish: commit attempt {attempt} failed ({_short(e)}); checking main and retrying")
            _sleep(backoff, attempt)
        try:
            _read_remote(api, plan)
        except Exception as e:  # noqa: BLE001
            if not _transient(e):
                raise
            continue  # main unknown: the next attempt's parent_commit check keeps it from landing twice
        _diff(plan)
        if plan.tag_commit is not None:
            raise PublishRefused(f"{plan.repo_id} got tag {plan.tag} from elsewhere while publishing")
        if not plan.upload and not plan.delete and plan.head is not None:
            log(f"publish: the commit landed despite the error (main at {plan.head[:12]}); not committing again")
            return plan.head, attempt, False


def _tag(api, repo_id: str, tag: str, commit: str, retries: int, backoff: float, log) -> None:
    """Create the tag on the version's commit; an existing tag is fine only if it already points there."""
    from huggingface_hub.errors import HfHubHTTPError

    def create():
        try:
            api.create_tag(repo_id, tag=tag, revision=commit, repo_type=REPO_TYPE, tag_message=f"spa-vl dataset {tag}")
        except HfHubHTTPError as e:
            if getattr(e.response, "status_code", None) != 409:
                raise
            # Exists: ours if an earlier attempt's reply was lost; anyone else's is never moved.
            refs = api.list_repo_refs(repo_id, repo_type=REPO_TYPE)
            where = next((t.target_commit for t in refs.tags if t.name == tag), None)
            if where != commit:
                raise PublishRefused(f"{repo_id} already has tag {tag} at {str(where)[:12]}, not at {commit[:12]}") from e

    _retry(create, retries, backoff, log, f"tag {tag}")


def _retry(fn, retries: int, backoff: float, log, what: str, command: str = "publish"):
    for attempt in range(1, retries + 2):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            if not _transient(e) or attempt > retries:
                raise
            log(f"{command}: {what} attempt {attempt} failed ({_short(e)}); retrying")
            _sleep(backoff, attempt)


def _transient(e: BaseException) -> bool:
    """Worth retrying: 5xx, 408 and 429 answers, dropped connections and timeouts (also when wrapped, as
    huggingface_hub wraps a failed LFS upload in a RuntimeError). Offline mode and bad URLs are not."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OfflineModeIsEnabled):
            return False
        if isinstance(e, HfHubHTTPError):
            status = getattr(e.response, "status_code", None)
            return status is None or status >= 500 or status in (408, 429)
        if isinstance(e, httpx2.UnsupportedProtocol):
            return False
        if isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return True
        e = e.__cause__
    return False


def _conflict(e: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    return isinstance(e, HfHubHTTPError) and getattr(e.response, "status_code", None) in (409, 412)


def _sleep(backoff: float, attempt: int) -> None:
    if backoff > 0:
        time.sleep(min(30.0, backoff * 2 ** (attempt - 1)) * (0.5 + random.random() / 2))


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    parts = str(repo_id).split("/")
    try:
        validate_repo_id(str(repo_id))
    except HFValidationError as e:
        raise DataError(f"not a valid repo id {repo_id!r}: {e}", field="repo_id") from None
    if len(parts) != 2 or not all(parts):
        raise DataError(f"repo id must look like 'namespace/name', not {repo_id!r}", field="repo_id")


# --- pull ------------------------------------------------------------------------------------------
@dataclass
class PullResult:
    repo_id: str
    revision: str | None
    out: Path
    version: str
    files: int
    bytes: int
    seconds: float

    def summary_line(self) -> str:
        return (f"pulled {self.repo_id}@{self.revision or 'main'} (version {self.version}) into {self.out}: "
                f"{self.files} files, {_mb(self.bytes)}, manifest checksums verified, {self.seconds:.1f} s")


class VerifyFailed(Exception):
    """A pulled file does not match manifest.json: exit code 1 (a failed check)."""


def pull(repo_id: str, out: str | Path, *, revision: str | None = None, overwrite: bool = False,
         token: str | None = None, retries: int = 2, backoff: float = 1.0,
         log: Callable[[str], None] | None = None) -> PullResult:
    """Download a version with ``snapshot_download`` and verify every file against ``manifest.json``.

    The revision is first resolved to its commit (so every file comes from one commit); a Hub that cannot
    be reached raises ``HubUnreachable`` before anything is written. Files land in ``.OUT.partial`` first
    (a re-run for the same repo and revision resumes there; another one starts afresh) and are renamed to
    ``OUT`` only once every checksum matches; a mismatch leaves ``OUT`` untouched and raises
    ``VerifyFailed``. Files that are not part of the dataset folder (the Hub's ``.gitattributes``,
    leftovers) are not kept. ``--overwrite`` replaces only a spa-vl dataset folder.
    """
    from huggingface_hub import HfApi, snapshot_download

    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.monotonic()
    _check_repo_id(repo_id)
    out = Path(out)
    mark = {"repo_id": repo_id, "revision": revision}
    prepare_output(out, kind="dataset", overwrite=overwrite, resumable=mark)
    partial = out.parent / f".{out.name}.partial"
    with hub_timeouts():
        commit = _resolve_commit(HfApi(token=token), repo_id, revision, retries, backoff, log)
        _claim_partial(partial, mark)
        snapshot_download(repo_id, repo_type=REPO_TYPE, revision=commit, local_dir=partial, token=token)
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # snapshot_download's resume metadata
    manifest = verify_manifest(partial)
    keep = {"README.md", CHANGELOG, TAXONOMY_FILE, "manifest.json", *manifest.get("files", {})}
    for p in sorted(partial.rglob("*")):
        rel = p.relative_to(partial).as_posix()
        if p.is_file() and rel not in keep and not (rel.split("/")[0] in PUBLISHED_DIRS and rel.count("/") == 1):
            p.unlink()  # .gitattributes, our mark, leftovers of an earlier pull
    sizes = [p.stat().st_size for p in partial.rglob("*") if p.is_file()]
    out.parent.mkdir(parents=True, exist_ok=True)
    swap_into_place(partial, out)
    return PullResult(repo_id, revision, out, str(manifest.get("version")), len(sizes), sum(sizes), time.monotonic() - t0)


def _resolve_commit(api, repo_id: str, revision: str | None, retries: int, backoff: float, log) -> str:
    """The commit ``revision`` points at; ``HubUnreachable`` when the Hub does not answer."""
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        return _retry(lambda: api.dataset_info(repo_id, revision=revision).sha, retries, backoff, log,
                      "read the repo", command="pull")
    except Exception as e:  # noqa: BLE001 - classified below
        if _transient(e) or isinstance(e, OfflineModeIsEnabled):
            raise HubUnreachable(f"the Hub could not be reached at {constants.ENDPOINT} ({_short(e)}); nothing was "
                                 "written") from e
        raise


def _claim_partial(partial: Path, mark: dict) -> None:
    """Make ``.OUT.partial`` this pull's: resume one of the same repo and revision, start afresh otherwise."""
    if partial.exists():
        try:
            held = json.loads((partial / PARTIAL_MARK).read_text())
        except (OSError, ValueError):
            held = None
        pid = held.get("pid") if isinstance(held, dict) else None
        if isinstance(pid, int) and pid != os.getpid() and process_alive(pid):
            raise DataError(f"another pull (pid {held['pid']}) is writing here; wait for it to finish", file=str(partial))
        if not isinstance(held, dict) or {k: held.get(k) for k in mark} != mark:
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / PARTIAL_MARK).write_text(json.dumps({**mark, "pid": os.getpid()}))


def verify_manifest(root: str | Path) -> dict:
    """Every file the manifest lists exists with its sha256 and byte count; ``VerifyFailed`` names the first that does not."""
    root = Path(root)
    manifest = read_manifest(root)
    for rel, entry in sorted(manifest.get("files", {}).items()):
        path = root / rel
        if not path.is_file():
            raise VerifyFailed(f"{rel}: listed in manifest.json but missing")
        if path.stat().st_size != entry.get("bytes"):
            raise VerifyFailed(f"{rel}: field bytes: {path.stat().st_size:,} bytes, manifest says {entry.get('bytes'):,}")
        if file_sha256(path) != entry.get("sha256"):
            raise VerifyFailed(f"{rel}: field sha256: sha256 differs from manifest.json")
    taxonomy = manifest.get("taxonomy")
    if isinstance(taxonomy, dict) and taxonomy.get("file"):  # folders that carry their taxonomy
        path = root / str(taxonomy["file"])
        if not path.is_file():
            raise VerifyFailed(f"{taxonomy['file']}: named in manifest.json but missing")
        if file_sha256(path) != taxonomy.get("sha256"):
            raise VerifyFailed(f"{taxonomy['file']}: field taxonomy.sha256: sha256 differs from manifest.json")
    return manifest
