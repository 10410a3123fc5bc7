"""Pull a published version back: ``snapshot_download`` of one commit, every file checked against its manifest.

    pull("org/SPA-VL", "copy", revision="v0.2.0")   # PullResult(version="0.2.0", files=..., ...)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.errors import DataError
from builder.files import file_digest, process_alive, swap_into_place
from builder.format.layout import CHANGELOG, MANIFEST, PARTIAL_MARK, README, TAXONOMY_FILE
from builder.format.manifest import DatasetFolder
from builder.format.output import partial_folder, prepare_output
from builder.hub.common import PUBLISHED_DIRS, REPO_TYPE, HubUnreachable, check_repo_id, hub_retry, hub_timeouts, mb, \
    short, stderr_log, transient


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
                f"{self.files} files, {mb(self.bytes)}, manifest checksums verified, {self.seconds:.1f} s")


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

    log, t0 = log or stderr_log, time.monotonic()
    check_repo_id(repo_id)
    out = Path(out)
    mark = {"repo_id": repo_id, "revision": revision}
    prepare_output(out, kind="dataset", overwrite=overwrite, resumable=mark)
    partial = partial_folder(out)
    with hub_timeouts():
        commit = _resolve_commit(HfApi(token=token), repo_id, revision, retries, backoff, log)
        _claim_partial(partial, mark)
        snapshot_download(repo_id, repo_type=REPO_TYPE, revision=commit, local_dir=partial, token=token)
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # snapshot_download's resume metadata
    folder = verify_manifest(partial)
    keep = {README, CHANGELOG, TAXONOMY_FILE, MANIFEST, *folder.files}
    for p in sorted(partial.rglob("*")):
        rel = p.relative_to(partial).as_posix()
        if p.is_file() and rel not in keep and not (rel.split("/")[0] in PUBLISHED_DIRS and rel.count("/") == 1):
            p.unlink()  # .gitattributes, our mark, leftovers of an earlier pull
    sizes = [p.stat().st_size for p in partial.rglob("*") if p.is_file()]
    out.parent.mkdir(parents=True, exist_ok=True)
    swap_into_place(partial, out)
    return PullResult(repo_id, revision, out, str(folder.manifest.get("version")), len(sizes), sum(sizes),
                      time.monotonic() - t0)


def _resolve_commit(api, repo_id: str, revision: str | None, retries: int, backoff: float, log) -> str:
    """The commit ``revision`` points at; ``HubUnreachable`` when the Hub does not answer."""
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        return hub_retry(lambda: api.dataset_info(repo_id, revision=revision).sha, retries, backoff, log,
                         "pull: read the repo")
    except Exception as e:  # noqa: BLE001 - classified below
        if transient(e) or isinstance(e, OfflineModeIsEnabled):
            raise HubUnreachable(f"the Hub could not be reached at {constants.ENDPOINT} ({short(e)}); nothing was "
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


def verify_manifest(folder: DatasetFolder | str | Path) -> DatasetFolder:
    """Every file the manifest lists exists with its sha256 and byte count, and so does the taxonomy file it
    names; ``VerifyFailed`` names the first that does not. Returns the folder."""
    folder = DatasetFolder.of(folder, lenient=True)  # a taxonomy file that differs is reported below, as such
    if MANIFEST in folder.problems:
        raise folder.problems[MANIFEST]
    for rel, entry in sorted(folder.files.items()):
        path = folder.root / rel
        if not path.is_file():
            raise VerifyFailed(f"{rel}: listed in manifest.json but missing")
        if path.stat().st_size != entry.get("bytes"):
            raise VerifyFailed(f"{rel}: field bytes: {path.stat().st_size:,} bytes, manifest says {entry.get('bytes'):,}")
        if file_digest(path) != entry.get("sha256"):
            raise VerifyFailed(f"{rel}: field sha256: sha256 differs from manifest.json")
    taxonomy = folder.manifest.get("taxonomy")
    if isinstance(taxonomy, dict) and taxonomy.get("file"):  # folders that carry their taxonomy
        path = folder.root / str(taxonomy["file"])
        if not path.is_file():
            raise VerifyFailed(f"{taxonomy['file']}: named in manifest.json but missing")
        if file_digest(path) != taxonomy.get("sha256"):
            raise VerifyFailed(f"{taxonomy['file']}: field taxonomy.sha256: sha256 differs from manifest.json")
    return folder
