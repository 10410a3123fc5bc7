"""The ``configs_load`` check: every config the card declares loads with ``datasets.load_dataset``, as a
user would load it, and gives the rows its files hold."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from builder.format.layout import README
from builder.validate.report import Check


def check_configs_load(root: Path, expected: dict[str, dict[str, int] | None], check: Check, progress: bool) -> None:
    """``load_dataset(root, name)`` for every config, into a cache that is removed after."""
    import datasets
    from datasets import load_dataset

    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    if not progress:
        datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a failed load is reported in the check, not logged too
    cache = tempfile.mkdtemp(prefix="spa-vl-validate-")
    try:
        for name, want in expected.items():
            check.checked += 1
            try:
                ds = load_dataset(str(root), name, cache_dir=cache)
                got = {split: d.num_rows for split, d in ds.items()}
            except Exception as e:  # noqa: BLE001 - whatever stops a user's load stops the publish
                check.fail(f"load_dataset fails: {_error_text(e)}", file=README, field=f"configs.{name}")
                continue
            if want is not None and got != want:
                check.fail(f"load_dataset gives {got}, the files hold {want}", file=README, field=f"configs.{name}")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        datasets.logging.set_verbosity(verbosity)
        if bars and not datasets.is_progress_bar_enabled():
            datasets.enable_progress_bars()


def _error_text(e: BaseException, limit: int = 400) -> str:
    """An exception and its causes on one line: `datasets` wraps the useful error (a CastError, say) in another."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen and len(parts) < 4:
        seen.add(id(e))
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        text = lines[0] if len(lines) <= 2 else f"{lines[0]} … {lines[-1]}"
        parts.append(f"{type(e).__name__}: {text[:limit]}")
        e = e.__cause__ or e.__context__
    return "; caused by ".join(parts)
