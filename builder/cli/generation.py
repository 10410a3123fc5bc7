"""`spa-vl` commands of the generation pipeline: the shipped configs, a run, the folder built from it."""

from __future__ import annotations

import sys
import time

from builder.errors import DataError


class GenerationCommands:
    """The SPA-VL pipeline: shipped configs, a run into a run directory, a dataset folder built from it."""

    def generate(self, config: str, run_dir: str, executor: str = "local", limit: int | None = None,
                 until: str = "preferences", progress: bool = True):
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
        from builder.generate.pipeline import generate
        from builder.generate.summary import summary_line

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
          overwrite: replace a dataset folder spa-vl wrote (never one that is, holds or sits in the run directory).
          progress: show a progress bar.
        """
        from builder.generate import NothingToBuild, build

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
