"""Harm labels for upstream train rows, which carry none: who labels which row, and why not.

Methods, in this order, each only for the rows the ones before it left:

1. ``meta``: ``train/meta.json`` (the repo tree, inside ``train.zip``, or ``--meta FILE``); the row
   whose ``image_name`` is ``k.jpg`` takes entry ``k``'s class path when the entry's question, chosen
   and rejected equal the row's byte for byte. An entry with other texts labels nothing: the row is
   counted unattributed with that reason, never guessed.
2. ``image_hash``: the image tree (``train.zip`` or an extracted ``train/``), by the sha256 of the
   image bytes. Only tree images whose size equals that of an image still unlabelled are read.
3. ``class_map``: a CSV/JSON/JSONL file keyed by ``image_sha256`` or ``image_name``.
4. ``image_name`` (only with ``match_bare_names``): a bare file name that occurs once in the tree.
   Upstream's ``image_name`` is an index into meta.json, not a file name of the tree, so on the real
   layout this mislabels; it exists for trees whose names really are the rows' names.

Train files are read in two light passes before any row is written: the text columns (the join with
meta.json), then, only for row groups that still hold unlabelled rows and only when a later method
needs it, the image column (sha256 and size). The result is one small integer per row::

    labels = attribute_train(root, train_files, taxonomy=Taxonomy.load())
    labels.label(file_index, row)     # ((class1, class2, class3), "meta") or (None, None)
    labels.counts, labels.reasons     # rows per method; unattributed rows per reason
"""

from __future__ import annotations

import bisect
import hashlib
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from builder.upstream.archive import SafeZip
from builder.upstream.class_map import load_class_map
from builder.errors import DataError
from builder.files import file_digest
from builder.taxonomy import Taxonomy
from builder.upstream.meta import MetaIndex, meta_index, text_key

METHODS = ("meta", "image_hash", "class_map", "image_name")
TREE_ZIP, TREE_DIR, META_FILE = "train.zip", "train", "meta.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
NO_SOURCE = "no label source (no meta.json, image tree or class map)"
NOT_FOUND = "not in the image tree or class map"
AMBIGUOUS = "image in several tree folders"
EXAMPLES = 10


@dataclass
class TrainAttribution:
    """Per train row (file index, row): a class path index or -1, and for -1 the reason."""

    paths: list[tuple[str, str, str]] = field(default_factory=list)
    path_ids: dict[tuple[str, str, str], int] = field(default_factory=dict)
    rows: list[array] = field(default_factory=list)  # per file: path id per row, -1 unattributed
    methods: list[array] = field(default_factory=list)  # per file: METHODS index per row
    reasons: Counter = field(default_factory=Counter)  # unattributed rows per reason
    why: dict[tuple[int, int], str] = field(default_factory=dict)  # (file, row) -> reason, while pending
    examples: list[tuple[int, int, str]] = field(default_factory=list)  # (file, row, reason) of the first few
    sources: dict[str, str] = field(default_factory=dict)  # method -> what it read, for the report
    taxonomy: Taxonomy | None = None

    @property
    def counts(self) -> dict[str, int]:
        out = Counter()
        for ids, methods in zip(self.rows, self.methods):
            out.update(METHODS[m] for i, m in zip(ids, methods) if i >= 0)
        return {m: out[m] for m in METHODS}

    @property
    def unattributed(self) -> int:
        return sum(self.reasons.values())

    def label(self, file: int, row: int) -> tuple[tuple[str, str, str] | None, str | None]:
        i = self.rows[file][row]
        return (self.paths[i], METHODS[self.methods[file][row]]) if i >= 0 else (None, None)

    def pending(self) -> list[tuple[int, int]]:
        return list(self.why)

    def set(self, file: int, row: int, path: tuple[str, str, str], method: str, *, source: str,
            entry: int | None = None) -> None:
        """Label a row; a class path met for the first time must be in the taxonomy (else a DataError at ``source``)."""
        if path not in self.path_ids:
            _check_path(path, self.taxonomy, source, entry)
            self.path_ids[path] = len(self.paths)
            self.paths.append(path)
        self.rows[file][row] = self.path_ids[path]
        self.methods[file][row] = METHODS.index(method)
        self.why.pop((file, row), None)

    def finish(self) -> None:
        """Count the rows no method labelled, each under the reason its first method gave."""
        self.reasons = Counter(self.why.values())
        self.examples = [(f, r, why) for (f, r), why in sorted(self.why.items())[:EXAMPLES]]
        self.why = {}


def attribute_train(root: Path, files: list, *, taxonomy: Taxonomy, meta: str | Path | None = None,
                    class_map: str | Path | None = None, match_bare_names: bool = False) -> TrainAttribution:
    """Label every row of ``files`` (the train parquet files, each with ``.path``, ``.rel``, ``.rows``)."""
    result = TrainAttribution(rows=[array("i", [-1]) * f.rows for f in files],
                              methods=[array("b", [0]) * f.rows for f in files], taxonomy=taxonomy)
    mapped = load_class_map(class_map, taxonomy) if class_map is not None else None  # bad input fails first
    tree = ImageTree.open(root)
    try:
        index = _read_meta(root, tree, meta)
        if index is not None:
            result.sources["meta"] = index.source
        if tree is not None:
            result.sources["image_hash"] = TREE_ZIP if tree.zip is not None else f"{TREE_DIR}/"
        if mapped is not None:
            result.sources["class_map"] = str(class_map)
        _join_meta(result, files, index, tree, class_map)
        if result.why and (tree is not None or mapped is not None):
            images = _image_digests(files, result.pending())
            if tree is not None:
                _match_hashes(result, tree, images)
            if mapped is not None:
                _match_class_map(result, mapped, files, images)
            if match_bare_names and tree is not None:
                _match_names(result, tree, files)
    finally:
        if tree is not None:
            tree.close()
    result.finish()
    return result


def _check_path(path: tuple[str, str, str], taxonomy: Taxonomy, source: str, entry: int | None) -> None:
    for i, name in enumerate(("class1", "class2", "class3")):
        if not taxonomy.contains(*path[: i + 1]):
            raise DataError(f"train label {path[i]!r} (class path {'/'.join(path)}) is not in the taxonomy under "
                            f"{' / '.join(path[:i]) or 'the root'} ({taxonomy.source}); if the data is right, add "
                            "it to a taxonomy file and pass --taxonomy", file=source, row=entry, field=name)


# --- 1. meta.json ---------------------------------------------------------------------------------------
def _read_meta(root: Path, tree: "ImageTree | None", meta: str | Path | None) -> MetaIndex | None:
    """meta.json from ``--meta``, else the repo tree's ``train/meta.json``, else ``train.zip`` (None: none)."""
    if meta is not None:
        path = Path(meta)
        if not path.is_file():
            raise DataError("meta.json file not found", file=str(path), field="meta")
        with open(path, "rb") as f:
            return MetaIndex.read(f, source=str(path))
    in_tree = root / TREE_DIR / META_FILE
    if in_tree.is_file():
        with open(in_tree, "rb") as f:
            return MetaIndex.read(f, source=f"{TREE_DIR}/{META_FILE}")
    member = tree.meta_member() if tree is not None else None
    if member is None:
        return None
    with tree.zip.open(member) as f:
        return MetaIndex.read(f, source=f"{TREE_ZIP} member {member}")


def _join_meta(result: TrainAttribution, files: list, index: MetaIndex | None, tree, class_map) -> None:
    """Pass 1, text columns only: label each row from its meta.json entry, or note why not."""
    fallback = NO_SOURCE if tree is None and class_map is None else NOT_FOUND
    columns = ["image_name", "question", "chosen", "rejected"]
    for fi, f in enumerate(files):
        row = 0
        for batch in _batches(f, columns):
            cols = [batch.column(c).cast(pa.large_binary()).to_pylist() for c in columns]
            for name, q, c, r in zip(*cols):
                if index is None:
                    result.why[(fi, row)] = fallback
                else:
                    k = meta_index(name)
                    path, reason = index.lookup(k, text_key(q or b"", c or b"", r or b""))
                    if path is not None:
                        result.set(fi, row, path, "meta", source=index.source, entry=k)
                    else:
                        result.why[(fi, row)] = reason
                row += 1


def _batches(f, columns: list[str], row_groups: list[int] | None = None):
    try:
        with pq.ParquetFile(f.path) as pf:
            yield from pf.iter_batches(batch_size=4096, columns=columns, row_groups=row_groups)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"parquet data unreadable: {e}", file=f.rel) from None


# --- 2. the image tree ----------------------------------------------------------------------------------
def _image_digests(files: list, pending: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[str, int]]:
    """(file, row) -> (sha256, size) of the pending rows' images, reading only the row groups that hold them."""
    wanted: dict[int, set[int]] = defaultdict(set)
    for fi, row in pending:
        wanted[fi].add(row)
    out = {}
    for fi, rows in wanted.items():
        f = files[fi]
        with pq.ParquetFile(f.path) as pf:
            starts = [0]
            for g in range(pf.num_row_groups):
                starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
        for g in sorted({bisect.bisect_right(starts, r) - 1 for r in rows}):
            batch_rows = starts[g]
            for batch in _batches(f, ["image"], [g]):
                data = pc.struct_field(batch.column("image"), "bytes").to_pylist()
                for i, blob in enumerate(data):
                    if batch_rows + i in rows and blob:
                        out[(fi, batch_rows + i)] = (hashlib.sha256(blob).hexdigest(), len(blob))
                batch_rows += len(data)
    return out


@dataclass
class TreeImage:
    source: str  # "train.zip member <name>" or "train/<path>"
    path: tuple[str, str, str]
    name: str
    size: int


class ImageTree:
    """The ``class1/class2/class3/<name>`` images of ``train.zip`` (checked by SafeZip) or of an extracted ``train/``.

    The last four path components are the labels and the name; folders may precede them. macOS
    metadata (``__MACOSX/``, dot files) and non-image files are left out. Nothing is read until asked.
    """

    def __init__(self, images: list[TreeImage], zip_file: SafeZip | None, root: Path):
        self.images, self.zip, self.root = images, zip_file, root

    @classmethod
    def open(cls, root: Path) -> "ImageTree | None":
        zip_path, tree = root / TREE_ZIP, root / TREE_DIR
        if zip_path.is_file():
            z = SafeZip(zip_path, label=TREE_ZIP)
            images = [TreeImage(f"{TREE_ZIP} member {n}", parts[-4:-1], parts[-1], z.size(n))
                      for n in z.names() if _is_tree_image(parts := PurePosixPath(n).parts)]
            return cls(images, z, root)
        if tree.is_dir():
            images = []
            for p in sorted(tree.rglob("*")):
                parts = p.relative_to(tree).parts
                if p.is_file() and _is_tree_image(parts):
                    images.append(TreeImage(f"{TREE_DIR}/{'/'.join(parts)}", parts[-4:-1], parts[-1], p.stat().st_size))
            return cls(images, None, root) if images else None  # train/ may hold meta.json alone
        return None

    def meta_member(self) -> str | None:
        """The zip's meta.json: a member of that name at most one folder deep (``train/meta.json``)."""
        if self.zip is None:
            return None
        found = [n for n in self.zip.names() if PurePosixPath(n).name == META_FILE and len(PurePosixPath(n).parts) <= 2]
        if len(found) > 1:
            raise DataError(f"several meta.json members ({', '.join(found)}); pass --meta to choose", file=TREE_ZIP)
        return found[0] if found else None

    def read(self, image: TreeImage) -> bytes:
        if self.zip is not None:
            return self.zip.read(image.source.removeprefix(f"{TREE_ZIP} member "))
        return (self.root / image.source).read_bytes()

    def sha256(self, image: TreeImage) -> str:
        if self.zip is not None:
            return hashlib.sha256(self.read(image)).hexdigest()
        return file_digest(self.root / image.source)

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def _is_tree_image(parts: tuple[str, ...]) -> bool:
    return (len(parts) >= 4 and "__MACOSX" not in parts and not any(p.startswith(".") for p in parts)
            and PurePosixPath(parts[-1]).suffix.lower() in IMAGE_SUFFIXES)


def _match_hashes(result: TrainAttribution, tree: ImageTree, images: dict) -> None:
    sizes = {size for _, size in images.values()}
    by_hash: dict[str, list[TreeImage]] = defaultdict(list)
    for image in tree.images:
        if image.size in sizes:  # an image of another size cannot have the same bytes: never read
            by_hash[tree.sha256(image)].append(image)
    for key in result.pending():
        sha = images.get(key, (None, 0))[0]
        found = by_hash.get(sha, [])
        if len({i.path for i in found}) == 1:
            result.set(*key, found[0].path, "image_hash", source=found[0].source)
        elif found and result.why[key] == NOT_FOUND:  # a meta.json reason stays the row's reason
            result.why[key] = AMBIGUOUS


# --- 3. the class map, 4. bare names -------------------------------------------------------------------
def _match_class_map(result: TrainAttribution, mapped, files: list, images: dict) -> None:
    key_column, labels = mapped
    names = _image_names(files, result.pending()) if key_column == "image_name" else {}
    for key in result.pending():
        value = images.get(key, ("", 0))[0] if key_column == "image_sha256" else names.get(key)
        label = labels.get(value)
        if label is not None:
            result.set(*key, label.path, "class_map", source=label.source)


def _match_names(result: TrainAttribution, tree: ImageTree, files: list) -> None:
    by_name: dict[str, list[TreeImage]] = defaultdict(list)
    for image in tree.images:
        by_name[image.name].append(image)
    names = _image_names(files, result.pending())
    for key in result.pending():
        found = by_name.get(names.get(key), [])
        if len({i.path for i in found}) == 1:  # names restart in every folder: only a name seen once identifies its folder
            result.set(*key, found[0].path, "image_name", source=found[0].source)


def _image_names(files: list, pending: list[tuple[int, int]]) -> dict[tuple[int, int], str]:
    wanted = set(pending)
    out = {}
    for fi in sorted({fi for fi, _ in pending}):
        row = 0
        for batch in _batches(files[fi], ["image_name"]):
            for name in batch.column("image_name").cast(pa.large_binary()).to_pylist():
                if (fi, row) in wanted and name is not None:
                    out[(fi, row)] = name.decode("utf-8", "replace").strip()
                row += 1
    return out

