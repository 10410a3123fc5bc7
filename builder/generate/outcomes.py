"""What a model request comes to: a :class:`Reply`, or :class:`RequestFailed` with the reason; and per model
entry a :class:`Meter` that tallies requests, cache hits, retries, failures, tokens and cost.

Example::

    reply = Reply("A cat on a sofa.", prompt_tokens=120, completion_tokens=6)
    raise RequestFailed("gpt-4o", "http_401", "Incorrect API key provided: [key redacted]")
    meter = Meter(); meter.merge(other_workers_meter)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Reply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    reused: bool = False  # from the cache, but stored during this same run: paid for once, counted once


class RequestFailed(Exception):
    """A request that failed for good: ``kind`` is short (rate_limit, http_401, timeout…), ``detail`` says more."""

    def __init__(self, model: str, kind: str, detail: str = ""):
        self.model, self.kind, self.detail = model, kind, detail
        super().__init__(f"{model}: {kind}: {detail}"[:500])


@dataclass
class Meter:
    """Per-model accounting for one run (requests served from the cache cost nothing)."""

    requests: int = 0       # logical requests sent to the model (retries not counted again)
    cached: int = 0
    retries: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cached_tokens: int = 0         # tokens of the replies served from the cache (paid for by an earlier run)
    cached_cost_usd: float = 0.0

    def merge(self, other: "Meter") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)
