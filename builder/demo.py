"""`spa-vl demo OUT`: the main job end to end, offline, on the embedded defaults.

fixture in the upstream sqrti/SPA-VL layout -> import into a per-domain dataset folder ->
`load_dataset` of every config (no script) -> a table of rows per config and split.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from builder.fixture import write_fixture
from builder.folder import read_manifest
from builder.taxonomy import Taxonomy
from builder.upstream import import_upstream


def run_demo(out: Path, *, rows_per_domain: int = 60, eval_rows: int = 12) -> dict[str, dict[str, int]]:
    """Returns config -> split -> rows as loaded by `datasets.load_dataset`."""
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    upstream, root, cache = out / "upstream", out / "spa_vl", out / "hf_cache"
    shutil.rmtree(cache, ignore_errors=True)
    tax = Taxonomy.load()

    print(f"[1/3] synthetic fixture in the upstream layout -> {upstream}")
    write_fixture(upstream, rows_per_domain=rows_per_domain, eval_rows=eval_rows, layout="upstream", overwrite=True)
    print(f"[2/3] import_upstream -> {root}")
    print("      " + import_upstream(upstream, root, overwrite=True).line())

    print("[3/3] load_dataset(folder, config) for every config")
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
    manifest = read_manifest(root)
    total = sum(f["rows"] for f in manifest["files"].values())
    print(f"\ndemo: {total:,} rows in {len(loaded)} configs, {len(manifest['files'])} shards, "
          f"version {manifest['version']}, {time.perf_counter() - t0:.1f}s -> {root}")
    return loaded
