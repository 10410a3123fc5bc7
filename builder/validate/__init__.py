"""Validate a dataset folder before it is published: ``spa-vl validate DIR [--json] [--full_decode]``.

Ten checks (``CHECKS``: manifest, schema, labels, images, text, chosen_rejected, duplicates, leakage,
card_counts, configs_load), always in that order, each counted and each naming its first offence:
file relative to the root, 0-based row within that file, field. A bad folder gives a report with
failed checks, never an exception; one check's error does not stop the others.

- ``report``: the checks and the report (table, JSON);
- ``scan``: one pass over the files (manifest entries, schema), each shard read once;
- ``rows``: the row checks, on Arrow record batches, each distinct image decoded once;
- ``card_counts``, ``configs_load``: the card against the files, and ``load_dataset`` on every config;
- ``run``: ``validate`` itself.

    report = validate(DatasetFolder.open("out/spa_vl", lenient=True))
    print(report.format_table())
    report.ok, report.to_dict()
"""

__all__ = ["CHECKS", "Check", "ValidationReport", "validate"]


def __getattr__(name: str):
    if name in __all__:  # the checks import pyarrow and datasets: loaded on first use
        from builder.validate import run

        return getattr(run, name)
    raise AttributeError(f"module 'builder.validate' has no attribute {name!r}")
