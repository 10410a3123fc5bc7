"""What a publish would do: the folder's files against the repo's ``main``, and why it may refuse.

One tree listing of ``main`` tells which files are new or changed (by git blob id, or LFS sha256) and
which the folder no longer has; the repo's tags tell whether this version may be published::

    plan = Plan("org/SPA-VL", "0.2.0", "v0.2.0", publishable_files(folder))
    read_remote(api, plan); diff(plan)
    plan.upload, plan.delete, refusal(plan)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from builder.errors import DataError
from builder.files import file_digest
from builder.format.layout import CHANGELOG, MANIFEST, README, TAXONOMY_FILE
from builder.format.manifest import DatasetFolder, parse_version
from builder.hub.common import PUBLISHED_DIRS, REPO_TYPE, mb

KEEP_REMOTE = (".gitattributes",)  # files the Hub manages; never deleted by a publish


@dataclass
class LocalFile:
    path: str  # posix path in the repo
    local: Path
    size: int
    sha256: str
    git_oid: str  # git blob sha1, which the Hub reports for regular (non-LFS) files
    data: bytes | None = None  # the bytes, for a file held in memory (manifest.json): not read from disk again

    @classmethod
    def of(cls, root: Path, rel: str) -> "LocalFile":
        local = root / rel
        if not local.is_file():
            raise DataError("file missing from the dataset folder", file=str(local))
        size = local.stat().st_size
        return cls(rel, local, size, file_digest(local), file_digest(local, "sha1", prefix=b"blob %d\0" % size))

    @classmethod
    def held(cls, root: Path, rel: str, data: bytes) -> "LocalFile":
        oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return cls(rel, root / rel, len(data), hashlib.sha256(data).hexdigest(), oid, data)

    @property
    def content(self) -> str | bytes:
        """What to upload: the bytes held, or the file's path."""
        return self.data if self.data is not None else str(self.local)


def publishable_files(folder: DatasetFolder | str | Path) -> list[LocalFile]:
    """README.md, CHANGELOG.md, manifest.json, taxonomy.yaml, every file the manifest lists, and the card's plots
    and the review. Anything else in the folder (``.spa_vl/`` history, editor files) stays local."""
    folder = DatasetFolder.of(folder)
    root = folder.root
    paths = [README, *folder.files]
    for name in (CHANGELOG, TAXONOMY_FILE):
        if (root / name).is_file():
            paths.append(name)
    for d in PUBLISHED_DIRS:
        paths += [p.relative_to(root).as_posix() for p in sorted((root / d).glob("*")) if p.is_file()]
    files = [LocalFile.of(root, rel) for rel in sorted(set(paths) - {MANIFEST})]
    return sorted([*files, LocalFile.held(root, MANIFEST, folder.raw)], key=lambda f: f.path)


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

    @property
    def in_place(self) -> bool:
        """``main`` already holds exactly the folder's files."""
        return not self.upload and not self.delete and self.head is not None

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
        lines.append(f"  files: {len(self.files)} ({mb(self.bytes_total)}); to upload: {len(self.upload)} "
                     f"({mb(self.bytes_upload)}); to delete: {len(self.delete)}")
        lines += [f"    + {f.path}  {f.size:,} B" for f in self.upload]
        lines += [f"    - {p}" for p in self.delete]
        lines.append(f"  commit message: {self.commit_message!r} (one commit)")
        lines.append(f"  tag: {self.tag} on that commit")
        return "\n".join(lines)


def read_remote(api, plan: Plan) -> None:
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


def diff(plan: Plan) -> None:
    """What to upload (new or changed against main) and what to delete (on main, not in the folder)."""
    local = {f.path for f in plan.files}
    plan.upload = [f for f in plan.files if not _same(f, plan.remote.get(f.path))]
    plan.delete = sorted(p for p in plan.remote if p not in local and p not in KEEP_REMOTE)


def _same(local: LocalFile, remote) -> bool:
    if remote is None or getattr(remote, "size", None) != local.size:
        return False
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        return getattr(lfs, "sha256", None) == local.sha256
    return getattr(remote, "blob_id", None) == local.git_oid


def refusal(plan: Plan) -> str | None:
    """Why this version may not be published, if it may not: its tag exists, or a later version is out."""
    if plan.tag_commit is not None:
        return (f"{plan.repo_id} already has tag {plan.tag} (commit {plan.tag_commit[:12]}); a published version never "
                "changes: bump it with `spa-vl version DIR --bump patch|minor|major`")
    published = [(v, name) for name in plan.tags if (v := version_of(name)) is not None]
    if published and max(published)[0] > parse_version(plan.version):
        return (f"{plan.repo_id} already has {max(published)[1]}, later than {plan.tag}: publishing would take main back; "
                "bump the version above it")
    return None


def version_of(tag: str) -> tuple[int, int, int] | None:
    """The version a tag names (``v1.2.3``), None for a tag that is not a version."""
    try:
        return parse_version(tag)
    except DataError:
        return None
