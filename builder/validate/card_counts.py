"""The ``card_counts`` check: the card's YAML against the folder format and against the files.

The card declares each config's ``data_files`` and its ``dataset_info`` counts. Its globs must be the
folder format's (``builder.format.layout.config_data_files``), and each split's ``num_examples`` must be
the rows of the files its globs match, resolved as ``datasets`` resolves them, not as the writer meant
them: that is what a user's ``load_dataset`` will read.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from builder.format.layout import README, config_data_files
from builder.format.manifest import DatasetFolder
from builder.taxonomy import Taxonomy
from builder.validate.report import Check

Expected = dict[str, dict[str, int] | None]  # config → split → rows in the files (None: no data_files)


def check_card_counts(folder: DatasetFolder, taxonomy: Taxonomy, check: Check, file_rows: dict[str, int]) -> Expected | None:
    """Compare the card's dataset_info with the files; return config → split → rows from the files (None when
    the card gives no configs). ``file_rows``: rows of the parquet files read so far, by path; extended here."""
    card = _read_card(folder.root, check)
    if card is None:
        return None
    configs, infos = card
    expected: Expected = {}
    layout = config_data_files(taxonomy.slugs)  # what the folder format declares, config by config
    for name, config in configs.items():
        check.checked += 1
        if name not in layout:
            check.fail(f"config {name!r} is not one of the folder format's configs ({', '.join(layout)})",
                       file=README, field=f"configs.{name}")
        if not config.get("data_files"):
            check.fail("config declares no data_files", file=README, field=f"configs.{name}")
            expected[name] = None  # still loaded by configs_load, with nothing to compare
            continue
        expected[name] = _config_counts(folder.root, name, config, layout, infos, check, file_rows)
    for name in infos:
        if name not in configs:
            check.checked += 1
            check.fail(f"dataset_info entry {name!r} has no config", file=README, field=f"dataset_info.{name}")
    return expected


def _read_card(root: Path, check: Check):
    """(configs, dataset_infos) of the card's YAML; None, with the check failed, when there are none."""
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    readme = root / README
    if not readme.is_file():
        check.checked += 1
        check.fail("README.md missing: no card, so no configs", file=README)
        return None
    try:
        card = DatasetCard.load(readme)
        configs = MetadataConfigs.from_dataset_card_data(card.data)
        infos = DatasetInfosDict.from_dataset_card_data(card.data)
    except Exception as e:  # noqa: BLE001 - yaml, ValueError, TypeError from the card parsers
        check.checked += 1
        check.fail(f"card YAML does not parse: {type(e).__name__}: {e}", file=README)
        return None
    if not configs:
        check.checked += 1
        check.fail("card YAML declares no configs", file=README, field="configs")
        return None
    return configs, infos


def _config_counts(root: Path, name: str, config: dict, layout: dict, infos, check: Check,
                   file_rows: dict[str, int]) -> dict[str, int]:
    """One config: its globs against the layout's, each split's rows against its dataset_info."""
    from datasets.data_files import sanitize_patterns

    patterns = sanitize_patterns(config["data_files"])
    counts = {}
    info = infos.get(name)
    for split, globs in patterns.items():
        want = layout.get(name, {}).get(split)
        if name in layout and globs != [want]:
            check.fail(f"data_files of split {split!r} are {globs}, but the folder format's are "
                       f"{[want] if want else 'none (no such split)'}", file=README, field=f"configs.{name}.{split}")
        matched = _matched(root, globs)
        counts[split] = rows = sum(_rows_of(root, path, check, file_rows) for path in dict.fromkeys(matched))
        got = info.splits.get(split) if info is not None and info.splits else None
        if info is None:
            continue
        if got is None:
            check.fail(f"dataset_info of {name!r} has no split {split!r}", file=README,
                       field=f"dataset_info.{name}.splits")
        elif not matched:
            check.fail(f"data_files {globs} of split {split!r} match no file (dataset_info says {got.num_examples})",
                       file=README, field=f"configs.{name}.{split}")
        elif got.num_examples != rows:
            check.fail(f"num_examples {got.num_examples}, but the {len(set(matched))} files matched by {globs} hold "
                       f"{rows} rows", file=README, field=f"dataset_info.{name}.{split}.num_examples")
    if info is None:
        check.fail(f"config {name!r} has no dataset_info entry", file=README, field=f"dataset_info.{name}")
    elif info.splits and set(info.splits) - set(patterns):
        extra = sorted(set(info.splits) - set(patterns))
        check.fail(f"dataset_info of {name!r} lists splits {extra} that the config has no data_files for",
                   file=README, field=f"dataset_info.{name}.splits")
    return counts


def _matched(root: Path, globs: list[str]) -> list[str]:
    from datasets.data_files import resolve_pattern

    matched = []
    for glob in globs:
        try:
            matched += resolve_pattern(glob, str(root))
        except FileNotFoundError:
            pass
    return matched


def _rows_of(root: Path, path: str, check: Check, file_rows: dict[str, int]) -> int:
    rel = Path(path).resolve().relative_to(root.resolve()).as_posix()
    if rel not in file_rows:  # matched by a glob but never read: not under data/ or not parquet
        try:
            file_rows[rel] = pq.read_metadata(path).num_rows
        except Exception as e:  # noqa: BLE001 - any unreadable file counts as no rows, and says so
            check.fail(f"matched by a config's data_files but not readable parquet: {type(e).__name__}: {e}", file=rel)
            file_rows[rel] = 0
    return file_rows[rel]
