"""What ``spa-vl validate`` reports: the ten checks, each counted and naming its first offence."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from builder.errors import DataError
from builder.format.schema import MAX_IMAGE_PIXELS
from builder.validate.rows import MAX_IMAGE_BYTES

CHECKS = {
    "manifest": "manifest.json parses and has format/version/files; every listed file exists with its "
                "sha256, bytes and parquet rows; every parquet under data/ is listed",
    "schema": "every shard sits at data/<domain|unattributed>/<train|validation>-* or data/test/<harm|help>-* "
              "and has exactly the columns and types of its kind",
    "labels": "class1/class2/class3 is a taxonomy path and class1 is the domain of its folder; rows under "
              "data/unattributed/ carry no labels; question_type is one of easy/hardq/hards or null",
    "images": f"every image decodes (header; every pixel with full_decode), at most {MAX_IMAGE_PIXELS:,} pixels "
              f"and {MAX_IMAGE_BYTES // 2**20} MiB",
    "text": "every string is valid UTF-8; required text fields (id, image_name, question; chosen, rejected for "
            "preference rows) are not empty or whitespace-only",
    "chosen_rejected": "chosen differs from rejected (after stripping whitespace)",
    "duplicates": "no two rows with the same image (sha256) and question; preference and eval rows apart",
    "leakage": "no image (sha256) in two of train, validation and test (test/harm and test/help together: "
               "an evaluation image may carry a harm and a help question)",
    "card_counts": "README.md's YAML parses; every config has a dataset_info entry and vice versa; each "
                   "split's num_examples equals the rows in the files its data_files globs match",
    "configs_load": "every config declared in the card loads with datasets.load_dataset and gives the "
                    "row counts of its files",
}


@dataclass
class Check:
    name: str
    description: str
    checked: int = 0
    failed: int = 0
    first: dict | None = None  # {"file", "row", "field", "message"} of the first offence
    skipped_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.failed == 0

    @property
    def status(self) -> str:
        return "SKIP" if self.skipped_reason is not None else ("PASS" if self.ok else "FAIL")

    def fail(self, message: str, *, file: str | None = None, row: int | None = None, field: str | None = None,
             count: int = 1) -> None:
        self.failed += count
        if self.first is None:
            self.first = {"file": file, "row": row, "field": field, "message": message}

    def first_line(self) -> str:
        if self.skipped_reason is not None:
            return f"skipped: {self.skipped_reason}"
        return "" if self.first is None else str(DataError(
            self.first["message"], file=self.first["file"], row=self.first["row"], field=self.first["field"]))

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "status": self.status, "ok": self.ok,
                "checked": self.checked, "failed": self.failed, "first": self.first,
                "skipped_reason": self.skipped_reason}


@dataclass
class ValidationReport:
    root: Path
    checks: list[Check]
    rows: int = 0  # rows scanned by the row checks
    seconds: float = 0.0
    full_decode: bool = False
    notes: list[str] = field(default_factory=list)  # e.g. shards the row checks skipped, and why

    @classmethod
    def empty(cls, root: Path, *, full_decode: bool = False) -> "ValidationReport":
        """Every check of ``CHECKS``, in order, none run yet."""
        return cls(root, [Check(name, desc) for name, desc in CHECKS.items()], full_decode=full_decode)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check {name!r}; checks: {', '.join(CHECKS)}")

    def to_dict(self) -> dict:
        """What ``spa-vl validate --json`` prints."""
        return {"root": str(self.root), "ok": self.ok, "rows": self.rows, "seconds": round(self.seconds, 3),
                "rows_per_second": round(self.rows_per_second, 1), "full_decode": self.full_decode,
                "checks": [c.to_dict() for c in self.checks], "notes": list(self.notes)}

    def format_table(self) -> str:
        head = ("check", "status", "checked", "failed", "first offence")
        lines = [(c.name, c.status, f"{c.checked:,}", f"{c.failed:,}", c.first_line()) for c in self.checks]
        widths = [max(len(r[i]) for r in [head, *lines]) for i in range(4)]
        out = []
        for r in [head, *lines]:
            out.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}".rstrip())
        out.extend(f"note: {n}" for n in self.notes)
        ran = [c for c in self.checks if c.skipped_reason is None]
        bad = sum(not c.ok for c in self.checks)
        skipped = len(self.checks) - len(ran)
        verdict = "all checks passed" if bad == 0 else f"{bad} of {len(ran)} checks failed"
        if skipped:
            verdict += f" ({skipped} skipped)"
        out.append(f"{self.rows:,} rows in {self.seconds:.2f} s ({self.rows_per_second:,.0f} rows/s): {verdict}")
        return "\n".join(out)
