"""Import the upstream ``sqrti/SPA-VL`` layout into a spa-vl dataset folder.

Upstream keeps its splits in four file groups, and its train rows carry no harm labels::

    data/train-0000K-of-0000N.parquet         image, question, chosen, rejected, image_name ("k.jpg")
    validation/validation-*.parquet           image, question, chosen, rejected, class1, class2, class3
    test/harm-*.parquet, test/help-*.parquet  image, question, class1, class2, class3
    train.zip                                 train/meta.json and the image tree class1/class2/class3/<n>.jpg

Train rows get their labels as ``builder.upstream.labels`` says: ``train/meta.json`` entry ``k`` for the
row whose ``image_name`` is ``k.jpg`` (its texts checked), then the image tree by content hash, then a
class map; a bare image name only when asked. A row none of them labels is kept with null labels;
the dataset folder puts it in ``data/unattributed/``, which only the ``default`` config reads, and the
summary says how many and why. Splits are kept as upstream has them, and the row count of every
split is the same in and out::

    report = import_upstream("sqrti/SPA-VL", "out/spa_vl", revision="main")
    print(report.line())
    # imported 100,788 rows (train 93,258, validation 7,000, harm 265, help 265) in ...s (... rows/s); ...

Everything is checked before or as it is read: every parquet's schema first, then per row the
texts (valid UTF-8, kept byte for byte: upstream questions begin with spaces, quotes and "\\n\\n"),
and every distinct image (its header and its end marker, so a JPEG cut short is refused here and not
in a training run). Rows are streamed in record batches, so memory stays bounded by the batch size.
Bad input raises a DataError naming the file, row and field, and leaves no output folder.
"""

from __future__ import annotations

import re
import shutil
import time
from collections import Counter
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
from builder.format.writer import DatasetFolderWriter
from builder.format.schema import check_image, check_table_schema, image_sha256, invalid_utf8, row_id
from builder.taxonomy import Taxonomy
from builder.upstream.labels import METHODS, TREE_DIR, TREE_ZIP, TrainAttribution, attribute_train
from dataset_card.card import render_folder_card

UPSTREAM_REPO = "sqrti/SPA-VL"
SPLITS = ("train", "validation", "harm", "help")  # upstream split → the same split name in our folder
UPSTREAM_FILES = {
    "train": "data/train-*.parquet",
    "validation": "validation/validation-*.parquet",
    "harm": "test/harm-*.parquet",
    "help": "test/help-*.parquet",
}
META_IN_TREE = f"{TREE_DIR}/meta.json"
ATTRIBUTION_METHODS = METHODS  # meta, image_hash, class_map, image_name: in the order they are tried
METHOD_NAMES = {"meta": "meta.json", "image_hash": "image hash", "class_map": "class map", "image_name": "bare image name"}
LABELS = ("class1", "class2", "class3")
BATCH_ROWS = 100  # rows per record batch: about 100 images in memory at a time

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
        f"Safety preference data for vision-language models, imported from {UPSTREAM_REPO}: "
        "(image, question, chosen, rejected) with the harm labels class1/class2/class3, split into one config "
        "per harm domain. Upstream train rows carry no labels: each took the class path of its entry in upstream's "
        "`train/meta.json` (its texts checked), and rows that could not be attributed are in the `default` config only. "
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
    reasons: Counter = field(default_factory=Counter)  # unattributed train rows per reason
    unattributed_examples: list[tuple[str, int, str]] = field(default_factory=list)  # (file, row, reason)
    label_sources: dict[str, str] = field(default_factory=dict)  # method -> what it read
    images: int = 0  # distinct images verified
    seconds: float = 0.0

    def line(self) -> str:
        """``imported 1,234 rows (train 900, ...) in 3.2s (386 rows/s); train labels: meta.json 880; 20 unattributed (...)``"""
        total = sum(self.rows_out.values())
        splits = ", ".join(f"{s} {self.rows_out.get(s, 0):,}" for s in SPLITS)
        rate = total / self.seconds if self.seconds > 0 else 0.0
        head = f"imported {total:,} rows ({splits}) in {self.seconds:.1f}s ({rate:,.0f} rows/s, {self.images:,} images verified)"
        methods = ", ".join(f"{METHOD_NAMES[m]} {n:,}" for m, n in self.attributed_by.items() if n) or "none"
        if not self.unattributed:
            return f"{head}; train labels: {methods}; every train row attributed"
        why = ", ".join(f"{reason} {n:,}" for reason, n in self.reasons.most_common())
        return (f"{head}; train labels: {methods}; {self.unattributed:,} train rows unattributed ({why}), "
                "kept in the default config only")


def import_upstream(
    src: str | Path,
    out: str | Path,
    *,
    revision: str | None = None,
    class_map: str | Path | None = None,
    taxonomy: Taxonomy | str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    meta: str | Path | None = None,
    match_bare_names: bool = False,
) -> ImportReport:
    """Import the upstream layout from a local folder or a Hub dataset repo into the dataset folder ``out``.

    ``src`` is a folder when that path exists, else a Hub repo id fetched at ``revision`` (from
    ``HF_ENDPOINT``, with ``HF_TOKEN`` if set; ``train.zip`` is fetched only when train labels must come
    from it). ``meta`` is a ``meta.json`` file to use instead of the one in ``src``; ``class_map`` a
    CSV, JSON or JSONL file with ``class1,class2,class3`` and a key column ``image_sha256`` or
    ``image_name``; ``match_bare_names`` lets a file name that is unique in the image tree label a row.
    Bad input raises DataError naming the file, row and field, and leaves no output folder.

        import_upstream("/data/SPA-VL", "out/spa_vl", progress=False)
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
    writer = _writer(out, source, revision, taxonomy, overwrite, inputs=(src, class_map, meta))
    if local:
        root, commit = Path(src), None
    else:
        root = _download(str(src), revision, with_tree=class_map is None and meta is None)
        commit = root.name  # snapshot folders are named by their commit sha

    inputs = _checked_inputs(root)
    labels = attribute_train(root, inputs["train"], taxonomy=taxonomy, meta=meta, class_map=class_map,
                             match_bare_names=match_bare_names)
    rows_in = {split: sum(f.rows for f in files) for split, files in inputs.items()}
    with writer, tqdm(total=sum(rows_in.values()), desc="import", unit="row", disable=not progress) as bar:
        images = _write_rows(writer, inputs, labels, bar)
    train_files = [f.rel for f in inputs["train"]]
    return ImportReport(
        out=writer.out, source=source, commit=commit, rows_in=rows_in, rows_out=_rows_written(writer, rows_in),
        attributed_by=labels.counts, unattributed=labels.unattributed, reasons=labels.reasons,
        unattributed_examples=[(train_files[f], row, why) for f, row, why in labels.examples],
        label_sources=labels.sources, images=images, seconds=time.perf_counter() - started,
    )


def _writer(out, source: str, revision: str | None, taxonomy: Taxonomy, overwrite: bool, inputs: tuple
            ) -> DatasetFolderWriter:
    """The folder writer of an import: it refuses a non-empty ``out`` now, writes on ``with`` only, and
    renders the card on the finished folder."""
    return DatasetFolderWriter(
        out,
        taxonomy=taxonomy,
        build_config={"source": "upstream", "src": source, "revision": revision, "taxonomy": taxonomy.sha256},
        card=CARD,
        overwrite=overwrite,
        inputs=inputs,
        decode=None,  # every distinct image is checked here, once (see _write_rows)
        finish=render_folder_card,
    )


def _rows_written(writer: DatasetFolderWriter, rows_in: dict[str, int]) -> dict[str, int]:
    """Rows per split in the written folder; a folder whose counts differ from the input's is removed."""
    written = Counter()
    for (_, split), count in writer.summary.rows.items():  # (folder under data/, split) → rows
        written[split] += count
    rows_out = {split: written[split] for split in SPLITS}
    if rows_out != rows_in:  # the writer lost or invented rows: never leave such a folder behind
        shutil.rmtree(writer.out, ignore_errors=True)
        raise RuntimeError(f"row counts differ between input {rows_in} and output {rows_out}; output removed")
    return rows_out


def _write_rows(writer: DatasetFolderWriter, inputs: dict[str, list[InputFile]], labels: TrainAttribution,
                bar) -> int:
    """Stream every input row into the writer, each distinct image checked once; return how many were checked."""
    verified: set[str] = set()
    for split, files in inputs.items():
        for fi, f in enumerate(files):
            n = -1
            for n, record in enumerate(_records(f)):
                label = labels.label(fi, n)[0] if split == "train" else None
                row, sha = _row(split, record, label)
                if sha not in verified:
                    try:
                        check_image(row["image"])
                    except DataError as e:
                        raise e.located(file=f.rel, row=n) from None
                    verified.add(sha)
                writer.add(row, split, file=f.rel, index=n)
                bar.update(1)
            if n + 1 != f.rows:
                raise DataError(f"read {n + 1} rows, but the file footer says {f.rows}", file=f.rel)
    return len(verified)


# --- the Hub -------------------------------------------------------------------------------------------
def _download(repo_id: str, revision: str | None, *, with_tree: bool) -> Path:
    """Fetch the upstream files of ``repo_id``: the parquet files, ``train/meta.json`` if the repo tree has
    one, and ``train.zip`` when ``with_tree`` and the tree has no meta.json (then train labels come from the zip).

    ``snapshot_download`` lists the repo with no timeout, so a timed ``dataset_info`` call goes first:
    it fails fast, with a clear message, on a wrong id, a wrong revision or an endpoint that does not answer.
    """
    if not _REPO_ID.match(repo_id):
        raise DataError("no such folder, and not a Hub repo id (namespace/name) either", file=repo_id)
    where = f"{repo_id} (revision {revision or 'main'}) from {constants.ENDPOINT}"
    timeout = constants.HF_HUB_ETAG_TIMEOUT
    patterns = list(UPSTREAM_FILES.values()) + [META_IN_TREE]
    try:
        files = None
        if not constants.is_offline_mode():  # offline, snapshot_download serves the cached snapshot
            info = HfApi().dataset_info(repo_id, revision=revision, timeout=timeout)
            files = {s.rfilename for s in info.siblings or []}
        if with_tree and (files is None or META_IN_TREE not in files):
            patterns.append(TREE_ZIP)
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
                for name in batch.schema.names:  # parquet readers hand strings over unchecked
                    bad = invalid_utf8(batch.column(name))
                    if bad:
                        raise DataError(bad[0][1], file=f.rel, row=done + bad[0][0], field=name)
                for record in batch.to_pylist():
                    yield record
                    done += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"parquet data unreadable from row {done} on: {e}", file=f.rel) from None


# --- rows -------------------------------------------------------------------------------------------------
def _row(split: str, record: dict, label: tuple[str, str, str] | None) -> tuple[dict, str]:
    """Our row for an upstream record (a train row with its attributed ``label``, or None), and its image's sha256."""
    image = record.get("image") or {}
    data = image.get("bytes") or b""
    sha = image_sha256(data)
    question = record.get("question")
    if split in ("harm", "help"):
        name = _image_name(image, sha)
        row = {"id": row_id(sha, _text(question)), "image": {"bytes": data, "path": name}, "image_name": name,
               "question": question, **{c: record.get(c) for c in LABELS}}
        return row, sha
    if split == "train":
        name = record.get("image_name")
        classes = dict(zip(LABELS, label or (None, None, None)))
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
    return row, sha


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
