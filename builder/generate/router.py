"""Model access for the pipeline: one async router over OpenAI-compatible endpoints and local VLMs.

Every call goes through :class:`ModelRouter`, which gives each model entry of the run config

- a persistent request cache (:class:`~builder.generate.request_cache.RequestCache`, sqlite in the run
  directory) keyed by the model, the rendered messages with images as their sha256, and every parameter
  that changes the output, so a re-run re-sends nothing that already succeeded;
- the backend its entry names: an OpenAI-compatible endpoint
  (:class:`~builder.generate.openai_endpoints.OpenAIEndpoints`: limits, retries, structured output) or an
  in-process model (:func:`~builder.generate.local_backend.local_reply`);
- token and cost accounting (:class:`~builder.generate.outcomes.Meter`, prices in USD per million tokens
  from the config); a request that failed for good raises
  :class:`~builder.generate.outcomes.RequestFailed` with the reason.

An endpoint's URL and key are resolved once (:func:`~builder.generate.model_spec.resolve_endpoints`, from
``base_url`` or ``OPENAI_BASE_URL`` and the variable ``api_key_env`` names) by the process that reads the
config, and handed to the router, so Ray workers on other machines never read their own environment.

Example::

    router = ModelRouter({"gpt-4o": ModelSpec.from_config("gpt-4o", {"price": {"input": 2.5, "output": 10}})},
                         RequestCache("run/run.sqlite"))
    reply = await router.chat("gpt-4o", [{"role": "user", "content": [image_part(sha), {"type": "text", "text": "Describe it."}]}],
                              images={sha: jpeg_bytes})
    reply.text, reply.cached, router.meters["gpt-4o"].cost_usd
"""

from __future__ import annotations

import hashlib
import json

from builder.errors import DataError
from builder.generate.local_backend import local_reply
from builder.generate.model_spec import Endpoint, ModelSpec
from builder.generate.openai_endpoints import OpenAIEndpoints
from builder.generate.outcomes import Meter, Reply, RequestFailed

TRANSPORT_PARAMS = ("extra_headers", "extra_query", "timeout")  # how a request travels, not what it asks


def image_part(sha256: str) -> dict:
    """A message content part that stands for an image by its hash (the cache key never holds pixels)."""
    return {"type": "image", "sha256": sha256}


def request_key(spec: ModelSpec, messages: list[dict], params: dict) -> str:
    ident = {"backend": spec.backend, "model": spec.path if spec.backend == "transformers" else spec.model,
             "messages": messages, "params": {k: v for k, v in params.items() if k not in TRANSPORT_PARAMS}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


class ModelRouter:
    """Send chat requests to the model entries of a run, through the cache, the backends and the meters."""

    def __init__(self, specs: dict[str, ModelSpec], cache, *, limit_share: float = 1.0,
                 endpoints: dict[str, Endpoint] | None = None):
        """``limit_share`` scales every endpoint's limits: Ray workers each get 1/N of them. ``endpoints``:
        resolved by the caller (see :func:`resolve_endpoints`); None resolves each entry at its first use."""
        self.specs = specs
        self.cache = cache
        self.meters = {name: Meter() for name in specs}
        self.remote = OpenAIEndpoints(specs, cache, limit_share=limit_share, endpoints=endpoints)

    async def aclose(self) -> None:
        """Close the HTTP clients (call before the event loop ends)."""
        await self.remote.aclose()

    def spec(self, name: str) -> ModelSpec:
        if name not in self.specs:
            raise DataError(f"unknown model {name!r}; the config's models are {sorted(self.specs)}", field="models")
        return self.specs[name]

    def endpoint(self, spec: ModelSpec) -> Endpoint:
        """Where an openai-backend entry's requests go, and with which key."""
        return self.remote.endpoint(spec)

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
            reply = await self.remote.send(spec, meter, messages, images or {}, params,
                                           schema if spec.structured_output else None)
        meter.prompt_tokens += reply.prompt_tokens
        meter.completion_tokens += reply.completion_tokens
        meter.cost_usd += spec.cost(reply.prompt_tokens, reply.completion_tokens)
        await self.cache.put(key, model, reply)
        return reply

    async def _local(self, spec: ModelSpec, messages, images, params) -> Reply:
        try:
            return await self._local_call(spec, messages, images, params)
        except (RequestFailed, DataError):
            raise
        except Exception as exc:  # noqa: BLE001 - out of memory, a processor error…: this request fails, the run goes on
            raise RequestFailed(spec.name, type(exc).__name__, str(exc)[:300]) from None

    async def _local_call(self, spec: ModelSpec, messages, images, params) -> Reply:
        """One request to an in-process model: the hook a router for other local models overrides
        (``training.judges.JudgeRouter`` answers its text judges here)."""
        return await local_reply(spec, messages, images, params)
