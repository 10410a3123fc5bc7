"""Publish a dataset folder to the Hugging Face Hub as one commit plus a tag per version.

``publish`` refuses unless ``validate`` passes on the same ``DatasetFolder`` value and the version's tag
does not exist yet (a tag never moves). It compares the folder with the repo's ``main`` (one tree
listing, see ``builder.hub.plan``), uploads what differs and deletes what the folder no longer has, all
in **one commit**, then creates the tag ``vX.Y.Z`` on that commit. Faults are retried; after a crash,
re-running finds the commit already on ``main`` (same tree) and only adds the tag, so a version never
gets a second commit or a second tag::

    result = publish(DatasetFolder.open("out/spa_vl"), "org/SPA-VL")   # private and gated unless told otherwise
    result.commit, result.tag                                           # "3f2a...", "v0.2.0"

The token comes from ``HF_TOKEN`` or the ``huggingface_hub`` login (``hf auth login``); it is handed
to ``HfApi`` and never printed, logged or written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.errors import DataError
from builder.format.manifest import DatasetFolder, parse_version
from builder.hub.common import REPO_TYPE, HubUnreachable, check_repo_id, hub_retry, hub_timeouts, mb, short, \
    stderr_log, transient
from builder.hub.plan import Plan, diff, publishable_files, read_remote, refusal, version_of
from builder.retry import backoff_seconds


class PublishRefused(Exception):
    """Publishing would break a rule (validation failed, version already published): exit code 1."""


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
        return (f"published {self.repo_id} {self.tag}: {self.files} files ({how}, {mb(self.bytes_uploaded)} sent), "
                f"commit {self.commit[:12]}, {self.attempts} attempt(s), {self.seconds:.1f} s")


def publish(
    folder: DatasetFolder | str | Path,
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
    """Publish ``folder`` to ``repo_id``; returns the plan on ``dry_run``. See the module docstring.

    Order: every check that can refuse runs before anything is written, locally or on the Hub:
    repo id, manifest version, token, ``validate``, the repo's tags (the version must be new and above
    every published one). Then the card is re-rendered for the repo, the repo created (private and
    gated by default) and the version committed and tagged.
    """
    from huggingface_hub import HfApi, get_token

    from builder.format.history import record_ids  # pyarrow
    from builder.validate.run import validate  # pyarrow, datasets

    log, t0 = log or stderr_log, time.monotonic()
    check_repo_id(repo_id)
    folder = DatasetFolder.of(folder)
    version = ".".join(map(str, parse_version(folder.manifest.get("version", ""))))
    token = token or get_token()
    if token is None and not dry_run:
        raise DataError("no Hugging Face token: set HF_TOKEN or run `hf auth login`", field="token")
    report = validate(folder, full_decode=full_decode, progress=False)
    if not report.ok and not dry_run:
        raise PublishRefused(f"validation failed; fix the folder before publishing:\n{report.format_table()}")

    with hub_timeouts():
        api = HfApi(token=token)
        plan = _plan(api, folder, repo_id, version, dry_run, retries, backoff, log)
        refused = refusal(plan)
        if dry_run:
            log(_dry_run_text(plan, report, refused, private, gated))
            plan.refusal = refused or ("validation fails" if not report.ok else None)
            return plan
        if refused:
            raise PublishRefused(refused)
        folder = _render_for(folder, repo_id, plan)
        created = _create_repo(api, plan, private, retries, backoff, log) if not plan.repo_exists else False
        if gated:
            _ensure_gated(api, plan, created, retries, backoff, log)
        commit, attempts, resumed = _commit_version(api, plan, retries, backoff, log)
        _tag(api, repo_id, plan.tag, commit, retries, backoff, log)

    record_ids(folder, version)  # the baseline of the next `spa-vl version`
    return PublishResult(repo_id, version, plan.tag, commit, len(plan.files), 0 if resumed else len(plan.upload),
                         0 if resumed else len(plan.delete), 0 if resumed else plan.bytes_upload, created, resumed,
                         attempts, time.monotonic() - t0)


def _plan(api, folder: DatasetFolder, repo_id: str, version: str, dry_run: bool, retries: int, backoff: float,
          log) -> Plan:
    """The plan against the repo as it is; a dry run notes a Hub it could not read instead of failing."""
    plan = Plan(repo_id, version, f"v{version}", publishable_files(folder))
    try:
        hub_retry(lambda: read_remote(api, plan), retries, backoff, log, "publish: read the repo")
    except Exception as e:  # noqa: BLE001 - in a dry run, say what could not be read
        if not dry_run:
            raise HubUnreachable(f"cannot read {repo_id} on the Hub: {short(e)}") from e
        plan.repo_exists, plan.note = None, short(e)
    diff(plan)
    return plan


def _dry_run_text(plan: Plan, report, refused: str | None, private: bool, gated: bool) -> str:
    extra = []
    if not report.ok:
        extra.append("validation FAILS: publish would refuse\n" + report.format_table())
    if refused:
        extra.append(f"publish would refuse: {refused}")
    extra.append("README.md and manifest.json are re-rendered for this repo before the upload "
                 "(the load examples name it), so their sizes may differ by a few bytes")
    return plan.describe(private=private, gated=gated) + "\n  " + "\n  ".join(extra)


def _render_for(folder: DatasetFolder, repo_id: str, plan: Plan) -> DatasetFolder:
    """Re-render the card for the repo (its load examples name this repo and version) and plan its files again."""
    from dataset_card.card import render_folder_card

    folder = render_folder_card(folder, repo_id=repo_id).folder
    plan.files = publishable_files(folder)
    diff(plan)
    return folder


def _create_repo(api, plan: Plan, private: bool, retries: int, backoff: float, log) -> bool:
    """Create the repo and read it again; True if this call created it (False if it appeared meanwhile)."""
    from huggingface_hub.errors import HfHubHTTPError

    def create() -> bool:
        try:
            api.create_repo(plan.repo_id, repo_type=REPO_TYPE, private=private, exist_ok=False)
            return True
        except HfHubHTTPError as e:
            if getattr(e.response, "status_code", None) == 409:
                return False
            raise

    created = hub_retry(create, retries, backoff, log, "publish: create repo")
    log(f"publish: {'created' if created else 'found'} {plan.repo_id} ({'private' if private else 'public'})")
    hub_retry(lambda: read_remote(api, plan), retries, backoff, log, "publish: read the repo")
    diff(plan)
    return created


def _ensure_gated(api, plan: Plan, created: bool, retries: int, backoff: float, log) -> None:
    """Gate a repo this publish created, or one that has no version yet (a publish that crashed between
    creating and gating it). An existing repo with published versions keeps its settings."""
    info = hub_retry(lambda: api.dataset_info(plan.repo_id), retries, backoff, log, "publish: read repo settings")
    if getattr(info, "gated", False):
        return
    has_versions = any(version_of(t) is not None for t in plan.tags)
    if created or not has_versions:
        hub_retry(lambda: api.update_repo_settings(plan.repo_id, repo_type=REPO_TYPE, gated="auto"), retries, backoff,
                  log, "publish: gate repo")
        log(f"publish: {plan.repo_id} gated (users accept the card's prompt before downloading)")
    else:
        log(f"publish: warning: {plan.repo_id} is not gated and already has published versions; its settings are "
            "left as they are (gate it on the Hub if it should be)")


def _commit_version(api, plan: Plan, retries: int, backoff: float, log) -> tuple[str, int, bool]:
    """One commit with every change; retried. Before each retry, main is compared with the folder again,
    so a commit that landed although the client saw an error is found and never made twice."""
    if plan.in_place:
        log(f"publish: main ({plan.head[:12]}) already holds this version's files; adding the tag only")
        return plan.head, 0, True
    attempt = 0
    while True:
        attempt += 1
        try:
            return _commit(api, plan, attempt, log), attempt, False
        except Exception as e:  # noqa: BLE001 - classified below
            if not transient(e) and not _conflict(e):
                raise
            if attempt > retries:
                raise HubUnreachable(f"the commit failed {attempt} times: {short(e)}; re-run `spa-vl publish` to "
                                     "finish this version (nothing is committed twice)") from e
            log(f"publish: commit attempt {attempt} failed ({short(e)}); checking main and retrying")
            time.sleep(backoff_seconds(backoff, attempt))
        try:
            read_remote(api, plan)
        except Exception as e:  # noqa: BLE001
            if not transient(e):
                raise
            continue  # main unknown: the next attempt's parent_commit check keeps it from landing twice
        diff(plan)
        if plan.tag_commit is not None:
            raise PublishRefused(f"{plan.repo_id} got tag {plan.tag} from elsewhere while publishing")
        if plan.in_place:
            log(f"publish: the commit landed despite the error (main at {plan.head[:12]}); not committing again")
            return plan.head, attempt, False


def _commit(api, plan: Plan, attempt: int, log) -> str:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops = [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=f.content) for f in plan.upload]
    ops += [CommitOperationDelete(path_in_repo=p) for p in plan.delete]
    log(f"publish: commit {plan.commit_message!r}: {len(plan.upload)} files to upload ({mb(plan.bytes_upload)}), "
        f"{len(plan.delete)} to delete (attempt {attempt})")
    info = api.create_commit(plan.repo_id, ops, commit_message=plan.commit_message, repo_type=REPO_TYPE,
                             parent_commit=plan.head,
                             commit_description=f"spa-vl dataset version {plan.version}; see CHANGELOG.md.")
    return info.oid


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

    hub_retry(create, retries, backoff, log, f"publish: tag {tag}")


def _conflict(e: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    return isinstance(e, HfHubHTTPError) and getattr(e.response, "status_code", None) in (409, 412)
