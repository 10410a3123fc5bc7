"""Run the generation pipeline: images → questions → responses → preferences, resumable, local or on Ray.

``generate(config, run_dir)`` first collects the images (the work units) and stores them with a marker
that names the config they came from, then sends every unit through the model stages. Every model call
is cached in the run store, so re-running the same command after a crash re-sends nothing that
succeeded, and changing one prompt re-runs only the calls that depend on it. It ends by writing
``RUN_DIR/summary.json`` (work units, requests, tokens and cost per model, wall time) and one line.

Example::

    summary = generate("pipeline", "runs/r1", limit=12)     # a shipped recipe by name, or a YAML path
    summary["units"]["done"], summary["cost_usd"], summary["why"]

The config is checked whole and every endpoint's URL and key resolved before the first request; a
config error stops the run (DataError). When something fails, ``summary["why"]`` says what and why
(the server's own message, any key redacted). Requests, tokens and cost are counted from the replies
stored in the run store during this invocation, so a lost Ray worker's spending is still counted.

Executors: ``local`` runs units as asyncio tasks in this process; ``ray`` runs chunks of units as Ray
tasks (``ray.init()`` locally, or the cluster at ``RAY_ADDRESS``; see :mod:`builder.generate.ray_executor`), so
the output is the same either way.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from builder.errors import DataError
from builder.files import atomic_write
from builder.generate.config import PipelineConfig
from builder.generate.model_spec import resolve_endpoints
from builder.generate.outcomes import Meter
from builder.generate.router import ModelRouter
from builder.generate.run_store import RunStore
from builder.generate.summary import summarize
from builder.generate.units import collect_units, process_unit
from builder.shipped import PIPELINE_CONFIGS

STAGES = ("images", "questions", "responses", "preferences")
EXECUTORS = ("local", "ray")


class Progress:
    """One bar per model stage: units through it, and live requests, cache hits, failures, rate and spend."""

    def __init__(self, stage_names, total: int, meters: dict[str, Meter], enabled: bool):
        self.meters, self.t0, self.last = meters, time.monotonic(), 0.0
        self.failed: Counter = Counter()
        self.bars = {s: tqdm(total=total, desc=f"{s:<11}", unit="unit", position=i, disable=not enabled, leave=True)
                     for i, s in enumerate(stage_names)}

    def advance(self, stage: str, failed: bool = False) -> None:
        bar = self.bars.get(stage)
        if bar is None:
            return
        self.failed[stage] += failed
        bar.update(1)
        now = time.monotonic()
        if now - self.last > 0.5 or bar.n == bar.total:
            self.last = now
            sent = sum(m.requests for m in self.meters.values())
            bar.set_postfix_str(
                f"failed {self.failed[stage]} · req {sent} · cached {sum(m.cached for m in self.meters.values())} "
                f"· {sent / max(now - self.t0, 1e-9) * 60:.0f}/min · ${sum(m.cost_usd for m in self.meters.values()):.4f}",
                refresh=False)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


async def _run_local(cfg, store: RunStore, router: ModelRouter, metas: list[dict], until: str, progress: Progress) -> None:
    queue: asyncio.Queue = asyncio.Queue()
    for meta in metas:
        queue.put_nowait(meta)

    async def worker() -> None:
        while not queue.empty():
            meta = queue.get_nowait()
            store.put_unit(await process_unit(router, cfg, meta, store.image_data(meta["sha256"]), until, progress.advance))

    await asyncio.gather(*(worker() for _ in range(min(cfg.run.units_in_flight, len(metas)))))


def _advance_for(progress: Progress, record: dict, until: str) -> None:
    """Move the stage bars for a record that finished elsewhere (a Ray task)."""
    failed_at = (record.get("error") or {}).get("stage")
    for stage in STAGES[1:STAGES.index(until) + 1]:
        progress.advance(stage, failed=stage == failed_at)
        if stage == failed_at:
            break


def _check_recipe(cfg: PipelineConfig) -> None:
    """The shipped OpenAI recipe with SPA_VL_MODEL set: the user means a local server, which has its own recipe."""
    if Path(cfg.file).resolve() == (PIPELINE_CONFIGS / "pipeline.yaml").resolve() and os.environ.get("SPA_VL_MODEL"):
        raise DataError("SPA_VL_MODEL is set, but the `pipeline` recipe sends OpenAI's model ids at OpenAI's prices "
                        "and limits; for a local server (vLLM, SGLang, Ollama) run `spa-vl generate local-server` "
                        "(every role on SPA_VL_MODEL, no prices), or unset SPA_VL_MODEL", file=cfg.file)


def generate(config: str | Path | PipelineConfig, run_dir: str | Path, *, executor: str = "local", limit: int | None = None,
             until: str = "preferences", progress: bool = True) -> dict:
    """Run the pipeline into ``run_dir`` (created or resumed) and return the summary it writes.

    ``config``: a YAML path, the name of a shipped recipe (``pipeline``, ``local-server``, ``local``) or a
    loaded :class:`PipelineConfig`. Everything is checked, and every endpoint resolved, before the first request."""
    t0 = time.perf_counter()
    if executor not in EXECUTORS:
        raise DataError(f"executor must be one of {EXECUTORS}, got {executor!r}", field="executor")
    if until not in STAGES:
        raise DataError(f"until must be one of {STAGES}, got {until!r}", field="until")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise DataError(f"limit must be a positive integer, got {limit!r}", field="limit")
    cfg = config if isinstance(config, PipelineConfig) else PipelineConfig.load(config)
    _check_recipe(cfg)
    try:  # here, in the driver: Ray workers get the URLs and keys, never read their own environment
        endpoints = resolve_endpoints(cfg.models, cfg.used_models())
    except DataError as e:
        raise e.located(file=cfg.file) from None
    store = RunStore(run_dir)
    # `${VAR}` stays unexpanded and keys are named, never held: nothing secret reaches the run directory.
    atomic_write(store.dir / "config.yaml", yaml.safe_dump(cfg.snapshot(), sort_keys=False, allow_unicode=True))
    router = ModelRouter(cfg.models, store, endpoints=endpoints)

    async def run() -> tuple[dict, list[dict]]:  # one event loop: the clients and limiters belong to it
        try:
            images_info = await collect_units(cfg, store, router, limit, progress)
            metas = store.images()
            bar = Progress(STAGES[1:STAGES.index(until) + 1], len(metas), router.meters, progress)
            try:
                if until != "images" and executor == "local":
                    await _run_local(cfg, store, router, metas, until, bar)
                elif until != "images":
                    from builder.generate.ray_executor import run_on_ray

                    def on_record(record: dict) -> None:
                        store.put_unit(record)
                        _advance_for(bar, record, until)

                    await asyncio.to_thread(run_on_ray, cfg, store, endpoints, router.meters, metas, until, on_record)
            finally:
                bar.close()
        finally:
            await router.aclose()
        return images_info, metas

    if executor == "ray" and until != "images":
        from builder.generate.ray_executor import connect

        connect()
    try:
        images_info, metas = asyncio.run(run())
        summary = summarize(store, cfg, metas, router.meters, images_info, time.perf_counter() - t0, executor, until)
    except DataError as e:  # a config error met at run time (a model that does not load): the file it is in
        raise e.located(file=cfg.file) from None
    finally:
        store.close()
    atomic_write(Path(run_dir) / "summary.json", json.dumps(summary, indent=2, sort_keys=False) + "\n")
    return summary
