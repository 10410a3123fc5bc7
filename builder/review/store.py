"""People's verdicts, one JSON line each in ``<root>/review/verdicts.jsonl``, saved the moment they are given.

Append-only: a verdict is written with one ``write`` under an exclusive ``flock`` and ``fsync``-ed before
the page is told it was saved, so a crash or a closed tab loses nothing that was acknowledged. A
changed mind is a new line; the last line of a reviewer for a pair wins. A crash in the middle of a
write can leave an unfinished last line (never acknowledged): readers skip it and the next writer
cuts it off before appending::

    store = VerdictStore(review_dir)
    store.add(Verdict("ann", pair_id, pick="B", a_is="chosen", unsafe_a=True, unsafe_b=False, note=""))
    store.latest()[("ann", pair_id)].people    # "rejected": ann preferred the answer the judge rejected
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from builder.errors import DataError

VERDICTS_FILE = "verdicts.jsonl"
PICKS = ("A", "B", "tie")
SIDES = ("chosen", "rejected")
MAX_NOTE = 2000
_REVIEWER = re.compile(r"^[\w][\w .'-]{0,63}$")


def check_reviewer(name) -> str:
    """A reviewer's name: 1-64 letters, digits, spaces, . ' - _ (starting with a letter or digit)."""
    name = name.strip() if isinstance(name, str) else name
    if not isinstance(name, str) or not _REVIEWER.fullmatch(name):
        raise DataError("a reviewer name is 1-64 letters, digits, spaces, . ' - or _", field="reviewer")
    return name


@dataclass(frozen=True)
class Verdict:
    reviewer: str
    id: str  # the pair's row id
    pick: str  # what was clicked: "A", "B" or "tie"
    a_is: str  # which answer was shown as A: "chosen" or "rejected" (so each line stands on its own)
    unsafe_a: bool = False
    unsafe_b: bool = False
    note: str = ""
    at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self):
        check_reviewer(self.reviewer)
        if self.pick not in PICKS:
            raise DataError(f"pick must be one of {', '.join(PICKS)}", field="pick")
        if self.a_is not in SIDES:
            raise DataError(f"a_is must be one of {', '.join(SIDES)}", field="a_is")
        if not isinstance(self.unsafe_a, bool) or not isinstance(self.unsafe_b, bool):
            raise DataError("unsafe flags must be true or false", field="unsafe")
        if not isinstance(self.note, str) or len(self.note) > MAX_NOTE:
            raise DataError(f"a note is text of at most {MAX_NOTE} characters", field="note")

    @property
    def people(self) -> str:
        """The verdict in the judge's terms: "chosen", "rejected" or "tie"."""
        if self.pick == "tie":
            return "tie"
        return self.a_is if self.pick == "A" else ("rejected" if self.a_is == "chosen" else "chosen")


class VerdictStore:
    def __init__(self, review_dir: str | Path):
        self.path = Path(review_dir) / VERDICTS_FILE
        self._lock = threading.Lock()  # the server's threads; flock keeps out other processes

    def add(self, verdict: Verdict) -> None:
        """Append one verdict and fsync it; returns only once it is on disk."""
        data = (json.dumps(asdict(verdict), ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                _cut_unfinished_line(fd)
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)  # closing releases the flock
        if new:
            _fsync_dir(self.path.parent)  # the new file's name is durable too

    def read(self) -> list[Verdict]:
        """Every verdict in file order; an unfinished last line (a write in flight or cut by a crash) is skipped."""
        if not self.path.exists():
            return []
        lines = self.path.read_bytes().split(b"\n")
        out = []
        for i, line in enumerate(lines[:-1]):  # the piece after the last newline is unfinished (or empty)
            if not line.strip():
                continue
            try:
                out.append(Verdict(**json.loads(line)))
            except DataError as e:
                raise e.located(file=str(self.path), row=i) from None
            except (ValueError, TypeError) as e:
                raise DataError(f"not a verdict: {e}", file=str(self.path), row=i) from None
        return out

    def latest(self) -> dict[tuple[str, str], Verdict]:
        """(reviewer, pair id) -> that reviewer's last verdict on the pair."""
        return {(v.reviewer, v.id): v for v in self.read()}

    def sha256(self) -> str | None:
        """Of the finished lines: what a report was computed from."""
        if not self.path.exists():
            return None
        data = self.path.read_bytes()
        return hashlib.sha256(data[: data.rfind(b"\n") + 1]).hexdigest()


def _cut_unfinished_line(fd: int) -> None:
    """Cut off bytes after the last newline: a write that a crash interrupted, never acknowledged."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    start = max(0, size - (1 << 16))
    tail = os.pread(fd, size - start, start)
    while b"\n" not in tail and start > 0:  # an unfinished line longer than the window: look further back
        start = max(0, start - (1 << 16))
        tail = os.pread(fd, size - start, start)
    os.ftruncate(fd, start + tail.rfind(b"\n") + 1)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
