"""Retrying a call that failed for a passing reason (a dropped connection, a 5xx, a 429), the same way
everywhere: exponential backoff with jitter, capped, a bounded number of attempts, each retry said::

    info = retry(lambda: api.dataset_info(repo), retries=5, backoff=1.0, transient=is_transient,
                 log=print, what="read the repo")

The model layer's loop (``builder.generate.openai_endpoints``) has more to weigh (``Retry-After``, rate limits, a
schema fallback) and keeps its own loop, but waits with ``backoff_seconds`` like this one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
MAX_WAIT = 30.0


def backoff_seconds(base: float, attempt: int, *, full_jitter: bool = False, cap: float = MAX_WAIT) -> float:
    """The wait before retry number ``attempt`` (1, 2, ...): ``base * 2**(attempt-1)`` capped at ``cap``,
    times a random factor in [0.5, 1) (or [0, 1) with ``full_jitter``), so that many clients spread out."""
    if base <= 0:
        return 0.0
    ceiling = min(cap, base * 2 ** (attempt - 1))
    return random.uniform(0.0, ceiling) if full_jitter else ceiling * (0.5 + random.random() / 2)


def retry(fn: Callable[[], T], *, retries: int, backoff: float, transient: Callable[[BaseException], bool],
          log: Callable[[str], None] | None = None, what: str = "the call") -> T:
    """``fn()``, tried again up to ``retries`` times while it raises an error ``transient`` accepts; any
    other error, or the last one, is raised as it is."""
    for attempt in range(1, retries + 2):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - sorted by `transient`; the rest is raised as it is
            if attempt > retries or not transient(e):
                raise
            if log is not None:
                first = (str(e).strip().splitlines() or [""])[0]
                log(f"{what}: attempt {attempt} failed ({type(e).__name__}: {first[:160]}); retrying")
            time.sleep(backoff_seconds(backoff, attempt))
    raise AssertionError("unreachable")
