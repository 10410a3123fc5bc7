"""Import the upstream ``sqrti/SPA-VL`` layout into a spa-vl dataset folder.

Upstream keeps its splits in four file groups, and its train rows carry no harm labels::

    data/train-0000K-of-0000N.parquet         image, question, chosen, rejected, image_name
    validation/validation-*.parquet           image, question, chosen, rejected, class1, class2, class3
    test/harm-*.parquet, test/help-*.parquet  image, question, class1, class2, class3
    train.zip                                 .../class1/class2/class3/<n>.jpg (names restart per folder)

Train rows get their labels from a class map file if one is given; rows it does not cover (every
row, without one) from the image folder tree (``train.zip`` or an extracted ``train/``): first by the
sha256 of the image bytes, then by the image name where that name is unique in the tree. A row that
none of these attributes is kept, with null labels; the dataset folder puts it in
``data/unattributed/``, which only the ``default`` config reads.
Splits are kept as upstream has them, and the row count of every split is the same in and out::

    report = import_upstream("sqrti/SPA-VL", "out/spa_vl", revision="main")
    print(report.line())
    # imported 100,788 rows (train 93,258, validation 7,000, harm 265, help 265) in ...s; ...

Every input parquet's schema is checked before anything is written; rows are streamed in record
batches, so memory stays bounded by the batch size, whatever the size of the files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import time
import zipfile
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

import httpx2
import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm.auto import tqdm

from builder.errors import DataError
from builder.folder import DatasetFolderWriter
from builder.schema import check_table_schema, image_sha256, row_id
from builder.shards import file_sha256
from builder.taxonomy import Taxonomy

UPSTREAM_REPO = "sqrti/SPA-VL"
SPLITS = ("train", "validation", "harm", "help")  # upstream split → the same split name in our folder
UPSTREAM_FILES = {
    "train": "data/train-*.parquet",
    "validation": "validation/validation-*.parquet",
    "harm": "test/harm-*.parquet",
    "help": "test/help-*.parquet",
}
TREE_ZIP, TREE_DIR = "train.zip", "train"
ATTRIBUTION_METHODS = ("class_map", "image_hash", "image_name")
LABELS = ("class1", "class2", "class3")
BATCH_ROWS = 100  # rows per record batch: about 100 images in memory at a time
EXAMPLES = 10  # unattributed rows listed by location in the report

_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_TEXT = pa.string()
_TEST_SCHEMA = {"image": _IMAGE, "question": _TEXT, **dict.fromkeys(LABELS, _TEXT)}
UPSTREAM_SCHEMAS: dict[str, dict[str, pa.DataType]] = {
    "train": {"image": _IMAGE, "question": _TEXT, "chosen": _TEXT, "rejected": _TEXT, "image_name": _TEXT},
    "validation": {"image": _IMAGE, "question": _TEXT, "chosen": _TEXT, "rejected": _TEXT,
                   **dict.fromkeys(LABELS, _TEXT)},
    "harm": _TEST_SCHEMA,
    "help": _TEST_SCHEMA,
}
CARD = {
    "title": "SPA-VL",
    "description": (
        f"Safety preference data for vision-language models, imported from {UPSTREAM_REPO} (arXiv 2406.12030): "
        "(image, question, chosen, rejected) with the harm labels class1/class2/class3, split into one config "
        "per harm domain. Upstream train rows carry no labels: they were attributed from the upstream image "
        "folder tree (or a class map), and rows that could not be attributed are in the `default` config only. "
        "It contains harmful content by design, so that models learn to decline it."
    ),
}
# A Hub repo id: "name" or "namespace/name" (what `huggingface_hub` accepts), never a path with more parts.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"), (b"BM", "bmp"),
          (b"II*\x00", "tif"), (b"MM\x00*", "tif"))


@dataclass
class ImportReport:
    """What an import did, per split. ``line()`` is the one-line summary the CLI prints."""

    out: Path
    source: str  # repo id or folder name
    commit: str | None  # the Hub commit imported; None for a local folder
    rows_in: dict[str, int]
    rows_out: dict[str, int]
    attributed_by: dict[str, int]  # train rows labelled by each method in ATTRIBUTION_METHODS
    unattributed: int
    unattributed_examples: list[tuple[str, int]] = field(default_factory=list)  # (file, row) of the first few
    seconds: float = 0.0

    def line(self) -> str:
        """``imported 1,234 rows (train 900, validation 150, ...) in 3.2s; 12 train rows unattributed (...)``"""
        splits = ", ".join(f"{s} {self.rows_out.get(s, 0):,}" for s in SPLITS)
        head = f"imported {sum(self.rows_out.values()):,} rows ({splits}) in {self.seconds:.1f}s"
        if self.unattributed:
            return f"{head}; {self.unattributed:,} train rows unattributed (kept in default config only)"
        methods = ", ".join(f"{m} {n:,}" for m, n in self.attributed_by.items() if n)
        return f"{head}; every train row attributed" + (f" ({methods})" if methods else "")


def import_upstream(
    src: str | Path,
    out: str | Path,
    *,
    revision: str | None = None,
    class_map: str | Path | None = None,
    taxonomy: Taxonomy | str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ImportReport:
    """Import the upstream layout from a local folder or a Hub dataset repo into the dataset folder ``out``.

    ``src`` is a folder when that path exists, else a Hub repo id fetched at ``revision`` (from
    ``HF_ENDPOINT``, with ``HF_TOKEN`` if set; ``train.zip`` is fetched only without a class map).
    ``class_map`` is a CSV, JSON or JSONL file with ``class1,class2,class3`` and a key column
    ``image_sha256`` or ``image_name``. Bad input raises DataError naming the file, row and field,
    and leaves no output folder.

        import_upstream("/data/SPA-VL", "out/spa_vl", class_map="labels.csv", progress=False)
    """
    started = time.perf_counter()
    if not isinstance(taxonomy, Taxonomy):
        taxonomy = Taxonomy.load(taxonomy)
    local = Path(src).exists()
    if local and not Path(src).is_dir():
        raise DataError("expected a folder in the upstream layout, or a Hub repo id", file=str(src))
    if local and revision is not None:
        raise DataError("--revision applies to a Hub repo id, not to a local folder", file=str(src), field="revision")
    source = Path(src).resolve().name if local else str(src)
    # Built first: it refuses a non-empty `out` before anything is downloaded. It writes on `with` only.
    writer = DatasetFolderWriter(
        out,
        taxonomy=taxonomy,
        build_config={"source": "upstream", "src": source, "revision": revision, "taxonomy": taxonomy.sha256},
        card=CARD,
        overwrite=overwrite,
        inputs=(src, class_map),
    )
    if local:
        root, commit = Path(src), None
    else:
        root = _download(str(src), revision, with_tree=class_map is None)
        commit = root.name  # snapshot folders are named by their commit sha

    inputs = _checked_inputs(root)
    labels = TrainLabels.build(root, class_map, taxonomy)
    rows_in = {split: sum(f.rows for f in files) for split, files in inputs.items()}
    with writer, tqdm(total=sum(rows_in.values()), desc="import", unit="row", disable=not progress) as bar:
        attributed, unattributed = _write_rows(writer, inputs, labels, bar)

    written = Counter()
    for (_, split), count in writer.summary.rows.items():  # (folder under data/, split) → rows
        written[split] += count
    rows_out = {split: written[split] for split in SPLITS}
    if rows_out != rows_in:  # the writer lost or invented rows: never leave such a folder behind
        shutil.rmtree(writer.out, ignore_errors=True)
        raise RuntimeError(f"row counts differ between input {rows_in} and output {rows_out}; output removed")
    return ImportReport(
        out=writer.out,
        source=source,
        commit=commit,
        rows_in=rows_in,
        rows_out=rows_out,
        attributed_by={m: attributed[m] for m in ATTRIBUTION_METHODS},
        unattributed=len(unattributed),
        unattributed_examples=unattributed[:EXAMPLES],
        seconds=time.perf_counter() - started,
    )


def _write_rows(writer: DatasetFolderWriter, inputs: dict[str, list[InputFile]], labels: "TrainLabels",
                bar) -> tuple[Counter, list[tuple[str, int]]]:
    """Stream every input row into the writer; return train rows attributed per method, and unattributed ones."""
    attributed, unattributed = Counter(), []
    for split, files in inputs.items():
        for f in files:
            n = -1
            for n, record in enumerate(_records(f)):
                row, label = _row(split, record, labels)
                if split == "train":
                    if label is None:
                        unattributed.append((f.rel, n))
                    else:
                        attributed[label.method] += 1
                try:
                    writer.add(row, split, file=f.rel, index=n)
                except DataError as e:
                    if label is not None and e.field in LABELS:  # say where a wrong train label came from
                        raise DataError(f"{e.message} (label from {label.source})", file=f.rel, row=n,
                                        field=e.field) from None
                    raise
                bar.update(1)
            if n + 1 != f.rows:
                raise DataError(f"read {n + 1} rows, but the file footer says {f.rows}", file=f.rel)
    return attributed, unattributed


# --- the Hub -------------------------------------------------------------------------------------------
def _download(repo_id: str, revision: str | None, *, with_tree: bool) -> Path:
    """Fetch the upstream files of ``repo_id`` (``train.zip`` only when labels must come from it).

    ``snapshot_download`` lists the repo with no timeout, so a timed ``dataset_info`` call goes first:
    it fails fast, with a clear message, on a wrong id, a wrong revision or an endpoint that does not answer.
    """
    if not _REPO_ID.match(repo_id):
        raise DataError("no such folder, and not a Hub repo id (namespace/name) either", file=repo_id)
    where = f"{repo_id} (revision {revision or 'main'}) from {constants.ENDPOINT}"
    timeout = constants.HF_HUB_ETAG_TIMEOUT
    patterns = list(UPSTREAM_FILES.values()) + ([TREE_ZIP] if with_tree else [])
    try:
        if not constants.is_offline_mode():  # offline, snapshot_download serves the cached snapshot
            HfApi().dataset_info(repo_id, revision=revision, timeout=timeout)
        path = snapshot_download(repo_id, repo_type="dataset", revision=revision, allow_patterns=patterns,
                                 etag_timeout=timeout)
    except GatedRepoError:
        raise DataError(f"cannot download {where}: the repo is gated; accept its terms on the Hub and set HF_TOKEN",
                        file=repo_id) from None
    except RepositoryNotFoundError:
        raise DataError(f"cannot download {where}: no such local folder, and no such dataset repo (or it is "
                        "private and HF_TOKEN is missing)", file=repo_id) from None
    except RevisionNotFoundError:
        raise DataError(f"cannot download {where}: the repo has no revision {revision!r}", file=repo_id) from None
    except Exception as e:  # connection, timeout, HTTP, cache and disk errors all mean the same to the user
        if _timed_out(e):
            reason = (f"the Hub did not answer within {timeout}s (set HF_HUB_ETAG_TIMEOUT and "
                      "HF_HUB_DOWNLOAD_TIMEOUT to wait longer)")
        else:
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
        raise DataError(f"cannot download {where}: {reason}", file=repo_id) from None
    return Path(path)


def _timed_out(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, (TimeoutError, httpx2.TimeoutException)):
            return True
        error = error.__cause__ or error.__context__
    return False


# --- input files ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputFile:
    path: Path
    rel: str  # posix path relative to the source folder: what errors name
    rows: int  # from the parquet footer


def _checked_inputs(root: Path) -> dict[str, list[InputFile]]:
    """Every upstream parquet file by split, its footer read and its schema checked before any row is read."""
    inputs = {}
    for split in SPLITS:
        paths = sorted(root.glob(UPSTREAM_FILES[split]))
        if not paths:
            raise DataError("no files match; is this the upstream sqrti/SPA-VL layout?",
                            file=str(root / UPSTREAM_FILES[split]))
        inputs[split] = []
        for path in paths:
            rel = path.relative_to(root).as_posix()
            try:
                with pq.ParquetFile(path) as pf:
                    schema, rows = pf.schema_arrow, pf.metadata.num_rows
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"not a readable parquet file: {e}", file=rel) from None
            check_table_schema(schema, UPSTREAM_SCHEMAS[split], file=rel)
            inputs[split].append(InputFile(path, rel, rows))
    return inputs


def _records(f: InputFile) -> Iterator[dict]:
    """The file's rows as dicts, one record batch in memory at a time."""
    done = 0
    try:
        with pq.ParquetFile(f.path) as pf:
            columns = [c for c in ("image", "question", "chosen", "rejected", "image_name", *LABELS)
                       if c in pf.schema_arrow.names]  # upstream may add columns: read only ours
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                for record in batch.to_pylist():
                    yield record
                    done += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"parquet data unreadable from row {done} on: {e}", file=f.rel) from None


# --- train labels -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Label:
    """A train row's (class1, class2, class3), how it was found, and where it came from (for errors)."""

    path: tuple[str, str, str]
    method: str  # one of ATTRIBUTION_METHODS
    source: str  # e.g. "train.zip member Malicious Use/Security threats/weapon/3.jpg"


@dataclass
class TrainLabels:
    """Label lookup for upstream train rows: class map, then image hash, then unique image name.

        labels = TrainLabels.build(Path("SPA-VL"), None, Taxonomy.load())
        labels.lookup(image_sha256(data), "170.jpg")   # Label(path=(...), method='image_hash', ...)
    """

    by_map: dict[str, Label] = field(default_factory=dict)
    map_key: str | None = None  # "image_sha256" or "image_name"
    by_hash: dict[str, list[tuple[str, Label]]] = field(default_factory=dict)  # sha → [(file name, label)]
    by_name: dict[str, list[Label]] = field(default_factory=dict)

    @classmethod
    def build(cls, root: Path, class_map: str | Path | None, taxonomy: Taxonomy) -> "TrainLabels":
        labels = cls()
        if class_map is not None:
            labels.map_key, labels.by_map = load_class_map(class_map, taxonomy)
        by_hash, by_name = defaultdict(list), defaultdict(list)
        for source, (c1, c2, c3, name), sha in _tree_files(root):
            by_hash[sha].append((name, Label((c1, c2, c3), "image_hash", source)))
            by_name[name].append(Label((c1, c2, c3), "image_name", source))
        labels.by_hash, labels.by_name = dict(by_hash), dict(by_name)
        return labels

    def lookup(self, sha: str, image_name: str | None) -> Label | None:
        if self.by_map:
            label = self.by_map.get(sha if self.map_key == "image_sha256" else image_name)
            if label is not None:
                return label
        candidates = self.by_hash.get(sha, [])
        if len({label.path for _, label in candidates}) > 1:  # the same image in several folders: ask the name
            candidates = [c for c in candidates if c[0] == image_name]
        if len({label.path for _, label in candidates}) == 1:
            return candidates[0][1]
        named = self.by_name.get(image_name, [])
        if len(named) == 1:  # names restart in every folder: only a name seen once identifies its folder
            return named[0]
        return None


def _tree_files(root: Path) -> Iterator[tuple[str, tuple[str, str, str, str], str]]:
    """(source, (class1, class2, class3, name), sha256) for every image of ``train.zip`` or ``train/``.

    The last four path components are the labels and the name; a top-level folder may precede them.
    macOS metadata (``__MACOSX/``, ``._*``, ``.DS_Store``) and files less than four levels deep are skipped.
    """
    zip_path, tree = root / TREE_ZIP, root / TREE_DIR
    if zip_path.is_file():
        try:
            with zipfile.ZipFile(zip_path) as zf:
                for info in zf.infolist():
                    parts = PurePosixPath(info.filename).parts
                    if info.is_dir() or not _is_image_path(parts):
                        continue
                    h = hashlib.sha256()
                    with zf.open(info) as f:
                        while block := f.read(1 << 20):
                            h.update(block)
                    yield f"{TREE_ZIP} member {info.filename}", tuple(parts[-4:]), h.hexdigest()
        # What zipfile raises for a damaged archive, a bad member, or an encrypted or unsupported one.
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as e:
            raise DataError(f"not a readable zip file: {type(e).__name__}: {e}", file=TREE_ZIP) from None
    elif tree.is_dir():
        for path in sorted(tree.rglob("*")):
            parts = path.relative_to(tree).parts
            if path.is_file() and _is_image_path(parts):
                yield f"{TREE_DIR}/{'/'.join(parts)}", tuple(parts[-4:]), file_sha256(path)


def _is_image_path(parts: tuple[str, ...]) -> bool:
    return len(parts) >= 4 and "__MACOSX" not in parts and not any(p.startswith(".") for p in parts)


def load_class_map(path: str | Path, taxonomy: Taxonomy) -> tuple[str, dict[str, Label]]:
    """Read a class map: (key column, key → Label). CSV, JSON (a list of objects) or JSONL.

    The key column is ``image_sha256`` when present, else ``image_name``. Every entry must be a path
    of the taxonomy, and a key may not map to two different paths.

        image_sha256,class1,class2,class3
        3b0c…,Malicious Use,Security threats,weapon
    """
    path = Path(path)
    file = str(path)
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                entries = list(csv.DictReader(f))
        elif path.suffix.lower() == ".jsonl":
            with open(path, encoding="utf-8") as f:
                entries = [json.loads(line) for line in f if line.strip()]
        elif path.suffix.lower() == ".json":
            entries = json.loads(path.read_text(encoding="utf-8"))
        else:
            raise DataError("class map must be .csv, .json or .jsonl", file=file)
    except FileNotFoundError:
        raise DataError("class map file not found", file=file) from None
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot parse class map: {e}", file=file) from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DataError("expected a list of objects, one per image", file=file)
    columns = set().union(*entries) if entries else set()
    key = "image_sha256" if "image_sha256" in columns else "image_name" if "image_name" in columns else None
    if key is None:
        raise DataError("class map needs a key column image_sha256 or image_name", file=file, field="image_sha256")

    out: dict[str, Label] = {}
    for i, entry in enumerate(entries):
        value = entry.get(key)
        if not isinstance(value, str) or not value.strip():
            raise DataError("key missing", file=file, row=i, field=key)
        value = value.strip().lower() if key == "image_sha256" else value.strip()
        labels = tuple(entry.get(c) for c in LABELS)
        for j, name in enumerate(LABELS):
            if not isinstance(labels[j], str) or not labels[j]:
                raise DataError("label missing", file=file, row=i, field=name)
            if not taxonomy.contains(*labels[: j + 1]):
                raise DataError(f"label {labels[j]!r} is not in the taxonomy ({taxonomy.source})",
                                file=file, row=i, field=name)
        label = Label(labels, "class_map", f"{path.name} row {i}")
        if value in out and out[value].path != label.path:
            raise DataError(f"{key} {value!r} maps to two label paths: {out[value].path} and {label.path}",
                            file=file, row=i, field=key)
        out[value] = label
    return key, out


# --- rows -------------------------------------------------------------------------------------------------
def _row(split: str, record: dict, labels: TrainLabels) -> tuple[dict, Label | None]:
    """Our row for an upstream record, and the label a train row got (None if unattributed or not train)."""
    image = record.get("image") or {}
    data = image.get("bytes") or b""
    sha = image_sha256(data)
    question = record.get("question")
    if split in ("harm", "help"):
        name = _image_name(image, sha)
        row = {"id": row_id(sha, _text(question)), "image": {"bytes": data, "path": name}, "image_name": name,
               "question": question, **{c: record.get(c) for c in LABELS}}
        return row, None
    label = None
    if split == "train":
        name = record.get("image_name")
        label = labels.lookup(sha, name)
        classes = dict(zip(LABELS, label.path if label else (None, None, None)))
    else:
        name = _image_name(image, sha)
        classes = {c: record.get(c) for c in LABELS}
    chosen, rejected = record.get("chosen"), record.get("rejected")
    row = {
        "id": row_id(sha, _text(question), _text(chosen), _text(rejected)),
        "image": {"bytes": data, "path": name},
        "image_name": name,
        "question": question,
        "question_type": None,  # upstream does not say which of easy / hardq / hards a question is
        "chosen": chosen,
        "rejected": rejected,
        **classes,
        "chosen_model": None,
        "rejected_model": None,
        "judge_rationale": None,
        "question_unsafe": None,
        "chosen_unsafe": None,
        "rejected_unsafe": None,
    }
    return row, label


def _text(value) -> str:
    # The id of a row with missing text is never written: the row check rejects it and names the field.
    return value if isinstance(value, str) else ""


def _image_name(image: dict, sha: str) -> str:
    """The file name of the image's ``path`` if upstream set one, else ``<sha256[:16]>.<format extension>``."""
    path = image.get("path")
    name = PurePosixPath(path.replace("\\", "/")).name if isinstance(path, str) else ""
    if name.strip():
        return name
    data = image.get("bytes") or b""
    ext = next((e for magic, e in _MAGIC if data.startswith(magic)), None)
    if ext is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        ext = "webp"
    return f"{sha[:16]}.{ext or 'jpg'}"
