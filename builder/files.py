"""Writing files so that a crash, a full disk or Ctrl-C never leaves half a file or half a folder.

Everything spa-vl writes goes through here: one file (``atomic_write``), one folder built beside its
destination and renamed into place (``built_beside``, ``swap_into_place``), and the leftovers of a killed
process swept on the next run (``sweep_stale``). Temporary siblings are named ``.NAME.tmp-PID`` and
``.NAME.old-PID``, so that a later run can tell ours from a user's and a dead process's from a live one's::

    atomic_write(root / "manifest.json", text)
    with built_beside(out) as tmp:        # tmp = out's sibling .OUT.tmp-PID, empty
        (tmp / "a.txt").write_text("...")
    # here out holds a.txt; on an exception tmp is gone and out is as it was
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20


def temp_sibling(path: str | Path, kind: str = "tmp") -> Path:
    """``.NAME.tmp-PID`` (or ``.NAME.old-PID``) beside ``path``: this process's scratch name for it."""
    path = Path(path)
    return path.parent / f".{path.name}.{kind}-{os.getpid()}"


def sibling_owner(name: str) -> tuple[str, str, int] | None:
    """``(NAME, "tmp" | "old", PID)`` for a temporary sibling's file name, None for any other name."""
    match = re.fullmatch(r"\.(.+)\.(tmp|old)-(\d+)", name)
    return (match[1], match[2], int(match[3])) if match else None


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``path`` whole or not at all: to a temporary sibling first, then renamed over it."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``; an existing ``out`` is replaced only after that succeeds
    (it waits as ``.OUT.old-PID`` meanwhile, which ``sweep_stale`` renames back if the process dies there)."""
    old = None
    if out.exists():
        old = temp_sibling(out, "old")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def built_beside(out: str | Path) -> Iterator[Path]:
    """An empty ``.OUT.tmp-PID`` folder to build ``out`` in; swapped into place when the block ends, removed
    when it raises (KeyboardInterrupt and SIGTERM included)."""
    out = Path(out)
    tmp = temp_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def sweep_stale(out: str | Path) -> list[Path]:
    """Remove the ``.OUT.tmp-PID`` and ``.OUT.old-PID`` folders that dead processes left beside ``out``.

    Only our names with a dead PID are touched. An ``.old-PID`` with no ``OUT`` is the user's previous
    folder (the process died between the two renames of ``swap_into_place``): it is renamed back, not
    removed. Returns the paths removed or restored.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    swept = []
    for path in sorted(out.parent.iterdir()):
        owner = sibling_owner(path.name)
        if owner is None or owner[0] != out.name or not path.is_dir() or path.is_symlink() or process_alive(owner[2]):
            continue
        if owner[1] == "old" and not os.path.lexists(out):
            os.replace(path, out)
        else:
            shutil.rmtree(path)
        swept.append(path)
    return swept


def file_digest(path: str | Path, algorithm: str = "sha256", *, prefix: bytes = b"") -> str:
    """The hex digest of a file read in 1 MiB chunks (memory stays flat); ``prefix`` is hashed first
    (git's blob id is ``sha1(b"blob <size>\\0" + content)``)."""
    h = hashlib.new(algorithm, prefix)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()
