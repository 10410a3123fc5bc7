"""Limits per endpoint: concurrency, requests and tokens per minute, and a shared ``Retry-After`` pause.

Example::

    limiter = RateLimiter(max_concurrency=32, rpm=500, tpm=300_000)
    await limiter.acquire(tokens=1200)     # waits for a slot and for both buckets
    ...                                    # send the request
    limiter.release(tokens_estimated=1200, tokens_used=950)
"""

from __future__ import annotations

import asyncio
import time

# A sliding-window server counts arrivals; sending at 99% of its rate with no burst never crosses it.
RATE_MARGIN = 0.99


class _Bucket:
    """Smooth token bucket: ``rate`` units per second, at most ``capacity`` at once."""

    def __init__(self, per_minute: float, capacity: float):
        self.rate = per_minute * RATE_MARGIN / 60.0
        self.capacity = max(capacity, 1.0)
        self.level = 0.0  # start empty so a burst at start-up cannot exceed a server's window
        self.stamp = time.monotonic()

    def wait_time(self, amount: float) -> float:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        need = min(amount, self.capacity)  # a request bigger than the bucket waits for a full bucket
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float) -> None:
        self.level -= amount  # in full, so the level may go negative: big requests are paid for before the next


class RateLimiter:
    """Concurrency, requests/minute and tokens/minute for one endpoint, plus a shared Retry-After pause."""

    def __init__(self, max_concurrency: int, rpm: float | None = None, tpm: float | None = None):
        self.slots = asyncio.Semaphore(max_concurrency)
        # Burst of 1% of the limit: absorbs timer overshoot, and burst + 99% rate never exceeds a 60 s window.
        self.rpm = _Bucket(rpm, rpm * (1 - RATE_MARGIN)) if rpm else None
        self.tpm = _Bucket(tpm, tpm / 60.0) if tpm else None  # one second of tokens may go at once
        self.paused_until = 0.0
        self._gate = asyncio.Lock()  # one waiter at a time takes from the buckets: FIFO, no thundering herd

    async def acquire(self, tokens: int) -> None:
        await self.slots.acquire()
        try:
            async with self._gate:
                while True:
                    wait = max(self.paused_until - time.monotonic(),
                               self.rpm.wait_time(1) if self.rpm else 0.0,
                               self.tpm.wait_time(tokens) if self.tpm else 0.0)
                    if wait <= 0:
                        break
                    await asyncio.sleep(wait)
                if self.rpm:
                    self.rpm.take(1)
                if self.tpm:
                    self.tpm.take(tokens)
        except BaseException:
            self.slots.release()
            raise

    def release(self, tokens_estimated: int = 0, tokens_used: int = 0) -> None:
        if self.tpm and tokens_used:
            self.tpm.level += tokens_estimated - tokens_used  # settle the estimate against real usage
        self.slots.release()

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)
