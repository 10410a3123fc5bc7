"""Benchmark the dataset folder: per-domain loading, the pyarrow floor, and building the folder.

    make bench                                    # = .venv/bin/python bench/bench_dataset.py
    .venv/bin/python bench/bench_dataset.py --rows 20000 --repeats 3 --out bench_out

Everything is measured side by side in one run, on a synthetic fixture with realistic image bytes
(``write_fixture(..., texture=True, image_size=384)``: JPEGs of about 45 kB, three rows per image):

1. one domain config (``load_dataset(root, "malicious_use")``, and ``spa_vl.load`` when importable)
   against what users of upstream ``sqrti/SPA-VL`` do today: load everything, filter on ``class1``.
   Every cold load gets a fresh ``cache_dir``, so it includes the parquet → arrow preparation.
2. one domain config against plain ``pyarrow.parquet.read_table`` over the same files (the floor),
   and a warm load (same ``cache_dir`` again).
3. building the folder: rows/s and peak RSS of ``write_fixture`` at rows/2 and rows, each in a
   fresh subprocess, plus ``DatasetFolderWriter`` fed pre-drawn images (the writer's own throughput).

Loads are timed ``--repeats`` times, interleaved, and the median is reported. The fixture is built
once under ``--out`` and reused while its parameters match. Nothing global is cleared: every cache
lives under ``--out`` and is removed after its run. The last lines are a markdown table for the README.
``--profile`` also writes a cProfile of one cold domain load to ``OUT/profile_domain_load.txt``.
Exit status: 0 when every measurement ran (targets missed or not), 1 when one of them failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: make the project (builder/, spa_vl.py) importable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never wait on the network

DOMAIN = "malicious_use"
DOMAIN_LABEL = "Malicious Use"
IMAGE_SIZE = 384
PREDRAWN_POOL = 64  # distinct images per domain in the pre-drawn build
TARGET_DOMAIN_VS_ALL = 5.0
TARGET_DOMAIN_VS_PYARROW = 1.5
TARGET_RSS_MB = 1024
TARGET_RSS_GROWTH = 1.25


def fixture_params(rows: int) -> dict:
    # eval rows (test/harm + test/help) scale with the size too, so both builds have the same mix
    return {"rows_per_domain": math.ceil(rows / 6), "eval_rows": max(10, rows // 100), "texture": True,
            "image_size": IMAGE_SIZE, "seed": 0}


# --- child processes: one build each, reporting its own peak RSS --------------------------------
def child_build(rows: int, dest: Path, mode: str) -> dict:
    """Build a folder of ``rows`` preference rows at ``dest``; return timings and this process's peak RSS."""
    import dataset_card.card  # noqa: F401  (the card renderer the builds finish with; counted in the baseline here)
    from builder.dev.fixture import write_fixture

    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    params = fixture_params(rows)
    if mode == "fixture":
        t0 = time.perf_counter()
        summary = write_fixture(dest, **params, overwrite=True, progress=False)
        seconds = time.perf_counter() - t0
        draw_seconds = None
    else:
        summary, seconds, draw_seconds = _build_predrawn(dest, params)
    return {
        "mode": mode,
        "rows": summary.total_rows,
        "preference_rows": sum(n for (folder, split), n in summary.rows.items() if folder != "test"),
        "seconds": seconds,
        "draw_seconds": draw_seconds,
        "bytes": summary.bytes,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "baseline_mb": baseline_mb,  # peak RSS after the imports, before any row
    }


def _build_predrawn(dest: Path, params: dict):
    """The fixture's rows over a small pool of pre-drawn images: times ``DatasetFolderWriter`` alone."""
    from builder.dev.fixture import FixtureImage, draw_image, fixture_split, preference_rows
    from builder.format.writer import DatasetFolderWriter
    from dataset_card.card import render_folder_card
    from builder.format.schema import QUESTION_TYPES, image_sha256
    from builder.taxonomy import Taxonomy

    taxonomy = Taxonomy.load()
    images_per_domain = math.ceil(params["rows_per_domain"] / len(QUESTION_TYPES))
    t0 = time.perf_counter()
    pool = {}
    for slug in taxonomy.slugs:
        subs = taxonomy.domain(slug).subcategories
        for k in range(PREDRAWN_POOL):
            data = draw_image(f"pool/{slug}/{k}", subs[k % len(subs)][1].label, size=IMAGE_SIZE, texture=True)
            pool[slug, k] = (data, image_sha256(data))
    draw_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    with DatasetFolderWriter(dest, taxonomy=taxonomy, build_config={"source": "bench-predrawn", **params},
                             card={"title": "SPA-VL bench (pre-drawn images)", "synthetic": True},
                             overwrite=True, finish=render_folder_card) as writer:
        for slug in taxonomy.slugs:
            domain = taxonomy.domain(slug)
            subs = domain.subcategories
            for n in range(images_per_domain):
                class2, sub = subs[n % len(subs)]
                data, sha = pool[slug, n % PREDRAWN_POOL]
                img = FixtureImage(n, domain.label, class2, sub.label, data, sha)
                for row in preference_rows(img, f"{slug}_{n}.jpg"):
                    writer.add(row, fixture_split(n))
    return writer.summary, time.perf_counter() - t0, draw_seconds


def run_child(rows: int, dest: Path, mode: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", mode, "--rows", str(rows), "--_dest", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"build child ({mode}, {rows} rows) exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the fixture, built once and reused -------------------------------------------------------
def ensure_fixture(out: Path, rows: int, builds: dict) -> Path:
    """Reuse ``out/fixture`` when it was built with the same parameters; else build it (in a child)."""
    root, stamp = out / "fixture", out / "fixture.json"
    params = fixture_params(rows)
    manifest = root / "manifest.json"
    if stamp.exists() and manifest.exists():
        saved = json.loads(stamp.read_text())
        if saved.get("params") == params and saved.get("manifest") == manifest.read_text():
            print(f"fixture: reusing {root} ({saved['rows']} rows)")
            return root
    stamp.unlink(missing_ok=True)
    print(f"fixture: building {root} ({rows} preference rows, {IMAGE_SIZE}px textured JPEGs) ...", flush=True)
    result = run_child(rows, root, "fixture")
    builds.setdefault(("fixture", rows), result)  # a full-size build doubles as the section 3 measurement
    stamp.write_text(json.dumps({"params": params, "rows": result["rows"], "manifest": manifest.read_text()}))
    return root


# --- loads ------------------------------------------------------------------------------------
def load_domain_datasets(root: Path, cache: Path):
    from datasets import load_dataset

    return load_dataset(str(root), DOMAIN, cache_dir=str(cache))


def load_all_and_filter(root: Path, cache: Path):
    from datasets import load_dataset

    return load_dataset(str(root), cache_dir=str(cache))["train"].filter(
        lambda c: c == DOMAIN_LABEL, input_columns="class1")


def load_domain_spa_vl(root: Path, cache: Path):
    import spa_vl

    return spa_vl.load(DOMAIN, source=str(root), cache_dir=str(cache))


def load_domain_spa_vl_memory(root: Path, cache: Path):
    import spa_vl

    return spa_vl.load(DOMAIN, source=str(root), keep_in_memory=True)


def read_pyarrow(root: Path, cache: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f) for f in domain_parquet(root)])


def domain_parquet(root: Path) -> list[Path]:
    folder = root / "data" / DOMAIN
    return sorted(folder.glob("train-*.parquet")) + sorted(folder.glob("validation-*.parquet"))


def domain_load_phases(root: Path, out: Path, repeats: int) -> dict:
    """Where a cold ``load_dataset(root, DOMAIN)`` spends its time, next to what pyarrow needs for the same work."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import load_dataset_builder

    phases = {"resolve (README YAML, module, builder)": [], "prepare (parquet → arrow cache)": [],
              "as_dataset (memory-map)": [], "pyarrow: read parquet, write arrow IPC": []}
    for r in range(repeats):
        cache = out / "caches" / f"phases-{r}"
        shutil.rmtree(cache, ignore_errors=True)
        t0 = time.perf_counter()
        builder = load_dataset_builder(str(root), DOMAIN, cache_dir=str(cache))
        t1 = time.perf_counter()
        builder.download_and_prepare()
        t2 = time.perf_counter()
        builder.as_dataset()
        t3 = time.perf_counter()
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        t4 = time.perf_counter()
        for k, f in enumerate(domain_parquet(root)):  # the least any cold load that keeps an arrow cache must do
            table = pq.read_table(f)
            with pa.OSFile(str(cache / f"{k}.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table, max_chunksize=1000)
        t5 = time.perf_counter()
        shutil.rmtree(cache, ignore_errors=True)
        for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t5 - t4)):
            phases[name].append(dt)
    return {k: statistics.median(v) for k, v in phases.items()}


def num_rows(obj) -> int:
    if hasattr(obj, "num_rows") and isinstance(obj.num_rows, dict):  # DatasetDict
        return sum(obj.num_rows.values())
    return obj.num_rows


def time_loads(root: Path, out: Path, repeats: int) -> tuple[dict, dict]:
    """Cold loads (fresh cache_dir each), interleaved across repeats; a warm reload after each domain load."""
    loads = {"domain_datasets": load_domain_datasets, "all_and_filter": load_all_and_filter, "pyarrow": read_pyarrow,
             "domain_spa_vl": load_domain_spa_vl, "domain_spa_vl_memory": load_domain_spa_vl_memory}
    times = {name: [] for name in loads} | {"domain_datasets_warm": []}
    rows = {}
    caches = out / "caches"
    for r in range(repeats):
        for name, fn in loads.items():
            cache = caches / f"{name}-{r}"
            shutil.rmtree(cache, ignore_errors=True)
            t0 = time.perf_counter()
            result = fn(root, cache)
            times[name].append(time.perf_counter() - t0)
            rows[name] = num_rows(result)
            del result
            if name == "domain_datasets":
                t0 = time.perf_counter()
                result = fn(root, cache)
                times["domain_datasets_warm"].append(time.perf_counter() - t0)
                del result
            shutil.rmtree(cache, ignore_errors=True)
        print(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    shutil.rmtree(caches, ignore_errors=True)
    return {k: statistics.median(v) for k, v in times.items()}, rows


def warm_up(root: Path, out: Path) -> None:
    """Imports, the datasets module machinery, and the page cache: none of it should land in the first timed run."""
    for f in sorted((root / "data").rglob("*.parquet")):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    for fn in (load_domain_datasets, load_all_and_filter):
        scratch = out / "caches" / "warm-up"
        fn(root, scratch)
        shutil.rmtree(scratch, ignore_errors=True)


def profile_domain_load(root: Path, out: Path) -> Path:
    import cProfile
    import pstats

    cache = out / "caches" / "profile"
    shutil.rmtree(cache, ignore_errors=True)
    prof = cProfile.Profile()
    prof.enable()
    load_domain_datasets(root, cache)
    prof.disable()
    shutil.rmtree(cache, ignore_errors=True)
    path = out / "profile_domain_load.txt"
    with open(path, "w") as f:
        stats = pstats.Stats(prof, stream=f).sort_stats("cumulative")
        stats.print_stats(60)
        stats.sort_stats("tottime").print_stats(30)
    return path


# --- report -----------------------------------------------------------------------------------
def machine_line() -> str:
    return f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=20000, help="preference rows in the fixture (default 20000)")
    p.add_argument("--out", default="bench_out", help="working folder: fixture, caches, profile (default bench_out)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per load; the median is reported (default 3)")
    p.add_argument("--skip_build", action="store_true", help="skip section 3 (build throughput and RSS)")
    p.add_argument("--profile", action="store_true", help="also write a cProfile of one cold domain load to OUT/profile_domain_load.txt")
    p.add_argument("--_child", choices=["fixture", "predrawn"], help=argparse.SUPPRESS)
    p.add_argument("--_dest", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._child:
        print(json.dumps(child_build(args.rows, Path(args._dest), args._child)))
        return 0
    if args.rows < 6 or args.repeats < 1:
        p.error("--rows must be >= 6 and --repeats >= 1")

    import datasets
    import pyarrow

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    started = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = f"`{' '.join(['.venv/bin/python bench/bench_dataset.py', *sys.argv[1:]])}`" + ("" if sys.argv[1:] else " (= `make bench`)")
    print(f"machine: {machine_line()}")
    print(f"datasets {datasets.__version__}, pyarrow {pyarrow.__version__}")
    failures: list[str] = []

    # 3 first: a full-size build can double as the fixture build.
    builds: dict = {}
    build_sizes = sorted({max(6, args.rows // 2), args.rows})
    root = ensure_fixture(out, args.rows, builds)
    if not args.skip_build:
        print(f"build: write_fixture at {build_sizes} rows and DatasetFolderWriter over pre-drawn images, one subprocess each", flush=True)
        for rows in build_sizes:
            for mode in ("fixture", "predrawn"):
                if (mode, rows) in builds:
                    continue
                dest = out / f"build-{mode}-{rows}"
                try:
                    builds[mode, rows] = run_child(rows, dest, mode)
                except RuntimeError as e:
                    failures.append(str(e))
                finally:
                    shutil.rmtree(dest, ignore_errors=True)
        for (mode, rows), b in sorted(builds.items()):
            print(f"  {mode:8s} {b['rows']:6d} rows ({b['preference_rows']} preference)  {b['seconds']:7.1f}s  {b['rows'] / b['seconds']:7.0f} rows/s  "
                  f"peak RSS {b['maxrss_mb']:4.0f} MB ({b['baseline_mb']:.0f} MB after imports)  {b['bytes'] / 2**20:6.0f} MiB on disk", flush=True)

    manifest = json.loads((root / "manifest.json").read_text())
    domain_files = {k: v for k, v in manifest["files"].items() if k.startswith(f"data/{DOMAIN}/")}
    total_pref = sum(v["rows"] for k, v in manifest["files"].items() if not k.startswith("data/test/"))
    print(f"fixture: {total_pref} preference rows, {sum(v['bytes'] for v in manifest['files'].values()) / 2**20:.0f} MiB; "
          f"{DOMAIN}: {sum(v['rows'] for v in domain_files.values())} rows in {len(domain_files)} files, "
          f"{sum(v['bytes'] for v in domain_files.values()) / 2**20:.0f} MiB", flush=True)

    # 1 and 2: loads.
    warm_up(root, out)
    print(f"loads: {args.repeats} repeats, fresh cache_dir per cold load", flush=True)
    try:
        med, rows = time_loads(root, out, args.repeats)
    except Exception as e:  # report and exit non-zero, after printing what we have
        failures.append(f"loads: {type(e).__name__}: {e}")
        med, rows = {}, {}
    if rows:
        print("  rows returned: " + ", ".join(f"{k} {v}" for k, v in rows.items()))
        if rows["all_and_filter"] != manifest_rows(domain_files, "train"):
            failures.append(f"filter returned {rows['all_and_filter']} rows, the domain's train split has "
                            f"{manifest_rows(domain_files, 'train')}")
    phases = {}
    if med:
        phases = domain_load_phases(root, out, args.repeats)
        print(f"  cold `load_dataset(root, {DOMAIN!r})`, by phase (median of {args.repeats}): "
              + ", ".join(f"{k} {v:.3f}s" for k, v in phases.items()))
    if args.profile:
        print(f"profile: {profile_domain_load(root, out)}")
    shutil.rmtree(out / "caches", ignore_errors=True)

    # the table
    table = []

    def row(measurement, value, target="", ok=None):
        table.append((measurement, value, target, "" if ok is None else ("yes" if ok else "**no**")))

    if med:
        d, a, f = med["domain_datasets"], med["all_and_filter"], med["pyarrow"]
        row(f"cold load `{DOMAIN}` config, `load_dataset` (median of {args.repeats})", f"{d:.2f} s")
        row("cold load all + `filter(class1)`, `load_dataset` (upstream way)", f"{a:.2f} s")
        row("speed-up, one config vs all + filter (`load_dataset`)", f"{a / d:.1f}×", f"≥ {TARGET_DOMAIN_VS_ALL:g}×",
            a / d >= TARGET_DOMAIN_VS_ALL)
        if "domain_spa_vl" in med:
            s = med["domain_spa_vl"]
            row(f"cold load `{DOMAIN}`, `spa_vl.load`", f"{s:.2f} s")
            row("speed-up, one config vs all + filter (`spa_vl.load`)", f"{a / s:.1f}×", f"≥ {TARGET_DOMAIN_VS_ALL:g}×",
                a / s >= TARGET_DOMAIN_VS_ALL)
        else:
            row(f"cold load `{DOMAIN}`, `spa_vl.load`", "not measured", "", None)
        row(f"read `{DOMAIN}` parquet, `pyarrow.parquet.read_table` (floor)", f"{f:.2f} s")
        row("one config (`load_dataset`, cold) / pyarrow", f"{d / f:.1f}×", f"≤ {TARGET_DOMAIN_VS_PYARROW:g}×",
            d / f <= TARGET_DOMAIN_VS_PYARROW)
        if "domain_spa_vl" in med:
            row("one config (`spa_vl.load`, cold) / pyarrow", f"{med['domain_spa_vl'] / f:.1f}×",
                f"≤ {TARGET_DOMAIN_VS_PYARROW:g}×", med["domain_spa_vl"] / f <= TARGET_DOMAIN_VS_PYARROW)
        if "domain_spa_vl_memory" in med:
            m = med["domain_spa_vl_memory"]
            row(f"cold load `{DOMAIN}`, `spa_vl.load(keep_in_memory=True)` (no cache written)", f"{m:.2f} s")
            row("speed-up, one config vs all + filter (`spa_vl.load`, in memory)", f"{a / m:.1f}×",
                f"≥ {TARGET_DOMAIN_VS_ALL:g}×", a / m >= TARGET_DOMAIN_VS_ALL)
            row("one config (`spa_vl.load`, in memory) / pyarrow", f"{m / f:.1f}×",
                f"≤ {TARGET_DOMAIN_VS_PYARROW:g}×", m / f <= TARGET_DOMAIN_VS_PYARROW)
        rw = phases.get("pyarrow: read parquet, write arrow IPC")
        if rw:
            row("one config (`load_dataset`, cold) / (pyarrow read + write arrow IPC)", f"{d / rw:.1f}×",
                "info: floor for any cache-writing load")
        w = med["domain_datasets_warm"]
        row(f"warm load `{DOMAIN}` config, `load_dataset` (cached)", f"{w:.2f} s")
    small, big = (builds.get(("fixture", n)) for n in build_sizes) if len(build_sizes) == 2 else (None, None)
    for n in build_sizes:
        b = builds.get(("fixture", n))
        if b:
            row(f"build `write_fixture`, {b['rows']} rows ({b['preference_rows']} preference; incl. drawing JPEGs)", f"{b['rows'] / b['seconds']:.0f} rows/s")
            row(f"peak RSS, `write_fixture` {b['rows']} rows (after imports: {b['baseline_mb']:.0f} MB)", f"{b['maxrss_mb']:.0f} MB", f"< {TARGET_RSS_MB} MB",
                b["maxrss_mb"] < TARGET_RSS_MB)
    if small and big:
        g = big["maxrss_mb"] / small["maxrss_mb"]
        row(f"peak RSS growth, {big['rows']} / {small['rows']} rows", f"{g:.2f}×", f"≤ {TARGET_RSS_GROWTH:g}× (flat)",
            g <= TARGET_RSS_GROWTH)
    for n in build_sizes:
        b = builds.get(("predrawn", n))
        if b:
            row(f"build `DatasetFolderWriter`, {b['rows']} preference rows, pre-drawn images", f"{b['rows'] / b['seconds']:.0f} rows/s")
            row(f"peak RSS, `DatasetFolderWriter` {b['rows']} rows", f"{b['maxrss_mb']:.0f} MB", f"< {TARGET_RSS_MB} MB",
                b["maxrss_mb"] < TARGET_RSS_MB)

    elapsed = time.perf_counter() - started
    print()
    print(f"Command: {command}; fixture: {total_pref} preference rows, {IMAGE_SIZE}px textured JPEGs, "
          f"3 rows per image; build rows/s includes drawing the synthetic JPEGs except where pre-drawn")
    print(f"Machine: {machine_line()}; datasets {datasets.__version__}, pyarrow {pyarrow.__version__}")
    print()
    print("| measurement | value | target | ok |")
    print("|---|---|---|---|")
    for r in table:
        print("| " + " | ".join(r) + " |")
    print()
    print(f"bench took {elapsed:.0f} s")
    for msg in failures:
        print(f"FAILED: {msg}", file=sys.stderr)
    return 1 if failures else 0


def manifest_rows(files: dict, split: str) -> int:
    return sum(v["rows"] for k, v in files.items() if Path(k).name.startswith(f"{split}-"))


if __name__ == "__main__":
    sys.exit(main())
