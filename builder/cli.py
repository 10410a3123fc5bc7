"""The `spa-vl` command line (python-fire). Every command's --help shows an example.

Exit codes: 0 success, 1 a check or job failed, 2 bad usage or bad input.
"""

from __future__ import annotations

import json as _json
import os
import signal
import sys
import time
from pathlib import Path

import fire

from builder.errors import DataError
from builder.failures import Terminated, environment_failure, hub_failure, on_sigterm
from builder.taxonomy import Taxonomy


class CLI:
    """spa-vl: the SPA-VL safety preference dataset, its tooling and its trainers.

    Examples:
      spa-vl taxonomy
      spa-vl fixture out/fx --rows_per_domain 300
      spa-vl import_upstream sqrti/SPA-VL spa_vl
      spa-vl configs
      spa-vl generate pipeline --run_dir runs/r1 --limit 12
      spa-vl build runs/r1 out/spa_vl_v2
      spa-vl validate out/spa_vl_v2
      spa-vl card out/spa_vl_v2
      spa-vl version out/spa_vl_v2 --bump minor
      spa-vl publish out/spa_vl_v2 my-org/SPA-VL --dry_run
      spa-vl pull my-org/SPA-VL copy --revision v0.2.0
      spa-vl train dpo --config llava-1.5-7b-lora --dataset out/spa_vl
      spa-vl evaluate runs/dpo out/spa_vl --judge judge --out runs/eval
      spa-vl demo demo_out
    """

    def taxonomy(self, json: bool = False, taxonomy: str | None = None):
        """Print the harm taxonomy as a tree with counts (provisional subcategories marked *).

        Example:
          spa-vl taxonomy
          spa-vl taxonomy --json > taxonomy.json
          spa-vl taxonomy --taxonomy my_taxonomy.yaml

        Args:
          json: print JSON instead of the tree.
          taxonomy: a taxonomy YAML file of your own (default: the shipped builder/taxonomy.yaml).
        """
        tax = Taxonomy.load(taxonomy)
        print(_json.dumps(tax.to_dict(), indent=2, ensure_ascii=False) if json else tax.tree())

    def fixture(
        self,
        out: str,
        rows_per_domain: int = 30,
        eval_rows: int = 10,
        layout: str = "spa_vl",
        seed: int = 0,
        image_size: int = 64,
        texture: bool = False,
        taxonomy: str | None = None,
        overwrite: bool = False,
        meta_in: str = "zip",
    ):
        """Write a synthetic dataset (PIL-drawn images, template text) for tests and demos.

        Every image carries its three question types (easy, hardq, hards) and sits in one split; the
        texts carry upstream's quirks (leading spaces, quotes, "\\n\\n"). From 120 rows per domain
        on, every one of the 53 class paths has train images.

        Example:
          spa-vl fixture out/fx --rows_per_domain 300 --eval_rows 20
          spa-vl fixture out/up --layout upstream --rows_per_domain 120   # the sqrti/SPA-VL layout, for import_upstream
          spa-vl fixture out/up2 --layout upstream --meta_in tree        # train/meta.json beside train.zip

        Args:
          out: the folder to write (must be empty or absent unless --overwrite).
          rows_per_domain: preference rows per harm domain, rounded up to whole images (3 rows each).
          eval_rows: rows in each of test/harm and test/help.
          layout: spa_vl (our dataset folder) or upstream (sqrti/SPA-VL's files, train/meta.json and train.zip).
          seed: the same seed gives byte-identical files.
          image_size: image side in pixels.
          texture: add photo-like noise (realistic JPEG sizes: ~45 kB at 384 px).
          taxonomy: a taxonomy YAML file of your own.
          overwrite: replace an existing folder.
          meta_in: upstream layout only: train/meta.json inside train.zip (zip) or as a file of the tree (tree).
        """
        from builder.dev.fixture import LAYOUTS, META_PLACES, write_fixture

        if layout not in LAYOUTS:
            raise DataError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}", field="layout")
        if meta_in not in META_PLACES:
            raise DataError(f"--meta_in must be one of {', '.join(META_PLACES)}, got {meta_in!r}", field="meta_in")
        if meta_in != "zip" and layout != "upstream":
            raise DataError("--meta_in applies to --layout upstream only", field="meta_in")
        t0 = time.perf_counter()
        result = write_fixture(
            out, rows_per_domain=rows_per_domain, eval_rows=eval_rows, layout=layout, seed=seed,
            image_size=image_size, texture=texture, taxonomy=Taxonomy.load(taxonomy), overwrite=overwrite,
            meta_in=meta_in,
        )
        rows = sum(result.values()) if isinstance(result, dict) else result.total_rows
        print(f"fixture: {rows:,} rows ({layout} layout) in {time.perf_counter() - t0:.1f}s -> {out}")

    def import_upstream(
        self,
        src: str,
        out: str,
        revision: str | None = None,
        class_map: str | None = None,
        taxonomy: str | None = None,
        overwrite: bool = False,
        meta: str | None = None,
        match_bare_names: bool = False,
        progress: bool = True,
    ):
        """Convert the upstream sqrti/SPA-VL layout (a folder or that Hub repo) into a per-domain dataset folder.

        Train rows (upstream gives them no labels) take the class path of their entry in train/meta.json
        (entry k for image_name k.jpg, found in the repo tree, inside train.zip, or given with --meta) when
        its question, chosen and rejected equal the row's; rows left then get theirs from the image tree of
        train.zip by image hash, then from --class_map. Rows that none of these label are counted, with
        the reason, and kept in the default config only. Every distinct image is checked (a JPEG cut short
        is refused), archives are checked for zip bombs before any member is read, and row counts in
        equal row counts out, per split. The last line: rows per split, time, rows labelled per method.

        Example:
          spa-vl import_upstream sqrti/SPA-VL spa_vl
          spa-vl import_upstream ~/data/SPA-VL out/spa_vl --meta ~/data/SPA-VL/train/meta.json
          spa-vl import_upstream sqrti/SPA-VL out/spa_vl --revision main --class_map labels.csv

        Args:
          src: a local folder in the upstream layout, or a Hub dataset repo id.
          out: the dataset folder to write (must be empty or absent unless --overwrite).
          revision: Hub branch, tag or commit (with a repo id).
          class_map: CSV/JSON(L) with image_sha256 or image_name, and class1, class2, class3.
          taxonomy: a taxonomy YAML file of your own (if upstream labels differ from the shipped one).
          overwrite: replace an existing folder.
          meta: a meta.json file to take train labels from, instead of the one in SRC.
          match_bare_names: also label a row whose image_name is a file name found once in the image tree
            (mislabels on the real layout, where image_name is a meta.json index).
          progress: show a progress bar.
        """
        from builder.upstream.importer import import_upstream

        for name, path in (("class_map", class_map), ("meta", meta)):
            if path is not None and not Path(path).is_file():
                raise DataError("file not found", file=str(path), field=name)
        tax = Taxonomy.load(taxonomy)
        report = import_upstream(src, out, revision=revision, class_map=class_map, taxonomy=tax, overwrite=overwrite,
                                 meta=meta, match_bare_names=match_bare_names, progress=progress)
        print(report.line())

    def generate(
        self,
        config: str,
        run_dir: str,
        executor: str = "local",
        limit: int | None = None,
        until: str = "preferences",
        progress: bool = True,
    ):
        """Run the SPA-VL pipeline (images -> questions -> responses -> preferences) into a run directory.

        CONFIG is a shipped recipe by name (`spa-vl configs` lists them) or your own YAML file. The whole
        config is checked, and every endpoint resolved, before the first request. Every model call is
        cached in RUN_DIR/run.sqlite: re-running the same command after a crash resumes and re-sends
        nothing that succeeded; changing one prompt re-runs only what depends on it. Writes
        RUN_DIR/summary.json (units done/failed, why they failed, requests, tokens and cost per model).
        Exit code 1 when some work units or subcategories failed (re-run to retry them), 2 on a bad config.

        Example:
          export OPENAI_API_KEY=...
          spa-vl generate pipeline --run_dir runs/r1 --limit 12        # the paper's recipe on OpenAI
          SPA_VL_MODEL=Qwen/Qwen2.5-VL-7B-Instruct OPENAI_BASE_URL=http://localhost:8000/v1 \\
            spa-vl generate local-server --run_dir runs/r1                # every role on one local vLLM/SGLang/Ollama model
          spa-vl generate pipeline --run_dir runs/r1 --until questions    # one stage at a time
          spa-vl configs copy pipeline my.yaml                             # then: spa-vl generate my.yaml --run_dir ...
          RAY_ADDRESS=auto spa-vl generate my.yaml --run_dir /shared/runs/r1 --executor ray

        Args:
          config: a shipped recipe's name (pipeline, local-server, local) or a path to a run YAML file.
          run_dir: where the run store, config snapshot and summary.json live (created or resumed).
          executor: local (asyncio in this process) or ray (ray.init(); RAY_ADDRESS for a cluster).
          limit: at most this many work units (images), spread over the domains, for a quick try.
          until: the last stage to run: images, questions, responses or preferences.
          progress: show progress bars.
        """
        from builder.generate.pipeline import generate, summary_line

        summary = generate(config, run_dir, executor=executor, limit=limit, until=until, progress=progress)
        print(summary_line(summary))
        if summary["units"]["failed"] or summary["images"].get("failures"):
            sys.exit(1)

    def build(self, run_dir: str, out: str, overwrite: bool = False, progress: bool = True):
        """Turn a run directory into a dataset folder (per-domain configs, test/harm and test/help).

        Only pairs whose judge verdicts agreed in both orders become rows; the split of an image comes
        from its hash, so one image never sits in two splits. The same run gives byte-identical files.
        A run that gives no row writes nothing and exits 1, saying why (e.g. every pair left out because
        the judge's two orders disagreed, or the units' failures).

        Example:
          spa-vl build runs/r1 out/spa_vl_v2
          python -c "from datasets import load_dataset; print(load_dataset('out/spa_vl_v2', 'malicious_use'))"

        Args:
          run_dir: a run directory written by `spa-vl generate`.
          out: the dataset folder to write (must be empty or absent unless --overwrite).
          overwrite: replace an existing folder.
          progress: show a progress bar.
        """
        from builder.generate.build import NothingToBuild, build

        t0 = time.perf_counter()
        try:
            summary = build(run_dir, out, overwrite=overwrite, progress=progress)
        except NothingToBuild as e:
            print(f"spa-vl build: nothing to write, {out} not created: {e}", file=sys.stderr)
            sys.exit(1)
        configs = ", ".join(f"{c} {sum(s.values()):,}" for c, s in summary.config_rows.items() if c != "default")
        print(f"build: {summary.total_rows:,} rows ({configs}) in {summary.files} files, "
              f"{time.perf_counter() - t0:.1f}s -> {out}")

    def configs(self, action: str = "list", name: str | None = None, dest: str | None = None):
        """List the configs shipped with spa-vl, or copy one out for editing.

        Every command that takes a config takes a shipped one by name (generate CONFIG, train --config,
        evaluate --judge), from any folder after `pip install`; copy one to change it. A copy never
        replaces an existing file.

        Example:
          spa-vl configs
          spa-vl configs copy pipeline my_run.yaml
          spa-vl configs copy llava-1.5-7b-lora configs/        # -> configs/llava-1.5-7b-lora.yaml

        Args:
          action: list (the default) or copy.
          name: with copy: the shipped config's name, as listed.
          dest: with copy: the file to write, or an existing folder to put NAME.yaml in.
        """
        from builder.shipped import copy_config, shipped_configs

        if action == "list" and name is None and dest is None:
            found = shipped_configs()
            width = max(len(c.name) for c in found)
            for c in found:
                print(f"{c.kind:<8}  {c.name:<{width}}  {c.description}")
            print(f"configs: {len(found)} shipped (pipeline: spa-vl generate NAME; train: spa-vl train KIND --config NAME; "
                  "judge: spa-vl evaluate ... --judge NAME); copy one with `spa-vl configs copy NAME DEST`")
            return
        if action != "copy":
            raise DataError(f"unknown action {action!r}; expected list or copy", field="action")
        if name is None or dest is None:
            raise DataError("copy takes NAME and DEST, e.g. `spa-vl configs copy pipeline my.yaml`", field="dest")
        target = copy_config(str(name), dest)
        print(f"configs: copied {name} -> {target}")

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
        from builder.review import ReviewServer, make_report, open_review
        from builder.review.render import report_summary

        t0 = time.perf_counter()
        if not Path(dir).is_dir():
            raise DataError("no such folder", file=dir)
        if report:
            given = [name for name, value in (("n", n), ("seed", seed), ("config", config)) if value is not None]
            if given:
                raise DataError("--report uses the sample drawn already; leave out --" + ", --".join(given), field=given[0])
            result = make_report(dir, resamples=resamples)
            print(report_summary(result.report))
            print(f"review report: {time.perf_counter() - t0:.1f}s -> {Path(dir) / 'review'}"
                  + ("; card re-rendered" if result.card_rendered else ""))
            return
        server = ReviewServer(host=host, port=port)  # a busy port fails before a sample is drawn
        try:
            session = open_review(dir, n=n, seed=seed, config=config)
        except BaseException:
            server.close()
            raise
        print(f"review: {len(session.pairs):,} pairs ({'new sample' if session.new_sample else 'sample continued'}, "
              f"seed {session.sample.seed}) at {server.url}  (Ctrl-C to stop)")
        if open:
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

    def train(self, kind: str | None = None, config: str | None = None, model: str | None = None, dataset: str | None = None,
              config_name: str | None = None, max_steps: int | None = None, output_dir: str | None = None,
              **overrides):
        """Train on SPA-VL: dpo (trl DPOTrainer), rm (reward model) or ppo (our PPO, value model from the RM).

        The YAML holds the run's settings with the paper's values as defaults; any setting can be
        overridden as --key value (train dpo also takes any trl.DPOConfig field); a bad value or an
        unknown key is a one-line error naming it. Vision tower frozen, projector trained; `lora:` in
        the YAML trains LoRA adapters on every linear layer of the language model instead of the whole
        model. Several GPUs: accelerate launch -m builder.cli train dpo --config ...

        Example:
          spa-vl train dpo --config training/configs/llava-1.5-7b-lora.yaml --dataset out/spa_vl --config_name malicious_use
          spa-vl train rm --config training/configs/llava-1.5-7b-rm.yaml --dataset out/spa_vl --output_dir runs/rm
          spa-vl train ppo --config training/configs/llava-1.5-7b-ppo-lora.yaml --reward_model runs/rm --max_steps 100

        Args:
          kind: dpo, rm or ppo.
          config: a YAML file (or the name of one in training/configs/, e.g. llava-1.5-7b-lora).
          model: a Hub id or local folder of an image-text-to-text model.
          dataset: a spa-vl dataset folder or Hub repo id.
          config_name: a harm domain (e.g. malicious_use) or default (all domains).
          max_steps: stop after this many optimizer steps (PPO: iterations); -1 for whole epochs.
          output_dir: where the model, processor and spa_vl_train.json are written.
          overrides: any other setting of the YAML, e.g. --learning_rate 1e-5 --beta 0.2 --max_samples 10000.
        """
        from training.config import KINDS, load_config

        if kind is None or overrides.pop("help", False) or overrides.pop("h", False):
            # fire passes --help on to a command that takes --key value overrides: show the help ourselves
            import inspect

            print("spa-vl train KIND [--config YAML] [--key value ...]\n\n" + inspect.cleandoc(CLI.train.__doc__))
            return
        if kind not in KINDS:
            raise DataError(f"unknown trainer {kind!r}; expected one of {', '.join(KINDS)}", field="kind")
        cfg = load_config(config, kind, model=model, dataset=dataset, config_name=config_name, max_steps=max_steps,
                          output_dir=output_dir, **overrides)
        if kind == "dpo":
            from training.dpo import train_dpo as run
        elif kind == "rm":
            from training.reward import train_rm as run
        else:
            from training.ppo import train_ppo as run
        result = run(cfg)
        if os.environ.get("RANK", "0") == "0":  # under accelerate launch / torchrun, one summary line
            print(result.line())

    def evaluate(self, model: str, dataset: str, judge: str, out: str, reference: str | None = None,
                 batch_size: int = 8, max_new_tokens: int = 256, limit: int | None = None, domains: str | None = None,
                 seed: int = 0, max_failure_rate: float | None = None, progress: bool = True):
        """Score a model on HarmEval (test/harm: unsafe-response rate, harm score) and HelpEval (test/help: win rate).

        Answers are generated in batches and saved as they come (a re-run resumes); the judge is any
        OpenAI-compatible endpoint or a local model from JUDGE.yaml (harm_format: json, md-judge-v0.1 or
        md-judge-v0.2, the paper's MD-Judge), its calls cached. Prints the results with 95% confidence
        intervals (USR: Wilson; harm score and win rate: bootstrap over questions, --seed) and writes
        OUT/metrics.json, OUT/metrics.md and OUT/metrics_by_category.png. Exits 1 when the judge failed on
        more than max_failure_rate of a benchmark's rows (or on all of them).

        Example:
          spa-vl evaluate runs/dpo out/spa_vl --judge training/configs/judge.yaml --out runs/eval
          spa-vl evaluate llava-hf/llava-1.5-7b-hf my-org/SPA-VL --judge judge.yaml --out runs/base --reference answers.jsonl
          spa-vl evaluate runs/dpo out/spa_vl --judge judge.yaml --out runs/eval --reference gpt-4o --limit 20

        Args:
          model: a Hub id, local model folder or LoRA adapter folder.
          dataset: a spa-vl dataset folder or Hub repo id (its `test` config is used).
          judge: the judge YAML (models, harm_judge, harm_format, help_judge, reference); see training/configs/judge.yaml.
          out: the output folder.
          reference: the HelpEval reference: a model entry of the judge file (e.g. gpt-4o), a model (its answers are generated) or a .jsonl of {id, answer}.
          batch_size: generation batch size.
          max_new_tokens: longest answer generated (also for a reference model entry).
          limit: evaluate the first N questions of each split only (a positive integer).
          domains: only these harm domains, comma-separated config names or class1 labels (e.g. malicious_use,privacy).
          seed: the bootstrap's seed for the confidence intervals.
          max_failure_rate: the largest share of failed judge rows per benchmark that still passes (default: the judge file's, 0.05).
          progress: show progress bars.
        """
        from training.evaluate import evaluate
        from training.report import results_table, summary_line

        metrics = evaluate(model, dataset, judge, out, reference=reference, batch_size=batch_size,
                           max_new_tokens=max_new_tokens, limit=limit, domains=domains, seed=seed,
                           max_failure_rate=max_failure_rate, progress=progress)
        print(results_table(metrics))
        print(summary_line(metrics))
        if not metrics["judge_failures"]["ok"]:
            for problem in metrics["judge_failures"]["problems"]:
                print(f"spa-vl evaluate: failed: {problem}; see {out}/judgments.jsonl", file=sys.stderr)
            sys.exit(1)

    def demo(self, out: str = "demo_out"):
        """Run the project end to end offline: fixture -> import -> dataset folder -> load every config.

        Example:
          spa-vl demo demo_out
        """
        from builder.dev.demo import run_demo

        run_demo(Path(out))


def main(argv: list[str] | None = None) -> None:
    """The `spa-vl` console script: check the whole command line, then let fire call the command."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread (an embedding caller): leave the signals alone
        previous = None
    try:
        _run(argv)
    except BrokenPipeError:  # `spa-vl --help | head -1`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(141)
    except Terminated:
        print("spa-vl: stopped by SIGTERM", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print("spa-vl: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str]) -> None:
    from builder import command_line

    try:
        if argv and argv[0] == "--version":
            print(f"spa-vl {_version()}")
            return
        command, values, extra = command_line.check(CLI, argv)
        fire.Fire(CLI, command=command.fire_argv(values, extra), name="spa-vl")
    except command_line.HelpRequested as h:
        sys.stdout.write(h.command.help_text() if h.command else command_line.overview(CLI))
        sys.stdout.flush()
    except DataError as e:
        print(f"spa-vl: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # the Hub or the network: exit 1 (the job failed); the disk: exit 2
        message = hub_failure(e)
        if message is not None:
            print(f"spa-vl: {message}", file=sys.stderr)
            sys.exit(1)
        message = environment_failure(e)
        if message is None:
            raise
        print(f"spa-vl: error: {message}", file=sys.stderr)
        sys.exit(2)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spa-vl")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


if __name__ == "__main__":
    main()
