"""`spa-vl` commands that make a dataset folder from labels: the taxonomy, synthetic fixtures, the upstream import."""

from __future__ import annotations

import json as _json
import time
from pathlib import Path

from builder.errors import DataError
from builder.taxonomy import Taxonomy


class DataCommands:
    """The taxonomy, and dataset folders made from labelled data: fixtures, the upstream import."""

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

    def fixture(self, out: str, rows_per_domain: int = 30, eval_rows: int = 10, layout: str = "spa_vl", seed: int = 0,
                image_size: int = 64, texture: bool = False, taxonomy: str | None = None, overwrite: bool = False,
                meta_in: str = "zip"):
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
          overwrite: replace a folder spa-vl wrote of the same kind (never one that is, holds or sits in an input).
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

    def import_upstream(self, src: str, out: str, revision: str | None = None, class_map: str | None = None,
                        taxonomy: str | None = None, overwrite: bool = False, meta: str | None = None,
                        match_bare_names: bool = False, progress: bool = True):
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
          overwrite: replace a folder spa-vl wrote of the same kind (never one that is, holds or sits in an input).
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
