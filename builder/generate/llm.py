"""Model access for the pipeline: one async router over OpenAI-compatible endpoints and local VLMs.

Every call goes through :class:`ModelRouter`, which gives each model entry of the run config

- a persistent request cache (:class:`RequestCache`, sqlite in the run directory) keyed by the model,
  the rendered messages with images as their sha256, and every parameter that changes the output,
  so a re-run re-sends nothing that already succeeded;
- limits per endpoint (:class:`~builder.generate.rate_limit.RateLimiter`): concurrency, requests and tokens per
  minute, and a pause for everyone when a server answers 429 with ``Retry-After``;
- retries with exponential backoff and full jitter on 429, 5xx, timeouts, connection errors and
  malformed replies; a request that keeps failing raises :class:`RequestFailed` with the server's reason
  (any API key in it redacted);
- structured output (``response_format`` json_schema) until an endpoint rejects it: the first request
  to an endpoint asks alone, and after a 400 about ``response_format`` every call to it parses free text;
- token and cost accounting (:class:`Meter`, prices in USD per million tokens from the config).

An endpoint's URL and key are resolved once (:func:`resolve_endpoints`, from ``base_url`` or
``OPENAI_BASE_URL`` and the variable ``api_key_env`` names) by the process that reads the config, and
handed to the router, so Ray workers on other machines never read their own environment.

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
import random
import re
from dataclasses import asdict, dataclass
from typing import Any

from builder.errors import DataError
from builder.generate.model_spec import (  # noqa: F401 - re-exported: callers import model access from here
    BACKENDS,
    Endpoint,
    ModelSpec,
    check_params,
    redact,
    resolve_endpoints,
)
from builder.generate.rate_limit import RATE_MARGIN, RateLimiter, _Bucket  # noqa: F401 - re-exported
from builder.generate.request_cache import Reply, RequestCache  # noqa: F401 - re-exported

# What servers without structured output say when they refuse response_format (vLLM, TGI, Ollama, proxies).
NO_SCHEMA = re.compile(r"response_format|json_schema|guided|grammar|structured", re.I)
TRANSPORT_PARAMS = ("extra_headers", "extra_query", "timeout")  # how a request travels, not what it asks
RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}
IMAGE_TOKENS = 255  # an estimate per image for the tokens-per-minute limiter (OpenAI: 85 + 170 per 512 px tile)


def image_part(sha256: str) -> dict:
    """A message content part that stands for an image by its hash (the cache key never holds pixels)."""
    return {"type": "image", "sha256": sha256}


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


def request_key(spec: ModelSpec, messages: list[dict], params: dict) -> str:
    ident = {"backend": spec.backend, "model": spec.path if spec.backend == "transformers" else spec.model,
             "messages": messages, "params": {k: v for k, v in params.items() if k not in TRANSPORT_PARAMS}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


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


class ModelRouter:
    """Send chat requests to the model entries of a run, through the cache, the limits and the meters."""

    def __init__(self, specs: dict[str, ModelSpec], cache, *, limit_share: float = 1.0,
                 endpoints: dict[str, Endpoint] | None = None):
        """``limit_share`` scales every endpoint's limits: Ray workers each get 1/N of them. ``endpoints``:
        resolved by the caller (see :func:`resolve_endpoints`); None resolves each entry at its first use."""
        self.specs = specs
        self.cache = cache
        self.meters = {name: Meter() for name in specs}
        self.endpoints = dict(endpoints) if endpoints is not None else None
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
            if not hit.reused:  # an earlier run paid for it (a reply stored by this run is counted where stored)
                meter.cached_tokens += hit.prompt_tokens + hit.completion_tokens
                meter.cached_cost_usd += spec.cost(hit.prompt_tokens, hit.completion_tokens)
            return hit
        meter.requests += 1
        if spec.backend == "transformers":
            reply = await self._local(spec, messages, images or {}, params)
        else:
            reply = await self._remote(spec, meter, messages, images or {}, params,
                                       schema if spec.structured_output else None)
        meter.prompt_tokens += reply.prompt_tokens
        meter.completion_tokens += reply.completion_tokens
        meter.cost_usd += spec.cost(reply.prompt_tokens, reply.completion_tokens)
        await self.cache.put(key, model, reply)
        return reply

    # --- OpenAI-compatible endpoints -------------------------------------------------------------
    def endpoint(self, spec: ModelSpec) -> Endpoint:
        if self.endpoints is None:
            self.endpoints = {}
        if spec.name not in self.endpoints:
            self.endpoints.update(resolve_endpoints(self.specs, [spec.name]))
        return self.endpoints[spec.name]

    def _endpoint(self, spec: ModelSpec) -> tuple[str, str]:
        """What limits and structured-output support belong to: a model id at a URL."""
        return self.endpoint(spec).url, spec.model

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
        if loop is not self._loop:  # clients, limiters and locks belong to one event loop: a new loop gets new ones
            self._loop, self._clients, self._limiters, self._probes = loop, {}, {}, {}
        if spec.name not in self._clients:
            import openai

            endpoint = self.endpoint(spec)
            # Our own retry loop counts retries and honours Retry-After for every caller of the endpoint.
            client = openai.AsyncOpenAI(base_url=endpoint.url, api_key=endpoint.key, max_retries=0, timeout=spec.timeout)
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

    def _why(self, spec: ModelSpec, exc) -> str:
        """The server's own message (e.g. "Incorrect API key provided"), with any key in it redacted."""
        body = getattr(exc, "body", None)
        message = body.get("message") if isinstance(body, dict) else None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = body["error"].get("message") or message
        endpoint = (self.endpoints or {}).get(spec.name)
        return redact(str(message or exc), endpoint.key if endpoint else None)[:300]

    async def _remote(self, spec: ModelSpec, meter: Meter, messages, images, params, schema) -> Reply:
        client, limiter = self._client(spec)
        endpoint = self._endpoint(spec)
        wire = self._wire_messages(messages, images)
        # Text at ~4 characters a token, an image as one 512 px tile at high detail; usage settles it later.
        estimate = (len(json.dumps(messages)) // 4 + IMAGE_TOKENS * len(images)
                    + int(params.get("max_tokens") or params.get("max_completion_tokens") or 256))
        for attempt in range(spec.max_retries + 1):
            with_schema, probe = (await self._schema_turn(endpoint)) if schema is not None else (False, None)
            sent = {**params, "response_format": {"type": "json_schema", "json_schema": {
                "name": "reply", "strict": True, "schema": schema}}} if with_schema else params
            wait = 0.0
            await limiter.acquire(estimate)
            used = 0
            try:
                reply = await self._send(spec, client, wire, sent)
                used = reply.prompt_tokens + reply.completion_tokens
                if probe is not None:  # the first answer with a schema: the endpoint takes it
                    self._schema_ok[endpoint] = True
                    await self.cache.put_mark(_schema_mark(endpoint), "yes")
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
                    self._schema_ok[endpoint] = False
                    await self.cache.put_mark(_schema_mark(endpoint), "no")
                elif not retryable or attempt == spec.max_retries:
                    meter.failed += 1
                    raise RequestFailed(spec.name, kind, self._why(spec, exc)) from None
                meter.retries += 1
                retry_after = _retry_after(exc)
                if retry_after is not None:
                    limiter.pause(retry_after)
                elif not no_schema:
                    wait = random.uniform(0, min(30.0, spec.backoff * 2**attempt))
            finally:
                limiter.release(estimate, used)
                if probe is not None:
                    probe.release()
            await asyncio.sleep(wait)  # the backoff holds no slot: other requests may go meanwhile
        raise AssertionError("unreachable")

    async def _send(self, spec: ModelSpec, client, wire: list[dict], params: dict) -> Reply:
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

        from builder.vlm.local import load_local_vlm

        try:
            vlm = await asyncio.to_thread(load_local_vlm, spec.path)
        except Exception as exc:  # noqa: BLE001 - every request to it would fail the same way: a config error
            raise DataError(f"cannot load the model: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                            field=f"models.{spec.name}.path") from None
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
            vlm.generate, local_msgs, pil, max_new_tokens=params.get("max_tokens", 128),
            temperature=params.get("temperature", 0.0), seed=params.get("seed", 0),
            min_new_tokens=params.get("min_tokens", 1))
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



def strip_echo(reply: str, prompt: str) -> str:
    """``reply`` without the lines it repeats from ``prompt``: a server that echoes the request (or a model
    that restates its instructions) must not have the prompt's own example read as its answer."""
    said = {line.strip() for line in prompt.splitlines() if line.strip()}
    kept = "\n".join(line for line in reply.splitlines() if line.strip() not in said)
    for line in sorted((s for s in said if len(s) >= 20), key=len, reverse=True):  # echoes with other line breaks
        kept = kept.replace(line, "")
    return kept.strip()
