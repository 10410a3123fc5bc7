"""What publish and pull share: the repo type, what a published folder holds, timeouts, retries, errors."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import TypeVar

from builder.errors import DataError
from builder.format.layout import ASSETS_DIR, REVIEW_DIR
from builder.retry import retry

T = TypeVar("T")
REPO_TYPE = "dataset"
PUBLISHED_DIRS = (ASSETS_DIR, REVIEW_DIR)  # besides README.md, CHANGELOG.md, manifest.json and the manifest's files


class HubUnreachable(Exception):
    """The Hub could not be read after retries (network, timeouts, 5xx): exit code 1."""


@contextlib.contextmanager
def hub_timeouts(connect: float = 10.0, read: float = 120.0):
    """huggingface_hub's HTTP client has no timeout by default; give every call one while we run."""
    import httpx2
    from huggingface_hub.utils import _http

    def factory():
        client = _http.default_client_factory()
        client.timeout = httpx2.Timeout(read, connect=connect)
        return client

    _http.set_client_factory(factory)
    try:
        yield
    finally:
        _http.set_client_factory(_http.default_client_factory)


def hub_retry(fn: Callable[[], T], retries: int, backoff: float, log: Callable[[str], None], what: str) -> T:
    """``fn()``, retried (``builder.retry``) while the Hub fails for a passing reason (``transient``)."""
    return retry(fn, retries=retries, backoff=backoff, transient=transient, log=log, what=what)


def transient(e: BaseException) -> bool:
    """Worth retrying: 5xx, 408 and 429 answers, dropped connections and timeouts (also when wrapped, as
    huggingface_hub wraps a failed LFS upload in a RuntimeError). Offline mode and bad URLs are not."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OfflineModeIsEnabled):
            return False
        if isinstance(e, HfHubHTTPError):
            status = getattr(e.response, "status_code", None)
            return status is None or status >= 500 or status in (408, 429)
        if isinstance(e, httpx2.UnsupportedProtocol):
            return False
        if isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return True
        e = e.__cause__
    return False


def check_repo_id(repo_id: str) -> None:
    """A DataError unless ``repo_id`` is a valid ``namespace/name``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    parts = str(repo_id).split("/")
    try:
        validate_repo_id(str(repo_id))
    except HFValidationError as e:
        raise DataError(f"not a valid repo id {repo_id!r}: {e}", field="repo_id") from None
    if len(parts) != 2 or not all(parts):
        raise DataError(f"repo id must look like 'namespace/name', not {repo_id!r}", field="repo_id")


def short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr)
