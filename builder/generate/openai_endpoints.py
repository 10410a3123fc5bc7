"""The router's remote backend: requests to OpenAI-compatible endpoints (OpenAI, vLLM, SGLang, TGI, Ollama…).

:class:`OpenAIEndpoints` gives every ``backend: openai`` entry of a run

- one ``openai.AsyncOpenAI`` client per entry and event loop, and one limiter per endpoint (a model id at a
  URL) shared by the entries that reach it, with the tightest of their limits (:class:`RateLimiter`);
- retries with exponential backoff and full jitter (:func:`builder.retry.backoff_seconds`) on 429, 5xx,
  timeouts, connection errors and malformed replies, honouring ``Retry-After`` for every caller of the
  endpoint; a request that keeps failing raises :class:`RequestFailed` with the server's reason (any key
  in it redacted);
- structured output (``response_format`` json_schema) until an endpoint rejects it: the first request
  to an endpoint asks alone, and after a 400 about ``response_format`` every call to it parses free text
  (what an endpoint answered is kept in the run store, for other workers and later runs).

Example::

    remote = OpenAIEndpoints(specs, RequestCache("run/run.sqlite"), endpoints=resolve_endpoints(specs))
    reply = await remote.send(specs["gpt-4o"], Meter(), messages, images, {"max_tokens": 64}, schema=None)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from typing import Any

from builder.errors import DataError
from builder.generate.model_spec import Endpoint, ModelSpec, resolve_endpoints
from builder.generate.outcomes import Meter, Reply, RequestFailed
from builder.generate.rate_limit import RateLimiter
from builder.generate.replies import redact
from builder.retry import backoff_seconds

# What servers without structured output say when they refuse response_format (vLLM, TGI, Ollama, proxies).
NO_SCHEMA = re.compile(r"response_format|json_schema|guided|grammar|structured", re.I)
RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}
IMAGE_TOKENS = 255  # an estimate per image for the tokens-per-minute limiter (OpenAI: 85 + 170 per 512 px tile)


def _schema_mark(endpoint: tuple) -> str:
    """The store's mark of what an endpoint answered to json_schema ("yes"/"no"): a hash, so no URL reaches the disk."""
    return "json_schema:" + hashlib.sha256(json.dumps(endpoint).encode()).hexdigest()[:16]


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


def _with_schema(params: dict, schema: dict) -> dict:
    return {**params, "response_format": {"type": "json_schema", "json_schema": {"name": "reply", "strict": True,
                                                                                 "schema": schema}}}


class OpenAIEndpoints:
    """Send requests of the openai-backend entries: clients, limits, structured output and retries."""

    def __init__(self, specs: dict[str, ModelSpec], cache, *, limit_share: float = 1.0,
                 endpoints: dict[str, Endpoint] | None = None):
        """``limit_share`` scales every endpoint's limits: Ray workers each get 1/N of them. ``endpoints``:
        resolved by the caller (see :func:`resolve_endpoints`); None resolves each entry at its first use."""
        self.specs = specs
        self.cache = cache  # what an endpoint answered to json_schema is marked there
        self.endpoints = dict(endpoints) if endpoints is not None else {}
        self._share = limit_share
        self._limiters: dict[tuple, RateLimiter] = {}
        self._clients: dict[str, tuple[Any, RateLimiter]] = {}  # entry name -> (client, its endpoint's limiter)
        self._schema_ok: dict[tuple, bool] = {}  # endpoint -> takes json_schema (absent: not known yet)
        self._probes: dict[tuple, asyncio.Lock] = {}  # while unknown, one request at a time asks with a schema
        self._data_urls: dict[str, str] = {}
        self._loop = None

    async def aclose(self) -> None:
        """Close the HTTP clients (call before the event loop ends)."""
        for client, _ in self._clients.values():
            await client.close()
        self._clients, self._limiters, self._probes = {}, {}, {}

    def endpoint(self, spec: ModelSpec) -> Endpoint:
        if spec.name not in self.endpoints:
            self.endpoints.update(resolve_endpoints(self.specs, [spec.name]))
        return self.endpoints[spec.name]

    def _endpoint_id(self, spec: ModelSpec) -> tuple[str, str]:
        """What limits and structured-output support belong to: a model id at a URL."""
        return self.endpoint(spec).url, spec.model

    def limiter(self, spec: ModelSpec) -> RateLimiter:
        """Entries that reach the same model at the same URL share one limiter, with the tightest limits."""
        key = self._endpoint_id(spec)  # once per entry and event loop: _client keeps the limiter with the client
        if key not in self._limiters:
            group = [s for s in self.specs.values() if s.backend == "openai" and self._endpoint_id(s) == key]

            def tightest(attr):
                values = [getattr(s, attr) for s in group if getattr(s, attr)]
                return min(values) * self._share if values else None

            slots = max(1, int(min(s.max_concurrency for s in group) * self._share))
            self._limiters[key] = RateLimiter(slots, tightest("rpm"), tightest("tpm"))
        return self._limiters[key]

    def _client(self, spec: ModelSpec):
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # clients, limiters and locks belong to one event loop: a new loop gets new ones
            self._loop, self._clients, self._limiters, self._probes = loop, {}, {}, {}
        if spec.name not in self._clients:
            import openai

            endpoint = self.endpoint(spec)
            # Our own retry loop counts retries and honours Retry-After for every caller of the endpoint.
            client = openai.AsyncOpenAI(base_url=endpoint.url, api_key=endpoint.key, max_retries=0, timeout=spec.timeout)
            self._clients[spec.name] = (client, self.limiter(spec))
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

    async def _schema_turn(self, endpoint: tuple) -> tuple[bool, asyncio.Lock | None]:
        """(send the schema?, the probe lock this request holds while the endpoint's support is unknown)."""
        if endpoint not in self._schema_ok:  # learnt by an earlier run, another worker or another chunk?
            known = await self.cache.get_mark(_schema_mark(endpoint))
            if known is not None:
                self._schema_ok[endpoint] = known == "yes"
        if endpoint in self._schema_ok:
            return self._schema_ok[endpoint], None
        probe = self._probes.setdefault(endpoint, asyncio.Lock())
        await probe.acquire()
        if endpoint in self._schema_ok:  # the request before this one found out
            probe.release()
            return self._schema_ok[endpoint], None
        return True, probe

    async def _learn_schema(self, endpoint: tuple, takes_it: bool) -> None:
        self._schema_ok[endpoint] = takes_it
        await self.cache.put_mark(_schema_mark(endpoint), "yes" if takes_it else "no")

    def _why(self, spec: ModelSpec, exc) -> str:
        """The server's own message (e.g. "Incorrect API key provided"), with any key in it redacted."""
        body = getattr(exc, "body", None)
        message = body.get("message") if isinstance(body, dict) else None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = body["error"].get("message") or message
        endpoint = self.endpoints.get(spec.name)
        return redact(str(message or exc), endpoint.key if endpoint else None)[:300]

    async def send(self, spec: ModelSpec, meter: Meter, messages: list[dict], images: dict[str, bytes], params: dict,
                   schema: dict | None) -> Reply:
        """One request, retried until it succeeds or fails for good; ``meter`` counts its retries and failure."""
        client, limiter = self._client(spec)
        endpoint = self._endpoint_id(spec)
        wire = self._wire_messages(messages, images)
        # Text at ~4 characters a token, an image as one 512 px tile at high detail; usage settles it later.
        estimate = (len(json.dumps(messages)) // 4 + IMAGE_TOKENS * len(images)
                    + int(params.get("max_tokens") or params.get("max_completion_tokens") or 256))
        for attempt in range(spec.max_retries + 1):
            with_schema, probe = (await self._schema_turn(endpoint)) if schema is not None else (False, None)
            wait, used = 0.0, 0
            await limiter.acquire(estimate)
            try:
                reply = await self._send_once(spec, client, wire, _with_schema(params, schema) if with_schema else params)
                used = reply.prompt_tokens + reply.completion_tokens
                if probe is not None:  # the first answer with a schema: the endpoint takes it
                    await self._learn_schema(endpoint, True)
                return reply
            except RequestFailed:
                meter.failed += 1
                raise
            except DataError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below; unknown errors are not retried
                kind, retryable = _classify(exc)
                no_schema = with_schema and kind in ("http_400", "http_422") and NO_SCHEMA.search(str(exc))
                if no_schema:  # this server lacks json_schema: every call to it parses free text from now on
                    await self._learn_schema(endpoint, False)
                elif not retryable or attempt == spec.max_retries:
                    meter.failed += 1
                    raise RequestFailed(spec.name, kind, self._why(spec, exc)) from None
                meter.retries += 1
                retry_after = _retry_after(exc)
                if retry_after is not None:
                    limiter.pause(retry_after)
                elif not no_schema:
                    wait = backoff_seconds(spec.backoff, attempt + 1, full_jitter=True)
            finally:
                limiter.release(estimate, used)
                if probe is not None:
                    probe.release()
            await asyncio.sleep(wait)  # the backoff holds no slot: other requests may go meanwhile
        raise AssertionError("unreachable")

    async def _send_once(self, spec: ModelSpec, client, wire: list[dict], params: dict) -> Reply:
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
        return Reply(text, getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0)
