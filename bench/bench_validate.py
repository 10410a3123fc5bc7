"""Benchmark ``spa-vl validate`` against a plain pyarrow read of the same files.

    .venv/bin/python bench/bench_validate.py                  # 20,000-row fixture, 3 repeats
    .venv/bin/python bench/bench_validate.py --repeats 5 --out bench_out

The fixture is ``bench_dataset.py``'s (``write_fixture(..., texture=True, image_size=384)``: JPEGs of
about 45 kB, three rows per image), built once under ``--out`` and reused while its parameters match.
Timed, interleaved, ``--repeats`` times each, median reported:

- ``pyarrow.parquet.read_table`` of every shard the manifest lists, one after the other (the floor:
  what any reader of the folder pays just to get the rows into memory);
- ``validate(root, load_configs=False)``: header decode (the default), and with ``full_decode=True``.

Then once each: ``validate(root)`` with ``load_configs=True`` (every config through
``datasets.load_dataset`` into a fresh cache), and the peak RSS of a header-mode validate in a fresh
subprocess (Linux: VmHWM reset before the run; it should grow by a few batches, not by the folder). The last lines are a
markdown table. Exit status 1 when a validation fails or a measurement errors.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (ROOT, HERE):  # run as a script: the project, and bench_dataset's fixture builder
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def read_pyarrow(root: Path, files: list[str]) -> int:
    import pyarrow.parquet as pq

    rows = 0
    for rel in files:
        rows += pq.read_table(root / rel).num_rows  # dropped at once: memory stays at one shard
    return rows


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def child_rss(root: Path) -> dict:
    """Run a header-mode validate in this (fresh) process; report its RSS before and its peak during the run."""
    import datasets  # noqa: F401  (imported by validate's card check; counted before the run)

    from builder.validate import validate

    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak (VmHWM) to the current RSS
    report = validate(root, load_configs=False, progress=False)
    return {"ok": report.ok, "rows": report.rows, "before_mb": before, "peak_mb": _status_mb("VmHWM")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=20000, help="preference rows in the fixture (default 20000)")
    p.add_argument("--out", default="bench_out", help="working folder holding the fixture (default bench_out)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is reported")
    p.add_argument("--_child_rss", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child_rss:
        print(json.dumps(child_rss(Path(args._child_rss))))
        return 0
    if args.rows < 6 or args.repeats < 1:
        p.error("--rows must be >= 6 and --repeats >= 1")

    import datasets
    import pyarrow
    from bench_dataset import ensure_fixture, machine_line

    from builder.validate import validate

    datasets.disable_progress_bars()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python bench/bench_validate.py", *sys.argv[1:]])
    print(f"machine: {machine_line()}")
    print(f"datasets {datasets.__version__}, pyarrow {pyarrow.__version__}")
    root = ensure_fixture(out, args.rows, {})
    manifest = json.loads((root / "manifest.json").read_text())
    files = sorted(manifest["files"])
    total_rows = sum(f["rows"] for f in manifest["files"].values())
    mib = sum(f["bytes"] for f in manifest["files"].values()) / 2**20
    print(f"fixture: {total_rows} rows in {len(files)} shards, {mib:.0f} MiB", flush=True)

    failures: list[str] = []
    runs = {
        "pyarrow": lambda: read_pyarrow(root, files),
        "header": lambda: validate(root, load_configs=False, progress=False),
        "full": lambda: validate(root, load_configs=False, full_decode=True, progress=False),
    }
    runs["pyarrow"]()  # warm-up: imports, the page cache, the taxonomy
    runs["header"]()
    times: dict[str, list[float]] = {name: [] for name in runs}
    rows: dict[str, int] = {}
    for r in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - t0)
            if name == "pyarrow":
                rows[name] = result
            else:
                rows[name] = result.rows
                if not result.ok:
                    failures.append(f"validate ({name}) failed on the clean fixture:\n{result.format_table()}")
        print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}

    t0 = time.perf_counter()
    loaded = validate(root, load_configs=True, progress=False)
    med["load"], rows["load"] = time.perf_counter() - t0, loaded.rows
    if not loaded.ok:
        failures.append(f"validate (load_configs=True) failed on the clean fixture:\n{loaded.format_table()}")
    configs = loaded.check("configs_load").checked

    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child_rss", str(root)],
                          capture_output=True, text=True, cwd=ROOT)
    rss = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    if rss is None:
        failures.append(f"RSS child exited {proc.returncode}: {proc.stderr[-2000:]}")

    base = med["pyarrow"]
    table = [
        ("`pq.read_table`, every shard in the manifest (floor)", "pyarrow"),
        ("`validate(root, load_configs=False)`: header and end marker (default)", "header"),
        ("`validate(root, load_configs=False, full_decode=True)`", "full"),
        (f"`validate(root)` with `load_configs=True` ({configs} configs through `load_dataset`; once)", "load"),
    ]
    print()
    print(f"Command: `{command}`; fixture {total_rows:,} rows ({mib:.0f} MiB, ~45 kB JPEGs, 3 rows per image); "
          f"median of {args.repeats} unless marked once.")
    print()
    print("| measurement | rows | seconds | rows/s | vs pyarrow read |")
    print("|---|---:|---:|---:|---:|")
    for label, key in table:
        print(f"| {label} | {rows[key]:,} | {med[key]:.2f} | {rows[key] / med[key]:,.0f} | {med[key] / base:.2f}× |")
    if rss:
        print()
        print(f"Peak RSS of a header-mode validate in a fresh process: {rss['peak_mb']:.0f} MB "
              f"({rss['before_mb']:.0f} MB before the run, after imports; the folder is {mib:.0f} MiB).")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
