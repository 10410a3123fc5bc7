"""The `spa-vl` command line (python-fire). Every command's --help shows an example.

Exit codes: 0 success, 1 a check or job failed, 2 bad usage or bad input.
"""

from __future__ import annotations

import json as _json
import sys
import time
from pathlib import Path

import fire

from builder.errors import DataError
from builder.taxonomy import Taxonomy


class CLI:
    """spa-vl: the SPA-VL safety preference dataset, its tooling and its trainers.

    Examples:
      spa-vl taxonomy
      spa-vl fixture out/fx --rows_per_domain 300
      spa-vl import_upstream path/to/sqrti_SPA-VL out/spa_vl
      spa-vl generate builder/configs/pipeline.yaml --run_dir runs/r1 --limit 12
      spa-vl build runs/r1 out/spa_vl_v2
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
    ):
        """Write a synthetic dataset (PIL-drawn images, template text) for tests and demos.

        Every image carries its three question types (easy, hardq, hards) and sits in one split.

        Example:
          spa-vl fixture out/fx --rows_per_domain 300 --eval_rows 20
          spa-vl fixture out/up --layout upstream      # the sqrti/SPA-VL layout, for import_upstream

        Args:
          out: the folder to write (must be empty or absent unless --overwrite).
          rows_per_domain: preference rows per harm domain, rounded up to whole images (3 rows each).
          eval_rows: rows in each of test/harm and test/help.
          layout: spa_vl (our dataset folder) or upstream (sqrti/SPA-VL's files and train.zip).
          seed: the same seed gives byte-identical files.
          image_size: image side in pixels.
          texture: add photo-like noise (realistic JPEG sizes: ~45 kB at 384 px).
          taxonomy: a taxonomy YAML file of your own.
          overwrite: replace an existing folder.
        """
        from builder.fixture import write_fixture

        t0 = time.perf_counter()
        result = write_fixture(
            out, rows_per_domain=rows_per_domain, eval_rows=eval_rows, layout=layout, seed=seed,
            image_size=image_size, texture=texture, taxonomy=Taxonomy.load(taxonomy), overwrite=overwrite,
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
    ):
        """Convert the upstream sqrti/SPA-VL layout (a folder or that Hub repo) into a per-domain dataset folder.

        Train rows get their labels from train.zip (or an extracted class1/class2/class3/<name> tree)
        by image hash, or from --class_map; rows that cannot be attributed are reported and kept in
        the default config only. Row counts in equal row counts out, per split.

        Example:
          spa-vl import_upstream ~/data/SPA-VL out/spa_vl
          spa-vl import_upstream sqrti/SPA-VL out/spa_vl --revision main

        Args:
          src: a local folder in the upstream layout, or a Hub dataset repo id.
          out: the dataset folder to write (must be empty or absent unless --overwrite).
          revision: Hub branch, tag or commit (with a repo id).
          class_map: CSV/JSON(L) with image_sha256 or image_name, and class1, class2, class3.
          taxonomy: a taxonomy YAML file of your own (if upstream labels differ from the shipped one).
          overwrite: replace an existing folder.
        """
        from builder.upstream import import_upstream

        report = import_upstream(src, out, revision=revision, class_map=class_map,
                                 taxonomy=Taxonomy.load(taxonomy), overwrite=overwrite)
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

        Every model call is cached in RUN_DIR/run.sqlite: re-running the same command after a crash
        resumes and re-sends nothing that succeeded; changing one prompt re-runs only what depends on it.
        Writes RUN_DIR/summary.json (units done/failed with reasons, requests, tokens and cost per model).
        Exit code 1 when some work units or subcategories failed (re-run to retry them), 2 on a bad config.

        Example:
          export OPENAI_API_KEY=...                       # or OPENAI_BASE_URL=http://localhost:8000/v1 for vLLM
          spa-vl generate builder/configs/pipeline.yaml --run_dir runs/r1 --limit 12
          spa-vl generate builder/configs/pipeline.yaml --run_dir runs/r1 --until questions   # one stage at a time
          RAY_ADDRESS=auto spa-vl generate my.yaml --run_dir /shared/runs/r1 --executor ray

        Args:
          config: the run's YAML file (see builder/configs/pipeline.yaml; builder/configs/local.yaml runs offline).
          run_dir: where the run store, config snapshot and summary.json live (created or resumed).
          executor: local (asyncio in this process) or ray (ray.init(); RAY_ADDRESS for a cluster).
          limit: at most this many work units (images), spread over the domains, for a quick try.
          until: the last stage to run: images, questions, responses or preferences.
          progress: show progress bars.
        """
        from builder.pipeline import generate, summary_line

        summary = generate(config, run_dir, executor=executor, limit=limit, until=until, progress=progress)
        print(summary_line(summary))
        if summary["units"]["failed"] or summary["images"].get("failures"):
            sys.exit(1)

    def build(self, run_dir: str, out: str, overwrite: bool = False, progress: bool = True):
        """Turn a run directory into a dataset folder (per-domain configs, test/harm and test/help).

        Only pairs whose judge verdicts agreed in both orders become rows; the split of an image comes
        from its hash, so one image never sits in two splits. The same run gives byte-identical files.

        Example:
          spa-vl build runs/r1 out/spa_vl_v2
          python -c "from datasets import load_dataset; print(load_dataset('out/spa_vl_v2', 'malicious_use'))"

        Args:
          run_dir: a run directory written by `spa-vl generate`.
          out: the dataset folder to write (must be empty or absent unless --overwrite).
          overwrite: replace an existing folder.
          progress: show a progress bar.
        """
        from builder.build import build

        t0 = time.perf_counter()
        summary = build(run_dir, out, overwrite=overwrite, progress=progress)
        configs = ", ".join(f"{c} {sum(s.values()):,}" for c, s in summary.config_rows.items() if c != "default")
        print(f"build: {summary.total_rows:,} rows ({configs}) in {summary.files} files, "
              f"{time.perf_counter() - t0:.1f}s -> {out}")

    def demo(self, out: str = "demo_out"):
        """Run the project end to end offline: fixture -> import -> dataset folder -> load every config.

        Example:
          spa-vl demo demo_out
        """
        from builder.demo import run_demo

        run_demo(Path(out))


def main(argv: list[str] | None = None) -> None:
    try:
        fire.Fire(CLI, command=argv, name="spa-vl")
    except DataError as e:
        print(f"spa-vl: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
