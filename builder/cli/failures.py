"""How a failure reaches the user of `spa-vl`: one line on stderr and an exit code, never a traceback.

0 done; 1 a check or a job failed (the Hub answered an error or could not be reached); 2 bad usage or
bad input, the disk included (read-only, full, a file where a folder should be, an unreadable store);
130 Ctrl-C; 143 SIGTERM, which unwinds like Ctrl-C so that temporary folders are removed::

    message = hub_failure(e) or environment_failure(e)   # None: a bug, shown as a traceback
"""

from __future__ import annotations

import errno
import os


def hub_failure(e: BaseException) -> str | None:
    """A one-line message for errors of the Hub or the network, None for anything else (a bug: traceback)."""
    from builder.hub import HubUnreachable

    if isinstance(e, HubUnreachable):
        return f"Hub unreachable: {e}"
    try:
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    except ImportError:  # pragma: no cover
        return None
    if isinstance(e, HfHubHTTPError):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"Hub error: {type(e).__name__}: {first}"
    if isinstance(e, (httpx2.TransportError, OfflineModeIsEnabled)):
        return f"Hub unreachable: {type(e).__name__}: {e}"
    return None


_ERRNO_WORDS = {errno.EEXIST: "exists and is not a folder", errno.ENOTDIR: "a part of this path is a file, not a folder"}


def environment_failure(e: BaseException) -> str | None:
    """One line naming the path for a disk or file-system error (read-only, full, a file where a folder
    should be) or an unreadable sqlite database; None for anything else."""
    import sqlite3

    if isinstance(e, sqlite3.DatabaseError):
        path = _database_path(e)
        return f"{path or 'sqlite database'}: not a readable spa-vl run store ({e})"
    if isinstance(e, OSError) and not isinstance(e, (ConnectionError, TimeoutError)):
        words = _ERRNO_WORDS.get(e.errno) or e.strerror or str(e) or type(e).__name__
        return f"{e.filename}: {words}" if e.filename else words
    return None


def _database_path(e: BaseException) -> str | None:
    """The file of the sqlite store that raised: the ``path`` of the innermost object that has one."""
    import traceback

    found = None
    for frame, _ in traceback.walk_tb(e.__traceback__):
        path = getattr(frame.f_locals.get("self"), "path", None)
        if isinstance(path, (str, os.PathLike)) and str(path).endswith((".sqlite", ".db")):
            found = str(path)
    return found


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `timeout`, `kill`): unwinds like Ctrl-C, so temporary folders are removed."""


def on_sigterm(signum, frame):
    raise Terminated()
