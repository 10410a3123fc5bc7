"""Benchmark ``spa-vl import_upstream`` on a fixture in the real upstream layout.

    .venv/bin/python bench/bench_import.py                    # 20,000 preference rows, 1 repeat
    .venv/bin/python bench/bench_import.py --rows 6000 --repeats 3 --out bench_out

The fixture is ``write_fixture(..., layout="upstream", texture=True, image_size=384)``: JPEGs of
about 45 kB, three rows per image, train rows without labels whose ``image_name`` indexes
``train/meta.json`` inside ``train.zip``, a re-encoded image tree. It is built once under ``--out``
and reused while its parameters match. Measured side by side, ``--repeats`` times, median reported:

- ``pq.read_table`` of every input parquet file (the floor: what any reader pays to get the rows);
- ``import_upstream(src, out)`` into a fresh folder: the whole command (schema checks, the meta.json
  join, image checks, shards, manifest, card).

The last lines are a markdown table. Exit status 1 when the import fails or leaves a row unlabelled.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (ROOT, HERE):  # run as a script: the project, and bench_dataset's helpers
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
IMAGE_SIZE = 384


def fixture_params(rows: int) -> dict:
    return {"rows_per_domain": math.ceil(rows / 6), "eval_rows": max(10, rows // 100), "texture": True,
            "image_size": IMAGE_SIZE, "seed": 0, "layout": "upstream"}


def ensure_upstream(out: Path, rows: int) -> tuple[Path, dict]:
    """``out/upstream``, rebuilt unless its stamp says it was written with the same parameters."""
    from builder.dev.fixture import write_fixture

    root, stamp = out / "upstream", out / "upstream.json"
    params = fixture_params(rows)
    if stamp.exists() and root.is_dir() and json.loads(stamp.read_text()).get("params") == params:
        counts = json.loads(stamp.read_text())["counts"]
        print(f"fixture: reusing {root} ({sum(counts.values()):,} rows)")
        return root, counts
    print(f"fixture: building {root} ({rows:,} preference rows, {IMAGE_SIZE}px textured JPEGs) ...", flush=True)
    t0 = time.perf_counter()
    counts = write_fixture(root, **params, overwrite=True, progress=False)
    print(f"fixture: {sum(counts.values()):,} rows in {time.perf_counter() - t0:.0f}s", flush=True)
    stamp.write_text(json.dumps({"params": params, "counts": counts}))
    return root, counts


def read_inputs(root: Path) -> int:
    import pyarrow.parquet as pq

    rows = 0
    for path in sorted(root.glob("*/*.parquet")):
        rows += pq.read_table(path).num_rows  # dropped at once: memory stays at one file
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=20000, help="preference rows in the fixture (default 20000)")
    p.add_argument("--out", default="bench_out", help="working folder holding the fixture (default bench_out)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per measurement; the median is reported")
    args = p.parse_args(argv)
    if args.rows < 6 or args.repeats < 1:
        p.error("--rows must be >= 6 and --repeats >= 1")

    from bench_dataset import machine_line

    from builder.upstream.importer import import_upstream

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python bench/bench_import.py", *sys.argv[1:]])
    print(f"machine: {machine_line()}")
    src, counts = ensure_upstream(out, args.rows)
    mib = sum(f.stat().st_size for f in src.rglob("*") if f.is_file()) / 2**20
    dest = out / "imported"
    times: dict[str, list[float]] = {"pyarrow": [], "import": []}
    report = None
    read_inputs(src)  # warm-up: imports and the page cache
    for r in range(args.repeats):
        t0 = time.perf_counter()
        read_inputs(src)
        times["pyarrow"].append(time.perf_counter() - t0)
        shutil.rmtree(dest, ignore_errors=True)
        t0 = time.perf_counter()
        report = import_upstream(src, dest, progress=False)
        times["import"].append(time.perf_counter() - t0)
        print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    shutil.rmtree(dest, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    total = sum(counts.values())

    print()
    print(f"Command: `{command}`; upstream-layout fixture {total:,} rows ({counts['train']:,} train, "
          f"{mib:.0f} MiB, ~45 kB JPEGs, meta.json inside train.zip); median of {args.repeats}.")
    print()
    print("| measurement | rows | seconds | rows/s | vs pyarrow read |")
    print("|---|---:|---:|---:|---:|")
    for label, key in (("`pq.read_table` of every input parquet file (floor)", "pyarrow"),
                       ("`import_upstream(src, out)`, all of it", "import")):
        print(f"| {label} | {total:,} | {med[key]:.2f} | {total / med[key]:,.0f} | {med[key] / med['pyarrow']:.1f}× |")
    print()
    print(f"Summary line: {report.line()}")
    ok = report.unattributed == 0 and report.attributed_by["meta"] == counts["train"]
    if not ok:
        print("FAILED: some train rows were not labelled through meta.json", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
