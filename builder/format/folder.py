"""The dataset folder: the one format every part of spa-vl writes and reads.

    <root>/README.md                         card: YAML (configs, dataset_info, licence) + prose
    <root>/data/<domain>/{train,validation}-0000K-of-0000N.parquet
    <root>/data/test/{harm,help}-0000K-of-0000N.parquet
    <root>/manifest.json                     every file's sha256, bytes, rows; version; build config hash
    <root>/taxonomy.yaml                     the taxonomy the folder was built with (its labels' meaning)

``DatasetFolderWriter`` builds it from rows in any order. Every row passes ``check_row`` first; the
folder is assembled in a temporary sibling and renamed into place only when complete, so bad input
leaves no output folder behind. ``prepare_output`` is the one guard every command that writes a folder
calls first: it replaces only a folder spa-vl wrote, of the same kind, that is not an input, and it
sweeps what dead runs left beside ``OUT``::

    with DatasetFolderWriter("out/spa_vl", build_config={"source": "fixture"}) as w:
        w.add(row, "train")
    w.summary   # FolderSummary(rows={('malicious_use', 'train'): 120, ...}, ...)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from datasets import SplitInfo

from builder.errors import DataError
from builder.format.schema import EVAL_FEATURES, PREFERENCE_FEATURES, check_row
from builder.format.shards import (
    DEFAULT_MAX_SHARD_BYTES,
    DEFAULT_ROW_GROUP_ROWS,
    Shard,
    ShardWriter,
)
from builder.taxonomy import Taxonomy

FORMAT = "spa-vl-dataset/1"
PREFERENCE_SPLITS = ("train", "validation")
EVAL_SPLITS = ("harm", "help")
TEST_CONFIG = "test"
DEFAULT_CONFIG = "default"
CHANGELOG = "CHANGELOG.md"
HISTORY_DIR = ".spa_vl"  # local history (released row ids); never published
UNATTRIBUTED = "unattributed"  # train rows without labels: in `default` only, never in a domain config
REVIEW_DIR = "review"  # people's verdicts on the judge (`spa-vl review`): published, not in the manifest, kept on rebuild
TAXONOMY_FILE = "taxonomy.yaml"  # the taxonomy the folder was built with; published with it
UPSTREAM_FIXTURE_MARK = ".spa_vl_fixture.json"  # in a folder `spa-vl fixture --layout upstream` wrote
PARTIAL_MARK = ".spa_vl_pull.json"  # in `.OUT.partial`: the pull (repo, revision, pid) it holds


def config_data_files(domain_slugs: list[str]) -> dict[str, dict[str, str]]:
    """config name → split → glob, relative to the folder root (what the README's `configs:` declares)."""
    out = {DEFAULT_CONFIG: {s: f"data/*/{s}-*" for s in PREFERENCE_SPLITS}}
    for slug in domain_slugs:
        out[slug] = {s: f"data/{slug}/{s}-*" for s in PREFERENCE_SPLITS}
    out[TEST_CONFIG] = {s: f"data/{TEST_CONFIG}/{s}-*" for s in EVAL_SPLITS}
    return out


def split_for(image_sha256: str, validation_fraction: float) -> str:
    """Train or validation, from the image hash alone: one image never sits in two splits."""
    return "validation" if int(image_sha256[:8], 16) < validation_fraction * 0x1_0000_0000 else "train"


def build_config_hash(build_config: dict) -> str:
    return hashlib.sha256(json.dumps(build_config, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class FolderSummary:
    root: Path
    rows: dict[tuple[str, str], int]  # (folder under data/, split) → rows
    config_rows: dict[str, dict[str, int]]  # config → split → rows, as `load_dataset` returns them
    files: int
    bytes: int
    by_category: Counter = field(default_factory=Counter)  # (class1, class2, split) → rows
    question_types: Counter = field(default_factory=Counter)

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


class DatasetFolderWriter:
    """Write a dataset folder atomically. Use as a context manager; ``add`` rows, in any order."""

    def __init__(
        self,
        out: str | Path,
        *,
        taxonomy: Taxonomy | None = None,
        build_config: dict | None = None,
        version: str = "0.1.0",
        card: dict | None = None,
        overwrite: bool = False,
        inputs: tuple = (),
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
        decode: str | None = "header",
    ):
        """``inputs``: the paths the rows come from; ``--overwrite`` never replaces a folder that holds one."""
        self.out = Path(out)
        self.taxonomy = taxonomy or Taxonomy.load()
        self.build_config = build_config or {}
        self.version = version
        self.card = card or {}
        self.decode = decode
        self._shard_opts = {"max_shard_bytes": max_shard_bytes, "row_group_rows": row_group_rows}
        prepare_output(self.out, kind="dataset", inputs=(*inputs, self.taxonomy.source), overwrite=overwrite)
        self._tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        previous = _existing_version(self.out)
        if previous and previous > parse_version(self.version):
            self.version = ".".join(map(str, previous))  # a rebuild over a released folder keeps its version; `spa-vl version` bumps it
        self._writers: dict[tuple[str, str], ShardWriter] = {}
        self._by_category: Counter = Counter()
        self._question_types: Counter = Counter()
        self.summary: FolderSummary | None = None

    # --- rows ------------------------------------------------------------------------------
    def add(self, row: dict, split: str, *, file: str | None = None, index: int | None = None) -> None:
        """Check a row and route it to its domain folder. ``file``/``index`` locate errors in the input."""
        if split in PREFERENCE_SPLITS:
            kind, features = "preference", PREFERENCE_FEATURES
        elif split in EVAL_SPLITS:
            kind, features = "eval", EVAL_FEATURES
        else:
            raise ValueError(f"unknown split {split!r}; expected one of {PREFERENCE_SPLITS + EVAL_SPLITS}")
        try:
            check_row(row, kind, self.taxonomy, allow_unattributed=(split == "train"), decode=self.decode)
        except DataError as e:
            raise e.located(file=file, row=index) from None
        if kind == "eval":
            folder = TEST_CONFIG
        else:
            folder = self.taxonomy.slug_for(row.get("class1")) or UNATTRIBUTED
            if row.get("question_type"):
                self._question_types[(row["question_type"], split)] += 1
        self._by_category[(row.get("class1"), row.get("class2"), split)] += 1
        self._writer(folder, split, features).write(row)

    def _writer(self, folder: str, split: str, features) -> ShardWriter:
        key = (folder, split)
        if key not in self._writers:
            self._writers[key] = ShardWriter(self._tmp / "data" / folder, split, features, **self._shard_opts)
        return self._writers[key]

    # --- finishing ---------------------------------------------------------------------------
    def __enter__(self) -> "DatasetFolderWriter":
        if self._tmp.exists():
            shutil.rmtree(self._tmp)
        try:
            self._tmp.mkdir(parents=True)
        except OSError as e:
            raise DataError(f"cannot create the output folder: {e.strerror or e}", file=str(self.out)) from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            for w in self._writers.values():
                w.abort()
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise_write_error(exc, self.out)
            return
        try:
            self.summary = self._finish()
        except BaseException as e:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise_write_error(e, self.out)
            raise

    def _finish(self) -> FolderSummary:
        shards: dict[tuple[str, str], list[Shard]] = {k: w.close() for k, w in sorted(self._writers.items())}
        files = {}
        for group in shards.values():
            for s in group:
                rel = s.path.relative_to(self._tmp).as_posix()
                files[rel] = {"sha256": s.sha256, "bytes": s.bytes, "rows": s.rows, "num_bytes": s.num_bytes}
        if not files:
            raise DataError("no rows to write", file=str(self.out))
        manifest = {
            "format": FORMAT,
            "version": self.version,
            "build_config_hash": build_config_hash(self.build_config),
            "build_config": self.build_config,
            "card": self.card,
            "taxonomy": {"name": self.taxonomy.name, "sha256": self.taxonomy.sha256, "file": TAXONOMY_FILE},
            "files": dict(sorted(files.items())),
        }
        self._write_taxonomy()
        (self._tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        self._carry_over_history()

        config_splits = self._config_splits(shards)
        summary = FolderSummary(
            root=self.out,
            rows={k: sum(s.rows for s in v) for k, v in shards.items()},
            config_rows={c: {s: info.num_examples for s, info in splits.items()} for c, splits in config_splits.items()},
            files=len(files),
            bytes=sum(f["bytes"] for f in files.values()),
            by_category=self._by_category,
            question_types=self._question_types,
        )
        from dataset_card.card import (
            render_folder_card,  # the card reads the folder; imported here to avoid a cycle
        )

        render_folder_card(self._tmp, taxonomy=self.taxonomy)
        swap_into_place(self._tmp, self.out)
        return summary

    def _write_taxonomy(self) -> None:
        """The taxonomy's file byte for byte, so that its sha256 is the manifest's."""
        data = Path(self.taxonomy.source).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.taxonomy.sha256:
            raise DataError("the taxonomy file changed while the folder was written", file=self.taxonomy.source)
        (self._tmp / TAXONOMY_FILE).write_bytes(data)

    def _carry_over_history(self) -> None:
        """Rebuilding over a folder keeps its history: ``CHANGELOG.md``, the released row ids under
        ``.spa_vl/`` (what ``spa-vl version`` diffs against), and its version, which never goes back."""
        if not (self.out / "manifest.json").is_file():
            return
        for name in (CHANGELOG, HISTORY_DIR, REVIEW_DIR):
            src = self.out / name
            if src.is_dir():
                shutil.copytree(src, self._tmp / name)
            elif src.is_file():
                shutil.copy2(src, self._tmp / name)

    def _config_splits(self, shards: dict[tuple[str, str], list[Shard]]) -> dict[str, dict[str, SplitInfo]]:
        """config → split → counts, for the configs and splits that hold rows.

        `datasets` cannot load a declared split with no rows, so an empty split is not declared
        (and has no files), and a config with no rows at all is left out.
        """
        out: dict[str, dict[str, SplitInfo]] = {}
        for config, patterns in config_data_files(self.taxonomy.slugs).items():
            for split in patterns:
                folders = [f for f, s in shards if s == split and (f == config or (config == DEFAULT_CONFIG and f != TEST_CONFIG))]
                flat = [sh for f in folders for sh in shards[(f, split)]]
                rows = sum(sh.rows for sh in flat)
                if rows:
                    out.setdefault(config, {})[split] = SplitInfo(
                        name=split, num_bytes=sum(sh.num_bytes for sh in flat), num_examples=rows
                    )
        return out


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an existing folder is replaced only after that succeeds."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def parse_version(text: str) -> tuple[int, int, int]:
    """``"1.2.3"`` (or ``"v1.2.3"``) → (1, 2, 3); a DataError for anything else."""
    parts = str(text).removeprefix("v").split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise DataError(f"not a semantic version X.Y.Z: {text!r}", field="version")
    return tuple(int(p) for p in parts)


def _existing_version(root: Path) -> tuple[int, int, int] | None:
    try:
        return parse_version(json.loads((root / "manifest.json").read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError("not a spa-vl dataset folder: manifest.json missing", file=str(path)) from None
    except json.JSONDecodeError as e:
        raise DataError(f"manifest is not valid JSON: {e}", file=str(path)) from None


def folder_taxonomy(root: str | Path, manifest: dict | None = None) -> Taxonomy:
    """The taxonomy a folder was built with: its ``taxonomy.yaml``, which must be the file the manifest
    names (same sha256). A folder written before folders carried their taxonomy gets the shipped one."""
    root = Path(root)
    path = root / TAXONOMY_FILE
    if not path.is_file():
        return Taxonomy.load()
    taxonomy = Taxonomy.load(path)
    if manifest is None:
        try:
            manifest = read_manifest(root)
        except DataError:
            manifest = {}  # the command that reads the manifest reports it
    recorded = manifest.get("taxonomy") if isinstance(manifest, dict) else None
    if isinstance(recorded, dict) and recorded.get("sha256") not in (None, taxonomy.sha256):
        raise DataError(f"differs from the taxonomy the folder was built with (sha256 {str(recorded['sha256'])[:12]} "
                        f"in manifest.json, {taxonomy.sha256[:12]} on disk); restore it or rebuild the folder",
                        file=str(path), field="taxonomy")
    return taxonomy


# --- writing OUT safely -----------------------------------------------------------------------------
OUTPUT_KINDS = {  # kind → what --overwrite may replace, in words
    "dataset": "a spa-vl dataset folder (manifest.json with format " + FORMAT + ")",
    "upstream-fixture": f"a folder `spa-vl fixture --layout upstream` wrote ({UPSTREAM_FIXTURE_MARK})",
}
_UPSTREAM_FIXTURE_README = "Written by `spa-vl fixture --layout upstream`"  # fixtures written before the mark


def prepare_output(out: str | Path, *, kind: str = "dataset", inputs=(), overwrite: bool = False,
                   resumable: dict | None = None) -> Path:
    """Sweep what dead runs left beside ``out`` (see ``sweep_stale``), then refuse, before anything is
    written, to write ``out`` where that would lose data.

    ``out`` may be absent or an empty folder. Anything else needs ``overwrite`` and must be a folder
    spa-vl wrote, of ``kind`` (see ``OUTPUT_KINDS``), that neither is nor holds nor sits inside one of
    ``inputs`` (real paths compared; inputs that do not exist, such as Hub repo ids, are ignored).
    ``resumable``: the mark of a pull that may resume in ``.OUT.partial`` (kept by the sweep).
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    out = Path(out)
    sweep_stale(out, resumable=resumable)  # first: it may restore OUT itself, which the checks below then guard
    if out.exists() and not out.is_dir():
        raise DataError("output path exists and is not a folder; name a folder", file=str(out))
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError("output folder exists and is not empty; pass --overwrite to replace it (only a folder "
                            "spa-vl wrote can be replaced)", file=str(out))
        if not _is_kind(out, kind):
            raise DataError(f"--overwrite replaces only {OUTPUT_KINDS[kind]}, and this is not one: nothing was "
                            "changed; name another output folder, or move this one away yourself", file=str(out))
        real_out = os.path.realpath(out)
        for item in inputs:
            if item is None or not os.path.exists(item):
                continue
            real_in = os.path.realpath(item)
            if real_in == real_out or _inside(real_in, real_out) or _inside(real_out, real_in):
                where = "is" if real_in == real_out else "is inside" if _inside(real_in, real_out) else "holds"
                raise DataError(f"--overwrite would delete an input: {item} {where} the output folder; nothing was "
                                "changed; write to another folder", file=str(out))
    return out


def _is_kind(root: Path, kind: str) -> bool:
    if kind == "dataset":
        try:
            manifest = json.loads((root / "manifest.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(manifest, dict) and manifest.get("format") == FORMAT
    if (root / UPSTREAM_FIXTURE_MARK).is_file():
        return True
    try:
        return _UPSTREAM_FIXTURE_README in (root / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder and path != folder


def sweep_stale(out: str | Path, *, resumable: dict | None = None) -> list[Path]:
    """Remove what killed runs left beside ``out``: ``.OUT.tmp-PID`` and ``.OUT.old-PID`` folders of dead
    processes, and a ``.OUT.partial`` whose pull is dead (unless it is the one ``resumable`` names).

    Only our names with a dead PID are touched. An ``.old-PID`` with no ``OUT`` is the user's previous folder
    (the run died between the two renames of ``swap_into_place``): it is renamed back, not removed.
    Returns the paths removed or restored.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    debris = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)")
    swept = []
    for path in sorted(out.parent.iterdir()):
        m = debris.fullmatch(path.name)
        if m and path.is_dir() and not path.is_symlink() and not process_alive(int(m[2])):
            if m[1] == "old" and not os.path.lexists(out):
                os.replace(path, out)
            else:
                shutil.rmtree(path)
            swept.append(path)
        elif path.name == f".{out.name}.partial" and path.is_dir() and not path.is_symlink():
            try:
                mark = json.loads((path / PARTIAL_MARK).read_text())
            except (OSError, ValueError):
                continue  # no mark of ours: not ours to remove
            pid = mark.get("pid") if isinstance(mark, dict) else None
            if isinstance(pid, int) and process_alive(pid):
                continue
            if resumable is not None and {k: mark.get(k) for k in resumable} == resumable:
                continue
            shutil.rmtree(path)
            swept.append(path)
    return swept


def process_alive(pid: int) -> bool:
    """Whether a process with this PID runs (another user's counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def raise_write_error(e: BaseException, out: Path) -> None:
    """A disk error while writing (full, read-only, gone) becomes one line naming the output folder."""
    if isinstance(e, OSError) and not isinstance(e, (ConnectionError, TimeoutError)):
        raise DataError(f"cannot write: {e.strerror or e}", file=str(out)) from e
