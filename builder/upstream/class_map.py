"""A class map: a user's file of harm labels for upstream train rows, keyed by image hash or image name.

CSV, JSON (a list of objects) or JSONL, with ``class1, class2, class3`` and a key column,
``image_sha256`` when present, else ``image_name``::

    image_sha256,class1,class2,class3
    3b0c…,Malicious Use,Security threats,weapon

    key_column, entries = load_class_map("labels.csv", Taxonomy.load())
    entries["3b0c…"].path     # ('Malicious Use', 'Security threats', 'weapon')
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from builder.errors import DataError
from builder.taxonomy import Taxonomy

LABELS = ("class1", "class2", "class3")


@dataclass(frozen=True)
class ClassMapEntry:
    path: tuple[str, str, str]
    source: str  # "labels.csv row 12"


def load_class_map(path: str | Path, taxonomy: Taxonomy) -> tuple[str, dict[str, ClassMapEntry]]:
    """(key column, key -> entry). Every entry must be a path of the taxonomy, and a key may not map to two paths."""
    path = Path(path)
    file = str(path)
    entries = _read_entries(path)
    columns = set().union(*entries) if entries else set()
    key = "image_sha256" if "image_sha256" in columns else "image_name" if "image_name" in columns else None
    if key is None:
        raise DataError("class map needs a key column image_sha256 or image_name", file=file, field="image_sha256")
    out: dict[str, ClassMapEntry] = {}
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
        found = ClassMapEntry(labels, f"{path.name} row {i}")
        if value in out and out[value].path != found.path:
            raise DataError(f"{key} {value!r} maps to two label paths: {out[value].path} and {found.path}",
                            file=file, row=i, field=key)
        out[value] = found
    return key, out


def _read_entries(path: Path) -> list[dict]:
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
    return entries
