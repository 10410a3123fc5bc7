"""Where everything sits in a dataset folder, which files make which config, and how shards are named.

    <root>/README.md                         card: YAML (configs, dataset_info, licence) + prose
    <root>/CHANGELOG.md                      one entry per version (``spa-vl version``)
    <root>/data/<domain>/{train,validation}-0000K-of-0000N.parquet
    <root>/data/unattributed/train-*.parquet train rows without labels: in ``default`` only
    <root>/data/test/{harm,help}-0000K-of-0000N.parquet
    <root>/assets/*.png                      the card's plots
    <root>/manifest.json                     every file's sha256, bytes, rows; version; build config hash
    <root>/taxonomy.yaml                     the taxonomy the folder was built with (its labels' meaning)
    <root>/review/                           people's verdicts on the judge (``spa-vl review``)
    <root>/.spa_vl/                          local history (released row ids); never published

Every module that needs one of these names or rules takes it from here::

    config_data_files(["malicious_use"])["malicious_use"]   # {"train": "data/malicious_use/train-*", ...}
    shard_key("data/test/harm-00000-of-00001.parquet")      # ("test", "harm")
"""

from __future__ import annotations

from collections.abc import Iterable

from builder.errors import DataError

FORMAT = "spa-vl-dataset/1"
MANIFEST = "manifest.json"
README = "README.md"
CHANGELOG = "CHANGELOG.md"
TAXONOMY_FILE = "taxonomy.yaml"  # the taxonomy the folder was built with; published with it
DATA_DIR = "data"
ASSETS_DIR = "assets"  # the card's plots
HISTORY_DIR = ".spa_vl"  # local history (released row ids); never published
REVIEW_DIR = "review"  # people's verdicts on the judge (`spa-vl review`): published, not in the manifest, kept on rebuild
UPSTREAM_FIXTURE_MARK = ".spa_vl_fixture.json"  # in a folder `spa-vl fixture --layout upstream` wrote
PARTIAL_MARK = ".spa_vl_pull.json"  # in `.OUT.partial`: the pull (repo, revision, pid) it holds

PREFERENCE_SPLITS = ("train", "validation")
EVAL_SPLITS = ("harm", "help")
SPLITS = PREFERENCE_SPLITS + EVAL_SPLITS
DEFAULT_CONFIG = "default"
TEST_CONFIG = "test"
UNATTRIBUTED = "unattributed"  # train rows without labels: in `default` only, never in a domain config


def config_data_files(domain_slugs: Iterable[str]) -> dict[str, dict[str, str]]:
    """config name → split → glob, relative to the folder root (what the README's `configs:` declares)."""
    out = {DEFAULT_CONFIG: {s: f"{DATA_DIR}/*/{s}-*" for s in PREFERENCE_SPLITS}}
    for slug in domain_slugs:
        out[slug] = {s: f"{DATA_DIR}/{slug}/{s}-*" for s in PREFERENCE_SPLITS}
    out[TEST_CONFIG] = {s: f"{DATA_DIR}/{TEST_CONFIG}/{s}-*" for s in EVAL_SPLITS}
    return out


def config_folders(config: str, folders: Iterable[str]) -> list[str]:
    """The folders under ``data/`` (among ``folders``) whose shards make ``config``: ``default`` is every
    preference folder (``unattributed`` included), a domain config and ``test`` are their own folder."""
    if config == DEFAULT_CONFIG:
        return [f for f in dict.fromkeys(folders) if f != TEST_CONFIG]
    return [f for f in dict.fromkeys(folders) if f == config]


def shard_name(split: str, index: int, count: int) -> str:
    """``train-00002-of-00005.parquet``: shard ``index`` (0-based) of the ``count`` shards of a split."""
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


def shard_place(rel: str) -> tuple[str | None, str]:
    """``data/<folder>/<split>-*`` → (folder, split) as the path says, unchecked: the folder is None for a
    path not two levels under ``data/``, the split is the file name up to its first ``-``."""
    parts = rel.split("/")
    folder = parts[1] if len(parts) == 3 and parts[0] == DATA_DIR else None
    return folder, parts[-1].split("-", 1)[0]


def shard_key(rel: str) -> tuple[str, str]:
    """``data/<folder>/<split>-0000K-of-0000N.parquet`` → (folder, split); a DataError for any other path."""
    folder, split = shard_place(rel)
    if folder is None or "-" not in rel.rsplit("/", 1)[-1]:
        raise DataError("not a shard path of a dataset folder (data/<folder>/<split>-*.parquet)", file=rel)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} in a shard path", file=rel)
    return folder, split


def split_for(image_sha256: str, validation_fraction: float) -> str:
    """Train or validation, from the image hash alone: one image never sits in two splits."""
    return "validation" if int(image_sha256[:8], 16) < validation_fraction * 0x1_0000_0000 else "train"
