"""Writing a folder named ``OUT`` safely: the one guard every command that writes a folder calls first.

``prepare_output`` replaces only a folder spa-vl wrote, of the same kind, that is not an input, and sweeps
what dead runs left beside ``OUT`` (``builder.files.sweep_stale`` for ``.OUT.tmp-PID``/``.OUT.old-PID``,
and here a dead pull's ``.OUT.partial``). ``raise_write_error`` turns a disk error into one line naming
``OUT``::

    prepare_output("out/spa_vl", kind="dataset", inputs=("runs/r1",), overwrite=True)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from builder import files
from builder.errors import DataError
from builder.format.layout import FORMAT, PARTIAL_MARK, README, UPSTREAM_FIXTURE_MARK
from builder.format.manifest import read_manifest

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
        _refuse_an_input(out, inputs)
    return out


def _refuse_an_input(out: Path, inputs) -> None:
    real_out = os.path.realpath(out)
    for item in inputs:
        if item is None or not os.path.exists(item):
            continue
        real_in = os.path.realpath(item)
        if real_in == real_out or _inside(real_in, real_out) or _inside(real_out, real_in):
            where = "is" if real_in == real_out else "is inside" if _inside(real_in, real_out) else "holds"
            raise DataError(f"--overwrite would delete an input: {item} {where} the output folder; nothing was "
                            "changed; write to another folder", file=str(out))


def _is_kind(root: Path, kind: str) -> bool:
    if kind == "dataset":
        try:
            return read_manifest(root).get("format") == FORMAT
        except (OSError, DataError):
            return False
    if (root / UPSTREAM_FIXTURE_MARK).is_file():
        return True
    try:
        return _UPSTREAM_FIXTURE_README in (root / README).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder and path != folder


def sweep_stale(out: str | Path, *, resumable: dict | None = None) -> list[Path]:
    """Remove what killed runs left beside ``out``: the ``.OUT.tmp-PID``/``.OUT.old-PID`` folders of dead
    processes (``builder.files.sweep_stale``, which renames an orphaned ``.old-PID`` back to ``OUT``), and a
    ``.OUT.partial`` whose pull is dead, unless it is the one ``resumable`` names. Returns the paths removed
    or restored."""
    out = Path(out)
    swept = files.sweep_stale(out)
    partial = partial_folder(out)
    if not partial.is_dir() or partial.is_symlink():
        return swept
    try:
        mark = json.loads((partial / PARTIAL_MARK).read_text())
    except (OSError, ValueError):
        return swept  # no mark of ours: not ours to remove
    if not isinstance(mark, dict):
        return swept
    pid = mark.get("pid")
    if isinstance(pid, int) and files.process_alive(pid):
        return swept
    if resumable is not None and {k: mark.get(k) for k in resumable} == resumable:
        return swept
    shutil.rmtree(partial)
    return swept + [partial]


def partial_folder(out: str | Path) -> Path:
    """``.OUT.partial``: where a pull gathers ``out`` until every checksum matches."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def raise_write_error(e: BaseException, out: Path) -> None:
    """A disk error while writing (full, read-only, gone) becomes one line naming the output folder."""
    if isinstance(e, OSError) and not isinstance(e, (ConnectionError, TimeoutError)):
        raise DataError(f"cannot write: {e.strerror or e}", file=str(out)) from e
