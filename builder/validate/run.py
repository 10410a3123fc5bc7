"""``validate``: every check on one ``DatasetFolder``, in the order of ``CHECKS``."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from builder.format.layout import TAXONOMY_FILE
from builder.format.manifest import DatasetFolder
from builder.taxonomy import Taxonomy
from builder.validate.card_counts import check_card_counts
from builder.validate.configs_load import check_configs_load
from builder.validate.report import CHECKS, Check, ValidationReport
from builder.validate.scan import FolderScan

__all__ = ["CHECKS", "Check", "ValidationReport", "validate"]


def validate(
    folder: DatasetFolder | str | Path,
    *,
    full_decode: bool = False,
    taxonomy: Taxonomy | None = None,
    load_configs: bool = True,
    progress: bool = True,
) -> ValidationReport:
    """Run every check on a dataset folder (a path is opened leniently, so that a broken manifest or taxonomy
    is reported); never raises for a bad folder, only for a missing one. ``taxonomy``: check the labels
    against this one instead of the folder's own."""
    folder = DatasetFolder.of(folder, lenient=True)
    started = time.perf_counter()
    report = ValidationReport.empty(folder.root, full_decode=full_decode)
    checks = {c.name: c for c in report.checks}
    if taxonomy is None and TAXONOMY_FILE in folder.problems:  # labels are then checked against the shipped one
        checks["manifest"].checked += 1
        checks["manifest"].fail(folder.problems[TAXONOMY_FILE].message, file=TAXONOMY_FILE, field="taxonomy")
    taxonomy = taxonomy or folder.taxonomy
    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 1))) as pool:
        scan = FolderScan(folder, checks, report, taxonomy, full_decode, pool)
        _guard(checks["manifest"], scan.check_manifest)
        _guard(checks["schema"], lambda: scan.scan_shards(progress))
        expected = _guard(checks["card_counts"],
                          lambda: check_card_counts(folder, taxonomy, checks["card_counts"], scan.file_rows))
    if not load_configs:
        checks["configs_load"].skipped_reason = "load_configs=False"
    elif expected is None:
        checks["configs_load"].skipped_reason = "no configs: the card did not parse (see card_counts)"
    else:
        _guard(checks["configs_load"],
               lambda: check_configs_load(folder.root, expected, checks["configs_load"], progress))
    report.seconds = time.perf_counter() - started
    return report


def _guard(check: Check, fn):
    """Run one phase; a bug or an unexpected error fails its check instead of stopping the others."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported, not swallowed
        check.fail(f"check stopped: {type(e).__name__}: {e}")
        return None
