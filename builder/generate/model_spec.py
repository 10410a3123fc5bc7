"""Model entries of a run config (:class:`ModelSpec`), their request parameters, and their endpoints.

An entry names where a model lives (an OpenAI-compatible ``base_url`` or a local ``path``), its limits,
prices and default parameters; :meth:`ModelSpec.from_config` checks every key's type and range, and
:func:`check_params` the request parameters, so a bad value fails when the file is read::

    spec = ModelSpec.from_config("gpt-4o", {"rpm": 500, "price": {"input": 2.5, "output": 10}})
    ModelSpec.from_config("gpt-4o", {"rpm": -5})   # DataError: field models.gpt-4o.rpm: must be greater than 0, got -5

:func:`resolve_endpoints` turns entries into URLs and keys once, in the process that read the config;
the key never appears in a repr (:func:`builder.generate.replies.redact` keeps it, or anything shaped like
a key, out of messages that reach a summary).
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass, field
from typing import Any

from builder.config_fields import check_mapping, check_value, typed_section
from builder.errors import DataError

BACKENDS = ("openai", "transformers")
OPENAI_URL = "https://api.openai.com/v1"
# Request parameters with a type and range of their own; others an openai-backend entry may send go unchecked.
PARAM_RULES: dict[str, tuple[Any, dict]] = {
    "temperature": (float, {"min": 0}), "top_p": (float, {"gt": 0, "max": 1}), "max_tokens": (int, {"min": 1}),
    "max_completion_tokens": (int, {"min": 1}), "min_tokens": (int, {"min": 0}), "seed": (int, {}),
    "n": (int, {"min": 1}), "presence_penalty": (float, {}), "frequency_penalty": (float, {}),
}
LOCAL_PARAMS = ("temperature", "max_tokens", "min_tokens", "seed")  # what the transformers backend reads
SET_BY_ROUTER = ("messages", "model", "response_format", "stream")  # the router's to set, never the config's


@functools.cache
def _sdk_params() -> frozenset[str]:
    from openai.resources.chat.completions import AsyncCompletions

    return frozenset(n for n in inspect.signature(AsyncCompletions.create).parameters if n != "self")


def check_params(params, backend: str | None, *, field: str, file: str | None = None) -> dict:
    """Request parameters checked before any request: names the ``backend`` takes (any, when None), and the
    types and ranges of the common ones (``temperature: hot`` or ``max_tokens: -1`` fail here, not at the server)."""
    params = check_mapping(params, field=field, file=file)
    known = set(LOCAL_PARAMS) if backend == "transformers" else _sdk_params() - set(SET_BY_ROUTER)
    for key, value in params.items():
        if backend is not None and key not in known:
            why = ("the router sets it" if key in SET_BY_ROUTER else
                   f"a {backend} model takes {', '.join(sorted(known))}" if backend == "transformers" else
                   "the openai client has no such parameter (a server-specific one goes under extra_body)")
            raise DataError(f"unknown request parameter: {why}", file=file, field=f"{field}.{key}")
        if key in PARAM_RULES:
            hint, rules = PARAM_RULES[key]
            check_value(value, hint, field=f"{field}.{key}", file=file, rules=rules)
    return params


@dataclass
class ModelSpec:
    """One model entry of the run config: where it lives, its limits and its prices."""

    name: str
    model: str = ""                       # the id sent to the server (default: the entry name)
    backend: str = field(default="openai", metadata={"choices": BACKENDS})
    base_url: str | None = None           # None: OPENAI_BASE_URL, as the openai client does
    api_key_env: str | None = "OPENAI_API_KEY"
    path: str | None = None               # transformers backend: a local model folder
    max_concurrency: int = field(default=16, metadata={"min": 1})
    rpm: float | None = field(default=None, metadata={"gt": 0})
    tpm: float | None = field(default=None, metadata={"gt": 0})
    timeout: float = field(default=60.0, metadata={"gt": 0})
    max_retries: int = field(default=6, metadata={"min": 0})
    backoff: float = field(default=0.5, metadata={"min": 0})  # seconds; doubles per retry, full jitter, capped at 30 s
    structured_output: bool = True        # send response_format json_schema; False: parse free text
    price: dict = field(default_factory=lambda: {"input": 0.0, "output": 0.0})  # USD per 1M tokens
    params: dict = field(default_factory=dict)  # default request parameters (temperature, max_tokens…)
    system: str | None = None             # a system prompt sent first (e.g. the paper's jailbroken bag member)

    @classmethod
    def from_config(cls, name: str, cfg: dict | None, *, file: str | None = None) -> "ModelSpec":
        where = f"models.{name}"
        cfg = dict(check_mapping(cfg, field=where, file=file))
        spec = typed_section(cls, cfg, file=file, where=where, given={"name": str(name)})
        spec.model = spec.model or spec.name
        spec.base_url = spec.base_url or None  # `${OPENAI_BASE_URL:-}` unset: the default endpoint
        if spec.backend == "transformers" and not spec.path:
            raise DataError("a transformers model needs `path` (a local model folder)", file=file, field=f"{where}.path")
        for key, value in spec.price.items():
            if key not in ("input", "output"):
                raise DataError("unknown key; expected input, output (USD per million tokens)", file=file,
                                field=f"{where}.price.{key}")
            check_value(value, float, field=f"{where}.price.{key}", file=file, rules={"min": 0})
        spec.price = {"input": 0.0, "output": 0.0, **spec.price}
        check_params(spec.params, spec.backend, field=f"{where}.params", file=file)
        return spec

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price.get("input", 0.0) + completion_tokens * self.price.get("output", 0.0)) / 1e6


@dataclass(frozen=True)
class Endpoint:
    """Where an openai-backend entry sends its requests, and the key it sends (never in a repr or a log)."""

    url: str
    key: str = field(repr=False)


def resolve_endpoints(specs: dict[str, ModelSpec], names=None, environ=None) -> dict[str, Endpoint]:
    """The endpoint of every openai-backend entry in ``names`` (all when None), from this process's
    environment: ``base_url`` or OPENAI_BASE_URL or OpenAI's, and the key in the variable ``api_key_env``
    names ("EMPTY" when it is null). A key that is not set is a DataError naming the entry's field."""
    environ = os.environ if environ is None else environ
    out = {}
    for name in sorted(specs if names is None else names):
        spec = specs[name]
        if spec.backend != "openai":
            continue
        key = environ.get(spec.api_key_env) if spec.api_key_env else "EMPTY"
        if not key:
            raise DataError(f"set the environment variable {spec.api_key_env} (or `api_key_env: null` for a "
                            "server without auth)", field=f"models.{name}.api_key_env")
        out[name] = Endpoint((spec.base_url or environ.get("OPENAI_BASE_URL") or OPENAI_URL).rstrip("/"), key)
    return out
