"""The generation toolkit: run the SPA-VL recipe over any OpenAI-compatible models, then build a dataset folder.

    from builder.generate import PipelineConfig, build, generate, summary_line

    summary = generate("pipeline", "runs/r1", limit=12)   # a shipped recipe by name, or your own YAML
    print(summary_line(summary))
    build("runs/r1", "out/spa_vl_v2")                     # the run store -> a dataset folder

Modules, by job: ``config`` (the run config, typed; the run's snapshot), ``pipeline`` (``generate``: local
or Ray executor), ``units`` (collect the work units; one unit through the stages), ``stages`` (the model
stages), ``images`` and ``image_sources`` (the images stage), ``router`` (model access) with its backends
``openai_endpoints`` and ``local_backend``, ``model_spec``, ``rate_limit``, ``request_cache``, ``outcomes``
and ``replies``; ``run_store``, ``summary``, ``folder_build`` (``build``). The names below load their module on first use,
so importing this package imports no model or HTTP library.
"""

from __future__ import annotations

import importlib

_FACES = {
    "generate": "pipeline", "summary_line": "summary", "build": "folder_build", "NothingToBuild": "folder_build",
    "PipelineConfig": "config", "RunSnapshot": "config", "ModelRouter": "router", "ModelSpec": "model_spec",
    "Reply": "outcomes", "RequestFailed": "outcomes", "RequestCache": "request_cache", "RunStore": "run_store",
}
__all__ = sorted(_FACES)


def __getattr__(name: str):
    if name not in _FACES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_FACES[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FACES))
