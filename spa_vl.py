"""SPA-VL: safety preference data for vision-language models, one config per harm domain.

A `datasets` builder for the spa-vl dataset folder (see the project README), modelled on
`datasets`' packaged parquet builder: it streams Arrow record batches straight from the parquet
shards of the requested config, from a local folder or a Hub dataset repo at a pinned revision.

Configs: ``default`` (train + validation, all domains), one per harm domain (train + validation), and
``test`` (harm + help). The domains are those of the folder's own ``taxonomy.yaml`` (the taxonomy it
was built with); a folder written before folders carried one has the shipped six (``DOMAINS``).

Use it three ways::

    # 1. Any datasets version, no script: the folder's README declares the configs.
    load_dataset("path/to/spa_vl_folder", "malicious_use")

    # 2. This module, from a folder or a Hub repo, with filters pushed down to parquet.
    import spa_vl
    ds = spa_vl.load("malicious_use", "train", source="org/SPA-VL", revision="v1.0.0",
                     filters={"class2": "Fraud or deceptive action"})

    # 3. datasets < 4 only: as a loading script.
    load_dataset("path/to/spa_vl.py", "malicious_use", data_dir="path/to/spa_vl_folder")

This file imports nothing from the rest of the project, so it works when copied alone
(that is how `datasets` runs loading scripts).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from glob import glob
from typing import Any, Optional, Union

import datasets
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

try:  # datasets >= 4 keys batches with Key; older versions take any hashable key
    from datasets.builder import Key as _Key
except ImportError:  # pragma: no cover - depends on the installed datasets
    _Key = None

try:  # the project's error type (file, row, field) when spa-vl is installed
    from builder.errors import DataError
except ImportError:  # pragma: no cover - this file copied alone: the same shape, the field only

    class DataError(ValueError):
        def __init__(self, message: str, *, file=None, row=None, field=None):
            self.message, self.file, self.row, self.field = message, file, row, field
            super().__init__(f"field {field}: {message}" if field else message)

_DESCRIPTION = "SPA-VL (arXiv 2406.12030): (image, question, chosen, rejected) safety preference pairs, per harm domain."
_CITATION = """@inproceedings{zhang2025spavl,
  title={SPA-VL: A Comprehensive Safety Preference Alignment Dataset for Vision Language Models},
  author={Zhang, Yongting and Chen, Lu and Zheng, Guodong and others},
  booktitle={CVPR}, year={2025}}"""
_LICENSE = "cc-by-4.0"

# Domain config slug -> class1 label, byte for byte as in the upstream data. Kept in step with
# builder/taxonomy.yaml by a test (this file must stand alone, so it cannot read that file).
DOMAINS = {
    "representation_toxicity": "Representation & ToxicityHarms",
    "misinformation": "Misinformation Harms",
    "information_safety": "Information & Safety Harms",
    "malicious_use": "Malicious Use",
    "human_autonomy_integrity": "Human Autonomy & IntegrityHarms",
    "socioeconomic": "Socioeconomic Harms",
}
# The folder layout this file reads, copied from its owner, builder/format/layout.py (PREFERENCE_SPLITS,
# EVAL_SPLITS, TAXONOMY_FILE, config_data_files): this file must work copied alone, so it keeps its own
# small copy, held in step with the owner by tests/test_spa_vl.py.
PREFERENCE_SPLITS = ("train", "validation")
EVAL_SPLITS = ("harm", "help")
SOURCE_ENV = "SPA_VL_SOURCE"  # where `load` looks when no source is given
TAXONOMY_FILE = "taxonomy.yaml"  # the taxonomy a dataset folder was built with
_SLUG = re.compile(r"[a-z][a-z0-9_]*")


def config_files(config: str) -> dict[str, str]:
    """split -> glob of the config's shards, relative to the dataset folder root (the globs of
    ``builder.format.layout.config_data_files``, narrowed to parquet files)."""
    if config == "test":
        return {s: f"data/test/{s}-*.parquet" for s in EVAL_SPLITS}
    folder = "*" if config == "default" else config
    return {s: f"data/{folder}/{s}-*.parquet" for s in PREFERENCE_SPLITS}


Filters = Union[dict, list, ds.Expression, None]


def filters_to_expression(filters: Filters) -> Optional[ds.Expression]:
    """``{"class2": "Privacy", "class3": ["theft", "rumors"]}`` (AND of equals / is-in), pyarrow's
    DNF list form ``[("class2", "==", "Privacy")]``, or a ``pyarrow.dataset`` expression."""
    if filters is None or isinstance(filters, ds.Expression):
        return filters
    if isinstance(filters, dict):
        expr = None
        for column, value in filters.items():
            values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
            term = ds.field(column).isin(values) if len(values) != 1 else ds.field(column) == values[0]
            expr = term if expr is None else expr & term
        return expr
    if isinstance(filters, list):
        return pq.filters_to_expression(filters)
    raise TypeError(f"filters must be a dict, a list of tuples or a pyarrow expression, got {type(filters).__name__}")


def _filter_columns(filters: Filters) -> set[str]:
    if isinstance(filters, dict):
        return set(filters)
    if isinstance(filters, list):
        flat = filters if filters and isinstance(filters[0], tuple) else [t for group in filters for t in group]
        return {t[0] for t in flat}
    return set()


@dataclass
class SpaVLConfig(datasets.BuilderConfig):
    """One harm domain (or ``default``/``test``) of a spa-vl dataset folder.

    Args:
        source: a local dataset folder or a Hub dataset repo id; defaults to ``data_dir``.
        revision: a Hub branch, tag (``v1.2.0``) or commit; resolved to a commit sha before reading.
        filters: rows to keep, pushed down to the parquet scan (see ``filters_to_expression``).
        columns: columns to read (default all); e.g. leave out ``image`` for text-only work.
        batch_size: rows per Arrow record batch (default: the shards' row-group size).
        data_fingerprint: changes the cache key when the data change (``load`` sets it).
    """

    source: Optional[str] = None
    revision: Optional[str] = None
    filters: Any = None
    columns: Optional[list] = None
    batch_size: Optional[int] = None
    data_fingerprint: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        if self.name not in ("default", "test") and not _SLUG.fullmatch(self.name or ""):
            raise ValueError(f"unknown config {self.name!r}: a config is default, test or a domain slug "
                             f"such as {next(iter(DOMAINS))}")
        if self.columns is not None and self.filters is not None:
            missing = _filter_columns(self.filters) - set(self.columns)
            if missing:
                raise ValueError(f"filter columns {sorted(missing)} must be among the read columns {self.columns}")


class SpaVL(datasets.ArrowBasedBuilder):
    """Reads the parquet shards of one config, batch by batch, from a folder or a Hub repo."""

    BUILDER_CONFIG_CLASS = SpaVLConfig
    BUILDER_CONFIGS = [
        SpaVLConfig(name="default", description="All harm domains: train and validation."),
        *[SpaVLConfig(name=slug, description=f"{label}: train and validation.") for slug, label in DOMAINS.items()],
        SpaVLConfig(name="test", description="HarmEval (harm) and HelpEval (help) questions."),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self):
        return datasets.DatasetInfo(description=_DESCRIPTION, citation=_CITATION, license=_LICENSE)

    # --- where the files are ---------------------------------------------------------------
    def _source(self) -> str:
        source = self.config.source or self.config.data_dir
        if source is None and self.base_path and glob(os.path.join(self.base_path, "data", "*")):
            source = self.base_path  # a loading script that sits in its dataset folder
        if source is None:
            raise ValueError(
                "no source: pass source= a spa-vl dataset folder or a Hub dataset repo id "
                f"(or data_dir=, or set {SOURCE_ENV})"
            )
        return source

    def _resolve_files(self) -> dict[str, list[str]]:
        source = self._source()
        patterns = config_files(self.config.name)
        if os.path.isdir(source):
            files = {split: sorted(glob(os.path.join(source, p))) for split, p in patterns.items()}
            where = source
        else:
            files, where = _hub_files(source, self.config.revision, patterns)
        if self.config.name not in ("default", "test"):
            known = domains(where)
            if self.config.name not in known:
                raise ValueError(f"unknown config {self.config.name!r}: {where} has default, "
                                 f"{', '.join(known)} and test")
        files = {split: found for split, found in files.items() if found}  # an empty split has no files
        if not files:
            raise FileNotFoundError(
                f"{where}: no files match {' or '.join(patterns.values())} for config {self.config.name!r}; "
                "is this a spa-vl dataset folder (README.md, data/, manifest.json)?"
            )
        return files

    def _split_generators(self, dl_manager):
        files = dl_manager.download(self._resolve_files())  # hub URLs are fetched (or streamed); local paths pass
        if self.info.features is None:
            first = next(f for fs in files.values() for f in fs)
            with open(first, "rb") as f:
                try:
                    features = datasets.Features.from_arrow_schema(pq.read_schema(f))
                except pa.ArrowInvalid as e:
                    raise ValueError(f"{first}: not a readable parquet file: {e}") from None
            if self.config.columns is not None:
                unknown = [c for c in self.config.columns if c not in features]
                if unknown:
                    raise ValueError(f"unknown columns {unknown}; the data has {list(features)}")
                features = datasets.Features({c: features[c] for c in self.config.columns})
            self.info.features = features
        _check_filter_columns(self.config.filters, self.info.features)
        return [datasets.SplitGenerator(name=split, gen_kwargs={"files": fs}) for split, fs in files.items()]

    # --- reading -----------------------------------------------------------------------------
    def _generate_tables(self, files):
        expr = filters_to_expression(self.config.filters)
        schema = self.info.features.arrow_schema
        fmt = ds.ParquetFileFormat()
        for file_idx, file in enumerate(files):
            with open(file, "rb") as f:
                try:
                    fragment = fmt.make_fragment(f)
                    if not fragment.row_groups:
                        continue
                    batch_size = self.config.batch_size or fragment.row_groups[0].num_rows
                    batches = fragment.to_batches(
                        batch_size=batch_size, columns=self.config.columns, filter=expr,
                        batch_readahead=0, fragment_readahead=0,
                    )
                    for batch_idx, batch in enumerate(batches):
                        key = _Key(file_idx, batch_idx) if _Key else f"{file_idx}_{batch_idx}"
                        yield key, pa.Table.from_batches([batch]).cast(schema)
                except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
                    raise ValueError(f"{file}: cannot read as a spa-vl shard: {e}") from None


def domains(where: str) -> dict[str, str]:
    """Domain config slug -> class1 label of the dataset at ``where`` (a folder, or ``hf://datasets/REPO@SHA``),
    from its ``taxonomy.yaml``; the shipped ``DOMAINS`` for a folder written before folders carried one."""
    import yaml

    path = f"{where}/{TAXONOMY_FILE}"
    try:
        if where.startswith("hf://"):
            from huggingface_hub import HfFileSystem

            with HfFileSystem().open(path[len("hf://"):], "r", encoding="utf-8") as f:
                text = f.read()
        else:
            with open(os.path.join(where, TAXONOMY_FILE), encoding="utf-8") as f:
                text = f.read()
    except FileNotFoundError:
        return dict(DOMAINS)
    try:
        return {d["slug"]: d["label"] for d in yaml.safe_load(text)["domains"]}
    except (yaml.YAMLError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a spa-vl taxonomy ({type(e).__name__}: {e})") from None


def _check_filter_columns(filters: Filters, features: datasets.Features) -> None:
    """A filter on a column the data does not have names that column (pyarrow would name the whole schema)."""
    for column in sorted(_filter_columns(filters)):
        if column not in features:
            raise DataError(f"unknown filter column {column!r}; the data has {', '.join(features)}", field=column)


def _hub_files(repo_id: str, revision: Optional[str], patterns: dict[str, str]) -> tuple[dict[str, list[str]], str]:
    """List a Hub repo's shards at a revision pinned to its commit sha, as hf:// URLs."""
    from huggingface_hub import HfApi, HfFileSystem

    sha = revision if _is_commit(revision) else HfApi().dataset_info(repo_id, revision=revision, timeout=30).sha
    fs = HfFileSystem()
    root = f"datasets/{repo_id}@{sha}"
    files = {split: sorted("hf://" + p for p in fs.glob(f"{root}/{pattern}")) for split, pattern in patterns.items()}
    return files, f"hf://{root}"


def _is_commit(revision: Optional[str]) -> bool:
    return revision is not None and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


def _fingerprint(source: str, revision: Optional[str]) -> str:
    """What identifies the data: the manifest of a local folder, the commit of a Hub revision."""
    manifest = os.path.join(source, "manifest.json")
    if os.path.isdir(source):
        if os.path.exists(manifest):
            with open(manifest, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()[:16]
        mtimes = sorted((p, os.path.getmtime(p)) for p in glob(os.path.join(source, "data", "*", "*.parquet")))
        return hashlib.sha256(repr(mtimes).encode()).hexdigest()[:16]
    from huggingface_hub import HfApi

    return HfApi().dataset_info(source, revision=revision, timeout=30).sha


def load(
    config: str = "default",
    split: Optional[str] = None,
    *,
    source: Optional[str] = None,
    revision: Optional[str] = None,
    streaming: bool = False,
    filters: Filters = None,
    cache_dir: Optional[str] = None,
    keep_in_memory: bool = False,
    **config_kwargs,
):
    """Load one config of a spa-vl dataset from a folder or a Hub repo (``source``, else ``$SPA_VL_SOURCE``).

    Returns a ``DatasetDict`` (or a ``Dataset`` when ``split`` is given); an ``IterableDataset(Dict)``
    when ``streaming``. ``filters`` keeps matching rows only, evaluated inside the parquet scan::

        spa_vl.load("malicious_use", "train", source="out/spa_vl", filters={"class3": ["theft", "malware"]})

    ``keep_in_memory`` reads the shards straight into memory with pyarrow and writes no cache:
    the fastest cold load, at the price of holding the whole config in RAM (use it for one domain
    or a filtered slice, not for everything).
    """
    source = source or os.environ.get(SOURCE_ENV)
    if source is None:
        raise ValueError(f"no source: pass source= a spa-vl dataset folder or a Hub repo id, or set {SOURCE_ENV}")
    if os.path.isdir(source):
        source = os.path.abspath(source)
    else:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(source)
        except HFValidationError:
            raise FileNotFoundError(f"{source}: no such dataset folder, and not a Hub repo id (namespace/name)") from None
    kwargs = dict(source=source, revision=revision, filters=filters, **config_kwargs)
    if not streaming:
        # For a Hub repo the fingerprint is the commit: pin the revision to it, so files are listed at that commit.
        kwargs["data_fingerprint"] = _fingerprint(source, revision)
        if not os.path.isdir(source):
            kwargs["revision"] = kwargs["data_fingerprint"]
    builder_class = SpaVL
    if config not in {c.name for c in SpaVL.BUILDER_CONFIGS}:  # a domain of the folder's own taxonomy
        builder_class = type("SpaVL", (SpaVL,), {"BUILDER_CONFIGS": [*SpaVL.BUILDER_CONFIGS, SpaVLConfig(name=config)]})
    builder = builder_class(config_name=config, cache_dir=cache_dir, **kwargs)
    if keep_in_memory and not streaming:
        return _load_in_memory(builder, split)
    if streaming:
        return builder.as_streaming_dataset(split=split)
    builder.download_and_prepare()
    return _prepared(builder, split)


def _prepared(builder: SpaVL, split: Optional[str]):
    """``builder.as_dataset``, except that a split with no rows (a filter that matches nothing) is an empty
    ``Dataset`` with the config's features, as streaming and ``keep_in_memory`` give, not an error."""
    from datasets.table import InMemoryTable

    names = list(builder.info.splits) if split is None else [split]
    out = {}
    for name in names:
        info = builder.info.splits.get(name)
        if info is not None and info.num_examples == 0:
            table = builder.info.features.arrow_schema.empty_table()
            out[name] = datasets.Dataset(InMemoryTable(table), info=builder.info.copy(), split=datasets.NamedSplit(name))
        else:
            out[name] = builder.as_dataset(split=name)  # `datasets` names an unknown split
    return out[split] if split is not None else datasets.DatasetDict(out)


def _load_in_memory(builder: SpaVL, split: Optional[str]):
    """Read a config's shards into in-memory Arrow tables: no cache written, no row copied twice."""
    from datasets.table import InMemoryTable

    cfg = builder.config
    files = builder._resolve_files()
    if split is not None and split not in files:
        raise ValueError(f"unknown split {split!r} for config {cfg.name!r}; available: {list(files)}")
    filesystem = None
    if any(f.startswith("hf://") for fs in files.values() for f in fs):
        from huggingface_hub import HfFileSystem

        filesystem = HfFileSystem()
        files = {s: [f[len("hf://"):] for f in fs] for s, fs in files.items()}
    out = {}
    for name, paths in files.items():
        if split is not None and name != split:
            continue
        scan = ds.dataset(paths, format="parquet", filesystem=filesystem)
        _check_filter_columns(cfg.filters, datasets.Features.from_arrow_schema(scan.schema))
        table = scan.to_table(columns=cfg.columns, filter=filters_to_expression(cfg.filters))
        features = datasets.Features.from_arrow_schema(scan.schema)
        if cfg.columns is not None:
            features = datasets.Features({c: features[c] for c in cfg.columns})
        # An explicit fingerprint: otherwise `datasets` hashes every byte of the table.
        fingerprint = hashlib.sha256(repr((cfg.data_fingerprint, cfg.name, name, cfg.columns, str(cfg.filters))).encode()).hexdigest()[:16]
        out[name] = datasets.Dataset(
            InMemoryTable(table.cast(features.arrow_schema)),
            info=datasets.DatasetInfo(features=features, description=_DESCRIPTION, citation=_CITATION, license=_LICENSE),
            split=datasets.NamedSplit(name),
            fingerprint=fingerprint,
        )
    return out[split] if split is not None else datasets.DatasetDict(out)
