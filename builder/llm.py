"""Model access for the pipeline: one async router over OpenAI-compatible endpoints and local VLMs.

Every call goes through :class:`ModelRouter`, which gives each model entry of the run config

- a persistent request cache (:class:`RequestCache`, sqlite in the run directory) keyed by the model,
  the rendered messages with images as their sha256, and every parameter that changes the output,
  so a re-run re-sends nothing that already succeeded;
- limits per endpoint (:class:`RateLimiter`): concurrency, requests and tokens per minute, and a pause
  for everyone when a server answers 429 with ``Retry-After``;
- retries with exponential backoff and full jitter on 429, 5xx, timeouts, connection errors and
  malformed replies; a request that keeps failing raises :class:`RequestFailed` with its reason;
- token and cost accounting (:class:`Meter`, prices in USD per million tokens from the config).

Example::

    router = ModelRouter({"gpt-4o": ModelSpec.from_config("gpt-4o", {"price": {"input": 2.5, "output": 10}})},
                         RequestCache("run/run.sqlite"))
    reply = await router.chat("gpt-4o", [{"role": "user", "content": [image_part(sha), {"type": "text", "text": "Describe it."}]}],
                              images={sha: jpeg_bytes})
    reply.text, reply.cached, router.meters["gpt-4o"].cost_usd
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import random
import re
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from builder.errors import DataError

BACKENDS = ("openai", "transformers")
# What servers without structured output say when they refuse response_format (vLLM, TGI, Ollama, proxies).
NO_SCHEMA = re.compile(r"response_format|json_schema|guided|grammar|structured", re.I)
TRANSPORT_PARAMS = ("extra_headers", "extra_query", "timeout")  # how a request travels, not what it asks
RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}
# A sliding-window server counts arrivals; sending at 99% of its rate with no burst never crosses it.
RATE_MARGIN = 0.99
IMAGE_TOKENS = 255  # an estimate per image for the tokens-per-minute limiter (OpenAI: 85 + 170 per 512 px tile)


def image_part(sha256: str) -> dict:
    """A message content part that stands for an image by its hash (the cache key never holds pixels)."""
    return {"type": "image", "sha256": sha256}


@dataclass
class ModelSpec:
    """One model entry of the run config: where it lives, its limits and its prices."""

    name: str
    model: str = ""                       # the id sent to the server (default: the entry name)
    backend: str = "openai"
    base_url: str | None = None           # None: OPENAI_BASE_URL, as the openai client does
    api_key_env: str | None = "OPENAI_API_KEY"
    path: str | None = None               # transformers backend: a local model folder
    max_concurrency: int = 16
    rpm: float | None = None
    tpm: float | None = None
    timeout: float = 60.0
    max_retries: int = 6
    backoff: float = 0.5                  # seconds; doubles per retry, full jitter, capped at 30 s
    structured_output: bool = True        # send response_format json_schema; False: parse free text
    price: dict = field(default_factory=lambda: {"input": 0.0, "output": 0.0})  # USD per 1M tokens
    params: dict = field(default_factory=dict)  # default request parameters (temperature, max_tokens…)
    system: str | None = None             # a system prompt sent first (e.g. the paper's jailbroken bag member)

    @classmethod
    def from_config(cls, name: str, cfg: dict | None) -> "ModelSpec":
        cfg = dict(cfg or {})
        known = set(cls.__dataclass_fields__) - {"name"}
        for key in cfg:
            if key not in known:
                raise DataError(f"unknown key; expected one of {sorted(known)}", field=f"models.{name}.{key}")
        spec = cls(name=name, **cfg)
        spec.model = spec.model or name
        if spec.backend not in BACKENDS:
            raise DataError(f"backend must be one of {BACKENDS}, got {spec.backend!r}", field=f"models.{name}.backend")
        if spec.backend == "transformers" and not spec.path:
            raise DataError("a transformers model needs `path` (a local model folder)", field=f"models.{name}.path")
        for key in ("max_concurrency", "max_retries"):
            if not isinstance(getattr(spec, key), int) or getattr(spec, key) < (1 if key == "max_concurrency" else 0):
                raise DataError("must be a positive integer", field=f"models.{name}.{key}")
        return spec

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price.get("input", 0.0) + completion_tokens * self.price.get("output", 0.0)) / 1e6


@dataclass
class Reply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False


class RequestFailed(Exception):
    """A request that failed for good: ``kind`` is short (rate_limit, server_error, timeout…), ``detail`` says more."""

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


class RequestCache:
    """Successful replies in sqlite (WAL): committed one by one, so a SIGKILL loses at most the call in flight."""

    def __init__(self, path):
        self.path = str(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS requests (key TEXT PRIMARY KEY, model TEXT, reply TEXT)")

    def lookup(self, key: str) -> Reply | None:
        row = self._db.execute("SELECT reply FROM requests WHERE key = ?", (key,)).fetchone()
        return Reply(**json.loads(row[0])) if row else None

    def store(self, key: str, model: str, reply: Reply) -> None:
        self._db.execute("INSERT OR REPLACE INTO requests VALUES (?, ?, ?)", (key, model, json.dumps(asdict(reply))))

    # The router awaits these, so a Ray actor can stand in for the file (see builder.pipeline).
    async def get(self, key: str) -> Reply | None:
        return self.lookup(key)

    async def put(self, key: str, model: str, reply: Reply) -> None:
        self.store(key, model, reply)

    def close(self) -> None:
        self._db.close()


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


def request_key(spec: ModelSpec, messages: list[dict], params: dict) -> str:
    ident = {"backend": spec.backend, "model": spec.path if spec.backend == "transformers" else spec.model,
             "messages": messages, "params": {k: v for k, v in params.items() if k not in TRANSPORT_PARAMS}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def _retry_after(exc) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return float(headers.get(name)) * scale
        except (TypeError, ValueError):
            continue
    return None


def _classify(exc) -> tuple[str, bool]:
    """(kind, retryable) for an exception raised by the openai client."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return "timeout", True
    if isinstance(exc, openai.APIConnectionError):
        return "connection_error", True
    if isinstance(exc, openai.RateLimitError):
        return "rate_limit", True
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        return (f"http_{code}", code in RETRYABLE_STATUS or code >= 500)
    if isinstance(exc, (openai.APIResponseValidationError, ValueError, KeyError, IndexError, AttributeError)):
        return "malformed_reply", True  # json.JSONDecodeError is a ValueError: openai 3.x raises it unwrapped
    return type(exc).__name__, False


class ModelRouter:
    """Send chat requests to the model entries of a run, through the cache, the limits and the meters."""

    def __init__(self, specs: dict[str, ModelSpec], cache, *, limit_share: float = 1.0):
        """``limit_share`` scales every endpoint's limits: Ray workers each get 1/N of them."""
        self.specs = specs
        self.cache = cache
        self.meters = {name: Meter() for name in specs}
        self._share = limit_share
        self._limiters: dict[str, RateLimiter] = {}
        self._clients: dict[str, tuple[Any, RateLimiter]] = {}  # entry name -> (client, its endpoint's limiter)
        self._data_urls: dict[str, str] = {}
        self._loop = None

    async def aclose(self) -> None:
        """Close the HTTP clients (call before the event loop ends)."""
        for client, _ in self._clients.values():
            await client.close()
        self._clients, self._limiters = {}, {}

    def spec(self, name: str) -> ModelSpec:
        if name not in self.specs:
            raise DataError(f"unknown model {name!r}; the config's models are {sorted(self.specs)}", field="models")
        return self.specs[name]

    async def chat(self, model: str, messages: list[dict], *, images: dict[str, bytes] | None = None,
                   params: dict | None = None, schema: dict | None = None, choices: list[str] | None = None) -> Reply:
        """One chat completion. ``schema`` asks for JSON output; ``choices`` lets a local model pick among
        strings by probability (the reply is then the JSON ``{"choice": ..., "probabilities": [...]}``)."""
        spec = self.spec(model)
        params = {**spec.params, **(params or {})}
        if spec.backend == "transformers" and choices:
            params["choices"] = list(choices)
        if spec.system:
            messages = [{"role": "system", "content": spec.system}, *messages]
        # The key holds the schema, not how it went on the wire: a fallback to free text keeps cache hits.
        key = request_key(spec, messages, {**params, "schema": schema} if schema is not None else params)
        meter = self.meters[model]
        hit = await self.cache.get(key)
        if hit is not None:
            meter.cached += 1
            meter.cached_tokens += hit.prompt_tokens + hit.completion_tokens
            meter.cached_cost_usd += spec.cost(hit.prompt_tokens, hit.completion_tokens)
            hit.cached = True
            return hit
        meter.requests += 1
        if spec.backend == "transformers":
            reply = await self._local(spec, messages, images or {}, params)
        else:
            if schema is not None and spec.structured_output:
                params["response_format"] = {"type": "json_schema",
                                             "json_schema": {"name": "reply", "strict": True, "schema": schema}}
            reply = await self._remote(spec, meter, messages, images or {}, params)
        meter.prompt_tokens += reply.prompt_tokens
        meter.completion_tokens += reply.completion_tokens
        meter.cost_usd += spec.cost(reply.prompt_tokens, reply.completion_tokens)
        await self.cache.put(key, model, reply)
        return reply

    # --- OpenAI-compatible endpoints -------------------------------------------------------------
    def _endpoint(self, spec: ModelSpec) -> tuple[str, str]:
        return (spec.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/"), spec.model

    def _limiter(self, spec: ModelSpec) -> RateLimiter:
        """Entries that reach the same model at the same URL share one limiter, with the tightest limits."""
        key = self._endpoint(spec)  # once per entry and event loop: _client keeps the limiter with the client
        if key not in self._limiters:
            group = [s for s in self.specs.values() if s.backend == "openai" and self._endpoint(s) == key]

            def tightest(attr):
                values = [getattr(s, attr) for s in group if getattr(s, attr)]
                return min(values) * self._share if values else None

            slots = max(1, int(min(s.max_concurrency for s in group) * self._share))
            self._limiters[key] = RateLimiter(slots, tightest("rpm"), tightest("tpm"))
        return self._limiters[key]

    def _client(self, spec: ModelSpec):
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # clients and limiters belong to one event loop: a new loop gets new ones
            self._loop, self._clients, self._limiters = loop, {}, {}
        if spec.name not in self._clients:
            import openai

            key = os.environ.get(spec.api_key_env) if spec.api_key_env else "EMPTY"
            if not key:
                raise DataError(f"set the environment variable {spec.api_key_env} (or `api_key_env: null` for a "
                                "server without auth)", field=f"models.{spec.name}.api_key_env")
            # Our own retry loop counts retries and honours Retry-After for every caller of the endpoint.
            client = openai.AsyncOpenAI(base_url=spec.base_url, api_key=key, max_retries=0, timeout=spec.timeout)
            self._clients[spec.name] = (client, self._limiter(spec))
        return self._clients[spec.name]

    def _wire_messages(self, messages: list[dict], images: dict[str, bytes]) -> list[dict]:
        out = []
        for msg in messages:
            content = msg["content"]
            if isinstance(content, list):
                content = [self._image_url(p["sha256"], images) if p.get("type") == "image" else p for p in content]
            out.append({**msg, "content": content})
        return out

    def _image_url(self, sha: str, images: dict[str, bytes]) -> dict:
        if sha not in self._data_urls:
            if len(self._data_urls) > 256:
                self._data_urls.clear()
            data = images[sha]
            mime = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
            self._data_urls[sha] = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        return {"type": "image_url", "image_url": {"url": self._data_urls[sha]}}

    async def _remote(self, spec: ModelSpec, meter: Meter, messages, images, params) -> Reply:
        client, limiter = self._client(spec)
        wire = self._wire_messages(messages, images)
        # Text at ~4 characters a token, an image as one 512 px tile at high detail; usage settles it later.
        estimate = (len(json.dumps(messages)) // 4 + IMAGE_TOKENS * len(images)
                    + int(params.get("max_tokens") or params.get("max_completion_tokens") or 256))
        for attempt in range(spec.max_retries + 1):
            await limiter.acquire(estimate)
            used = 0
            try:
                try:
                    resp = await client.chat.completions.create(model=spec.model, messages=wire, **params)
                except TypeError as exc:  # the SDK refused a parameter before sending: a config error, not a retry
                    raise DataError(f"the openai client refused a request parameter: {exc}",
                                    field=f"models.{spec.name}.params") from None
                text = resp.choices[0].message.content
                if resp.choices[0].finish_reason == "content_filter":
                    raise RequestFailed(spec.name, "content_filter", "the server filtered the reply")
                if not isinstance(text, str) or not text.strip():
                    raise ValueError("empty reply")
                usage = resp.usage
                reply = Reply(text, getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0)
                used = reply.prompt_tokens + reply.completion_tokens
                return reply
            except RequestFailed:
                meter.failed += 1
                raise
            except DataError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below; unknown errors are not retried
                kind, retryable = _classify(exc)
                if kind in ("http_400", "http_422") and "response_format" in params and NO_SCHEMA.search(str(exc)):
                    spec.structured_output = False  # this server lacks json_schema: parse free text from now on
                    params = {k: v for k, v in params.items() if k != "response_format"}
                    retryable = True
                if not retryable or attempt == spec.max_retries:
                    meter.failed += 1
                    raise RequestFailed(spec.name, kind, str(exc)[:300]) from None
                meter.retries += 1
                wait = _retry_after(exc)
                if wait is not None:
                    limiter.pause(wait)
                else:
                    await asyncio.sleep(random.uniform(0, min(30.0, spec.backoff * 2**attempt)))
            finally:
                limiter.release(estimate, used)
        raise AssertionError("unreachable")

    # --- in-process transformers models -----------------------------------------------------------
    async def _local(self, spec: ModelSpec, messages, images, params) -> Reply:
        try:
            return await self._local_call(spec, messages, images, params)
        except (RequestFailed, DataError):
            raise
        except Exception as exc:  # noqa: BLE001 - out of memory, a processor error…: this request fails, the run goes on
            raise RequestFailed(spec.name, type(exc).__name__, str(exc)[:300]) from None

    async def _local_call(self, spec: ModelSpec, messages, images, params) -> Reply:
        from PIL import Image

        from builder.local_vlm import load_local_vlm

        vlm = await asyncio.to_thread(load_local_vlm, spec.path)
        pil, local_msgs = [], []
        for msg in messages:
            content = msg["content"]
            if isinstance(content, list):
                parts = []
                for p in content:
                    if p.get("type") == "image":
                        pil.append(Image.open(io.BytesIO(images[p["sha256"]])).convert("RGB"))
                        parts.append({"type": "image"})
                    else:
                        parts.append(p)
                content = parts
            local_msgs.append({**msg, "content": content})
        if "choices" in params:
            probs = await asyncio.to_thread(vlm.choice_probabilities, local_msgs, pil, params["choices"])
            best = max(range(len(probs)), key=probs.__getitem__)
            return Reply(json.dumps({"choice": params["choices"][best], "probabilities": [round(p, 6) for p in probs]}))
        gen = await asyncio.to_thread(
            vlm.generate, local_msgs, pil, max_new_tokens=int(params.get("max_tokens", 128)),
            temperature=float(params.get("temperature", 0.0)), seed=int(params.get("seed", 0)),
            min_new_tokens=int(params.get("min_tokens", 1)))
        return Reply(gen.text, gen.prompt_tokens, gen.completion_tokens)


def parse_json_reply(text: str, keys: tuple[str, ...]) -> dict | None:
    """The first JSON object in ``text`` that has all ``keys``: tolerant of code fences and prose around it."""
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[match.start():])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and all(k in obj for k in keys):
            return obj
    return None

