"""`spa-vl demo OUT`: the main jobs end to end, offline, on the embedded defaults.

1. fixture in the upstream sqrti/SPA-VL layout -> import into a per-domain dataset folder ->
   `load_dataset` of every config (no script) -> a table of rows per config and split;
2. the generation pipeline on `builder/configs/local.yaml` (typography images, a tiny random-weight
   LLaVA in-process for every role) -> `build` -> `load_dataset` of one domain config;
3. the maintainer's checks on the generated folder: `validate` (every check) and `version --bump minor`
   (changelog entry, card re-rendered); `publish` needs a Hub and is not run offline;
4. two DPO steps (trl DPOTrainer, LoRA, vision tower frozen) of the tiny LLaVA on the imported folder.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from builder.dev.fixture import write_fixture
from builder.format.manifest import read_manifest
from builder.taxonomy import Taxonomy
from builder.upstream.importer import import_upstream


def run_demo(out: Path, *, rows_per_domain: int = 120, eval_rows: int = 12) -> dict[str, dict[str, int]]:
    """Returns config -> split -> rows as loaded by `datasets.load_dataset`."""
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    upstream, root, cache = out / "upstream", out / "spa_vl", out / "hf_cache"
    shutil.rmtree(cache, ignore_errors=True)
    tax = Taxonomy.load()

    print(f"[1/7] synthetic fixture in the upstream layout -> {upstream}")
    write_fixture(upstream, rows_per_domain=rows_per_domain, eval_rows=eval_rows, layout="upstream", overwrite=True)
    print(f"[2/7] import_upstream -> {root}")
    print("      " + import_upstream(upstream, root, overwrite=True).line())

    print("[3/7] load_dataset(folder, config) for every config")
    disable_progress_bar()
    loaded: dict[str, dict[str, int]] = {}
    for config in ["default", *tax.slugs, "test"]:
        dd = load_dataset(str(root), config, cache_dir=str(cache))
        loaded[config] = {split: d.num_rows for split, d in dd.items()}

    width = max(map(len, loaded))
    print(f"\n  {'config':<{width}}  split       rows")
    for config, splits in loaded.items():
        for split, n in splits.items():
            print(f"  {config:<{width}}  {split:<10} {n:>5}")
    sample = load_dataset(str(root), "malicious_use", split="train", cache_dir=str(cache))[0]
    print(f"\n  a malicious_use row: [{sample['class2']} / {sample['class3']}] image {sample['image'].size}, "
          f"question {sample['question'][:60]!r}...")
    generated = run_pipeline_demo(out, cache)
    check_and_version(out / "generated")
    print(f"[7/7] spa-vl train dpo --config tiny-dpo --model {out / 'models' / 'tiny-llava'} --dataset {root} "
          f"--max_steps 2 --output_dir {out / 'runs' / 'dpo'}")
    from training.dpo import demo_run

    print("      " + demo_run(out / "models" / "tiny-llava", root, out / "runs" / "dpo"))
    manifest = read_manifest(root)
    total = sum(f["rows"] for f in manifest["files"].values())
    print(f"\ndemo: imported {total:,} rows in {len(loaded)} configs ({len(manifest['files'])} shards, version "
          f"{manifest['version']}); generated {generated:,} rows; {time.perf_counter() - t0:.1f}s -> {out}")
    return loaded


def check_and_version(folder: Path) -> None:
    """`spa-vl validate` then `spa-vl version --bump minor` on a dataset folder."""
    from builder.validate import validate
    from builder.versioning import bump

    print(f"[6/7] spa-vl validate {folder} && spa-vl version {folder} --bump minor")
    report = validate(folder, progress=False)
    print("      " + report.format_table().splitlines()[-1])
    if not report.ok:
        print(report.format_table())
        raise SystemExit(1)
    r = bump(folder, "minor")
    print(f"      version {r.previous_version or '(none recorded)'} -> {r.version}: +{r.added:,} rows; "
          f"CHANGELOG.md, README.md and assets/ written")


def run_pipeline_demo(out: Path, cache: Path, *, limit: int = 12) -> int:
    """The pipeline on the embedded defaults; returns the rows built."""
    from datasets import load_dataset

    from builder.generate import build
    from builder.generate.pipeline import generate
    from builder.generate.summary import summary_line
    from builder.shipped import PIPELINE_CONFIGS as SHIPPED
    from builder.dev.tiny_vlm import build_tiny_llava

    print(f"\n[4/7] spa-vl generate {out / 'local.yaml'} --run_dir {out / 'run'} --limit {limit}   "
          "(typography images, a tiny random-weight LLaVA for every role: gibberish text, real pipeline)")
    build_tiny_llava(out / "models" / "tiny-llava", seed=0, overwrite=True)
    build_tiny_llava(out / "models" / "tiny-llava-b", seed=1, overwrite=True)
    shutil.copy(SHIPPED / "local.yaml", out / "local.yaml")
    shutil.rmtree(out / "run", ignore_errors=True)
    print("      " + summary_line(generate(out / "local.yaml", out / "run", limit=limit)))
    print(f"[5/7] spa-vl build {out / 'run'} {out / 'generated'}")
    summary = build(out / "run", out / "generated", overwrite=True, progress=False)
    ds = load_dataset(str(out / "generated"), "malicious_use", cache_dir=str(cache))
    row = next(iter(ds.values()))[0]  # train or validation: an image's split comes from its hash
    print(f"      {summary.total_rows:,} rows; load_dataset(..., 'malicious_use'): "
          + ", ".join(f"{s} {d.num_rows}" for s, d in ds.items())
          + f"; a row: [{row['class3']}] {row['question_type']} question {row['question'][:40]!r}, "
            f"chosen by the judge from {row['chosen_model']} over {row['rejected_model']}")
    return summary.total_rows
