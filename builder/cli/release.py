"""`spa-vl` commands that check and release a dataset folder: validate, card, version, publish, pull, review."""

from __future__ import annotations

import json as _json
import sys
import time
from pathlib import Path

from builder.errors import DataError


class ReleaseCommands:
    """A maintainer's commands on a finished folder: check it, render its card, version, publish, pull, review."""

    def validate(self, dir: str, json: bool = False, full_decode: bool = False, load_configs: bool = True,
                 progress: bool = True):
        """Check a dataset folder before publishing it; exit 1 when any check fails.

        Checks (each counted, with the first offending file/row/field): manifest checksums, bytes and
        rows; schema; labels inside the taxonomy and matching their folder; images decode within pixel and
        byte limits; no empty text; chosen != rejected; duplicate rows; the same image in two splits;
        the card's dataset_info counts; every config loads with `datasets`. Labels are checked against the
        taxonomy the folder carries (DIR/taxonomy.yaml, written by the command that built it).

        Example:
          spa-vl validate out/spa_vl
          spa-vl validate out/spa_vl --full_decode --json > report.json

        Args:
          dir: the dataset folder.
          json: print the report as JSON instead of a table.
          full_decode: decode every image's pixels (default: header check, much faster).
          load_configs: also load every config with `datasets` (the slowest check).
          progress: show a progress bar.
        """
        from builder.format.manifest import DatasetFolder
        from builder.validate import validate

        if not Path(dir).is_dir():
            raise DataError("no such dataset folder", file=dir)
        report = validate(DatasetFolder.open(dir, lenient=True), full_decode=full_decode, load_configs=load_configs,
                          progress=progress)
        print(_json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if json else report.format_table())
        if not report.ok:
            sys.exit(1)

    def card(self, dir: str, repo_id: str | None = None):
        """Render the folder's README.md (YAML metadata + prose) and its plots under assets/.

        Everything comes from the folder itself; re-rendering an unchanged folder changes nothing.

        Example:
          spa-vl card out/spa_vl
          spa-vl card out/spa_vl --repo_id my-org/SPA-VL   # load examples name the repo

        Args:
          dir: the dataset folder.
          repo_id: the Hub repo the card's examples load from (remembered in manifest.json).
        """
        from builder.format.manifest import DatasetFolder
        from dataset_card.card import render_folder_card

        if not Path(dir).is_dir():
            raise DataError("no such dataset folder", file=dir)
        result = render_folder_card(DatasetFolder.open(dir), repo_id=repo_id)
        changed = ", ".join(result.changed) if result.changed else "nothing (already up to date)"
        print(f"card: {len(result.files)} files rendered, changed: {changed}")

    def version(self, dir: str, bump: str = "patch", previous: str | None = None):
        """Bump the folder's semantic version; add a CHANGELOG.md entry of rows added/removed per config and split.

        Rows are compared by id with the previous version: --previous FOLDER if given, else the row ids
        recorded at this folder's last `version` or `publish` (kept across rebuilds with --overwrite).

        Example:
          spa-vl version out/spa_vl --bump minor
          spa-vl version out/spa_vl_v2 --bump minor --previous out/spa_vl_v1

        Args:
          dir: the dataset folder.
          bump: patch, minor or major.
          previous: a dataset folder of the previous version to compare with.
        """
        from builder.format.manifest import DatasetFolder
        from builder.versioning import bump as do_bump

        r = do_bump(DatasetFolder.open(dir), bump, previous=previous)
        if r.finished_interrupted:
            print(f"version: an earlier bump to {r.version} had crashed after writing the manifest; it is finished now "
                  f"(row ids recorded, card rendered). Run again to bump further.")
            return
        print(f"version: {r.previous_version or '(none recorded)'} -> {r.version}: +{r.added:,} / -{r.removed:,} rows "
              f"(baseline: {r.baseline}); CHANGELOG.md, manifest.json and README.md updated")

    def publish(self, dir: str, repo_id: str, private: bool = True, gated: bool = True, dry_run: bool = False,
                full_decode: bool = False, retries: int = 5):
        """Publish a validated folder to the Hub: one commit for the version, then the tag vX.Y.Z.

        Refuses (exit 1) unless `spa-vl validate` passes and the tag does not exist yet. Creates the
        repo if needed, private and gated by default (--no-private / --no-gated to change). Faults are
        retried; re-running after a crash finishes the same version without a second commit or tag.
        The token comes from HF_TOKEN or `hf auth login` and is never printed. --dry_run exits 1 when
        the real publish would refuse or the Hub could not be read.

        Example:
          spa-vl publish out/spa_vl my-org/SPA-VL --dry_run
          HF_TOKEN=hf_... spa-vl publish out/spa_vl my-org/SPA-VL
          spa-vl publish out/spa_vl my-org/SPA-VL --no-private --no-gated

        Args:
          dir: the dataset folder.
          repo_id: namespace/name of the dataset repo.
          private: create the repo private (only when it does not exist yet).
          gated: gate access behind the card's prompt (only when the repo is created).
          dry_run: print the plan (files, bytes, commit message, tag) and change nothing.
          full_decode: validate with a full image decode.
          retries: attempts per Hub call beyond the first.
        """
        from builder.format.manifest import DatasetFolder
        from builder.hub import PublishRefused, publish

        try:
            result = publish(DatasetFolder.open(dir), repo_id, private=private, gated=gated, dry_run=dry_run,
                             full_decode=full_decode, retries=retries)
        except PublishRefused as e:
            print(f"spa-vl publish: refused: {e}", file=sys.stderr)
            sys.exit(1)
        if dry_run:
            if result.repo_exists is None:
                print(f"spa-vl publish: the Hub could not be read ({result.note}); the plan is incomplete",
                      file=sys.stderr)
                sys.exit(1)
            if result.refusal:
                sys.exit(1)  # the plan says the real publish would refuse
            return
        print(result.summary_line())

    def pull(self, repo_id: str, out: str, revision: str | None = None, overwrite: bool = False):
        """Download a published version and verify every file against its manifest.json checksums.

        Exit 1 when the Hub cannot be reached (nothing is written) or a file does not match.

        Example:
          spa-vl pull my-org/SPA-VL copy --revision v0.2.0
          python -c "from datasets import load_dataset; print(load_dataset('copy', 'malicious_use'))"

        Args:
          repo_id: namespace/name of the dataset repo.
          out: the folder to write (must be empty or absent unless --overwrite).
          revision: a tag such as v0.2.0, a branch or a commit (default: main).
          overwrite: replace an existing spa-vl dataset folder (nothing else).
        """
        from builder.hub import VerifyFailed, pull

        try:
            print(pull(repo_id, out, revision=revision, overwrite=overwrite).summary_line())
        except VerifyFailed as e:
            print(f"spa-vl pull: verification failed, nothing written to {out}: {e}", file=sys.stderr)
            sys.exit(1)

    def review(self, dir: str, report: bool = False, n: int | None = None, seed: int | None = None,
               config: str | None = None, host: str = "127.0.0.1", port: int = 8765, open: bool = False,
               resamples: int = 2000):
        """People check the judge: a local page to review a blind sample of pairs, then the agreement report.

        The page shows each sampled pair's image, question and two answers in a random A/B order (never
        the judge's choice or the models); the reviewer picks the better one (harmless first, then helpful)
        or a tie, may mark answers unsafe and leave a note, all from the keyboard. The sample and every
        verdict live in DIR/review/, each verdict saved the moment it is given; reopening the page under
        the same name resumes. --report writes DIR/review/report.json, agreement.png, disagreements.md and
        the card's "Human validation" section: judge vs people (agreement, Cohen's kappa, bootstrap
        intervals, per domain and category), reviewers vs each other, position bias, unsafe labels.

        Example:
          spa-vl review out/spa_vl                  # serves http://127.0.0.1:8765/ until Ctrl-C
          spa-vl review out/spa_vl --n 200 --seed 1 --config malicious_use --open
          spa-vl review runs/r1                     # a run directory, before `spa-vl build`
          spa-vl review out/spa_vl --report

        Args:
          dir: a dataset folder, or a run directory before `spa-vl build`.
          report: compute the report from the verdicts given so far instead of serving the page.
          n: pairs in the sample (a new sample: 500; an existing one: left out, or the same).
          seed: the sample's seed, also of the A/B order and the bootstrap (a new sample: 0).
          config: sample one domain config only (a new sample: every domain).
          host: the address to serve on (127.0.0.1: this machine only).
          port: the port to serve on (0: any free port).
          open: open the page in the default web browser.
          resamples: bootstrap resamples for the report's intervals.
        """
        if not Path(dir).is_dir():
            raise DataError("no such folder", file=dir)
        if report:
            given = [name for name, value in (("n", n), ("seed", seed), ("config", config)) if value is not None]
            if given:
                raise DataError("--report uses the sample drawn already; leave out --" + ", --".join(given), field=given[0])
            _review_report(dir, resamples)
        else:
            _serve_review(dir, n=n, seed=seed, config=config, host=host, port=port, open_page=open)


def _review_report(dir: str, resamples: int) -> None:
    """`spa-vl review DIR --report`: the report from the verdicts given so far, and its summary."""
    from builder.review import make_report
    from builder.review.render import report_summary

    t0 = time.perf_counter()
    result = make_report(dir, resamples=resamples)
    print(report_summary(result.report))
    print(f"review report: {time.perf_counter() - t0:.1f}s -> {Path(dir) / 'review'}"
          + ("; card re-rendered" if result.card_rendered else ""))


def _serve_review(dir: str, *, n: int | None, seed: int | None, config: str | None, host: str, port: int,
                  open_page: bool) -> None:
    """`spa-vl review DIR`: serve the review page until Ctrl-C, then say how many verdicts were saved."""
    from builder.review import ReviewServer, open_review

    t0 = time.perf_counter()
    server = ReviewServer(host=host, port=port)  # a busy port fails before a sample is drawn
    try:
        session = open_review(dir, n=n, seed=seed, config=config)
    except BaseException:
        server.close()
        raise
    print(f"review: {len(session.pairs):,} pairs ({'new sample' if session.new_sample else 'sample continued'}, "
          f"seed {session.sample.seed}) at {server.url}  (Ctrl-C to stop)")
    if open_page:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.serve_forever(session)
    except KeyboardInterrupt:
        pass  # uvicorn has shut down; every verdict is on disk already
    finally:
        session.close()
    latest = session.store.latest()
    print(f"review: {session.saved:,} verdicts saved in {time.perf_counter() - t0:.0f}s; {len(latest):,} in all by "
          f"{len({who for who, _ in latest})} reviewer(s) -> {session.store.path}")
