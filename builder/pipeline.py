"""Run the generation pipeline: images → questions → responses → preferences, resumable, local or on Ray.

``generate(config, run_dir)`` first collects the images (the work units) and stores them with a marker
that names the config they came from, then sends every unit through the model stages. Every model call
is cached in the run store, so re-running the same command after a crash re-sends nothing that
succeeded, and changing one prompt re-runs only the calls that depend on it. It ends by writing
``RUN_DIR/summary.json`` (work units, requests, tokens and cost per model, wall time) and one line.

Example::

    summary = generate("builder/configs/pipeline.yaml", "runs/r1", limit=12)
    summary["units"]["done"], summary["cost_usd"]

Executors: ``local`` runs units as asyncio tasks in this process; ``ray`` runs chunks of units as Ray
tasks (``ray.init()`` locally, or the cluster at ``RAY_ADDRESS``) that share the run store through an
actor on this node, each with 1/N of every endpoint's limits, so the output is the same either way.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections import Counter
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from builder import stages
from builder.config import DEFAULTS, PipelineConfig, _merge
from builder.errors import DataError
from builder.llm import Meter, ModelRouter, RequestFailed
from builder.run_store import RunStore

STAGES = ("images", "questions", "responses", "preferences")
EXECUTORS = ("local", "ray")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- stage 1: images (the work units) ----------------------------------------------------------------
def _class_paths(cfg: PipelineConfig, limit: int | None) -> list[tuple[str, str, str]]:
    """Subcategories in round-robin over domains, so a small --limit still touches every domain."""
    per_domain = [[p for p in cfg.taxonomy.paths() if cfg.taxonomy.slug_for(p[0]) == slug] for slug in cfg.taxonomy.slugs]
    order = [d[i] for i in range(max(map(len, per_domain))) for d in per_domain if i < len(d)]
    if limit is not None:
        order = order[: math.ceil(limit / max(1, int(cfg.images["per_subcategory"])))]
    return order


def _interleave(metas: list[dict], cfg: PipelineConfig) -> list[dict]:
    """Work-unit order: the i-th image of every domain before the (i+1)-th of any."""
    by_domain: dict[str, list] = {}
    for m in metas:
        by_domain.setdefault(cfg.taxonomy.slug_for(m["class1"]), []).append(m)
    lists = list(by_domain.values())
    return [lst[i] for i in range(max(map(len, lists), default=0)) for lst in lists if i < len(lst)]


async def collect_units(cfg: PipelineConfig, store: RunStore, router: ModelRouter, limit: int | None, progress: bool) -> dict:
    """Collect the images one subcategory at a time, each stored as it completes (so a crash loses at most
    one subcategory's downloads and memory holds one subcategory), then fix the work-unit order."""
    from builder.images import ImageFilters, build_source, collect_images

    tag = cfg.fingerprint("images", "keywords", "taxonomy", prompts=("keywords",))
    plan = f"{tag}:{limit}"
    if store.mark("images") == plan:
        return json.loads(store.mark("images_info") or "{}")
    try:
        sources = [build_source(s, base_dir=cfg.base_dir, index=i) for i, s in enumerate(cfg.images["sources"])]
        filters = ImageFilters.from_config(cfg.images["filters"])
    except DataError as e:
        raise e.located(file=cfg.file) from None
    paths = _class_paths(cfg, limit)
    todo = [p for p in paths if store.mark(f"images:{tag}:{'/'.join(p)}") is None]
    failures: list[dict] = []

    async def expand(path):
        try:
            return await stages.expand_keywords(router, cfg, path)
        except RequestFailed as e:
            failures.append({"subcategory": "/".join(path), "stage": "keywords", "model": e.model, "kind": e.kind})
            return None

    keywords = dict(zip(todo, await asyncio.gather(*(expand(p) for p in todo))))
    stored = store.tagged(tag)
    seen = ({m["sha256"] for m in stored}, [m["phash"] for m in stored if m.get("phash") is not None])
    rejected: Counter = Counter(json.loads(store.mark(f"images_rejected:{tag}") or "{}"))
    for path in tqdm(todo, desc="images", unit="subcat", disable=not progress, leave=False):
        if keywords[path] is None:
            continue  # its keyword call failed: left unmarked, so the next run tries again
        try:
            images, rej = await collect_images(
                sources, filters, {path: keywords[path]}, per_subcategory=int(cfg.images["per_subcategory"]),
                download_concurrency=int(cfg.images["download_concurrency"]), timeout=float(cfg.images["timeout"]),
                progress=False, seen=seen)
        except (ConnectionError, OSError) as e:  # a source that is down: this subcategory waits for the next run
            failures.append({"subcategory": "/".join(path), "stage": "images", "kind": type(e).__name__, "detail": str(e)[:300]})
            continue
        store.add_images(images, tag)
        seen[0].update(i.sha256 for i in images)
        seen[1].extend(i.phash for i in images if i.phash is not None)
        rejected.update(rej)
        store.set_mark(f"images_rejected:{tag}", json.dumps(rejected))
        store.set_mark(f"images:{tag}:{'/'.join(path)}", "done")
    wanted = set(paths)
    metas = _interleave([m for m in store.tagged(tag) if (m["class1"], m["class2"], m["class3"]) in wanted], cfg)
    metas = metas[:limit] if limit is not None else metas
    store.set_order([m["sha256"] for m in metas])
    info = {"collected": len(seen[0]), "units": len(metas), "rejected": dict(sorted(rejected.items())),
            "subcategories": len(paths), "failures": failures}
    store.set_mark("images_info", json.dumps(info))
    if not failures:  # otherwise the next run retries what failed
        store.set_mark("images", plan)
    return info


# --- stages 2-4, one unit at a time ---------------------------------------------------------------------
async def process_unit(router: ModelRouter, cfg: PipelineConfig, meta: dict, data: bytes, until: str, advance=None) -> dict:
    """Run one work unit through the model stages up to ``until``; a request that failed for good fails the unit."""
    record = _record(cfg, meta, until)
    images = {meta["sha256"]: data}
    stage = "questions"
    try:
        record["questions"] = await stages.questions(router, cfg, record, images)
        advance and advance(stage)
        if until != "questions":
            stage = "responses"
            answers = await stages.responses(router, cfg, record, record["questions"], images)
            record["pairs"] = answers
            advance and advance(stage)
            if until != "responses":
                stage = "preferences"
                record["pairs"] = await stages.preferences(router, cfg, record, record["questions"], answers, images)
                advance and advance(stage)
        record["status"] = "done"
    except DataError:
        raise  # a config error (a refused parameter, a missing key): every unit would fail the same way
    except Exception as e:  # noqa: BLE001 - a request that failed for good, or anything else: this unit, not the run
        failed = isinstance(e, RequestFailed)
        record.update(status="failed", error={"stage": stage, "model": e.model if failed else None,
                                              "kind": e.kind if failed else type(e).__name__,
                                              "detail": e.detail if failed else str(e)[:300]})
        advance and advance(stage, failed=True)
    return record


def _record(cfg: PipelineConfig, meta: dict, until: str) -> dict:
    """A unit record's head: the image's metadata, the last stage asked for, the config it was made under."""
    return {**meta, "id": meta["sha256"], "until": until, "config": cfg.units_fingerprint}


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

    await asyncio.gather(*(worker() for _ in range(min(int(cfg.run["units_in_flight"]), len(metas)))))


class _StoreActor:
    """The run store behind a Ray actor on the driver's node: workers on any machine share one cache."""

    def __init__(self, run_dir: str):
        self.store = RunStore(run_dir)

    def get(self, key):
        return self.store.lookup(key)

    def put(self, key, model, reply):
        self.store.store(key, model, reply)


class _ActorCache:
    def __init__(self, actor):
        self.actor = actor

    async def get(self, key):
        return await self.actor.get.remote(key)

    async def put(self, key, model, reply):
        await self.actor.put.remote(key, model, reply)


def _ray_chunk(cfg, units: list[tuple[dict, bytes]], actor, share: float, until: str):
    """A Ray task: run a chunk of units with a share of the limits; return their records and meters."""

    async def run():
        router = ModelRouter(cfg.models, _ActorCache(actor), limit_share=share)
        try:
            records = await asyncio.gather(*(process_unit(router, cfg, meta, data, until) for meta, data in units))
        finally:
            await router.aclose()
        return records, router.meters

    return asyncio.run(run())


def _run_ray(cfg, store: RunStore, meters: dict[str, Meter], metas: list[dict], until: str, progress: Progress) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    workers = int(cfg.run["ray_workers"] or max(1, int(ray.cluster_resources().get("CPU", 1))))
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(_StoreActor).options(scheduling_strategy=here).remote(str(store.dir))
    task = ray.remote(num_cpus=1)(_ray_chunk)
    size = max(1, min(32, math.ceil(len(metas) / (workers * 4))))  # small chunks: records land often, little in flight
    chunks = [metas[i:i + size] for i in range(0, len(metas), size)]
    pending: list = []
    chunk_of: dict = {}
    try:
        while chunks or pending:
            while chunks and len(pending) < workers:  # at most `workers` at once, so 1/workers of each limit holds
                chunk = chunks.pop(0)
                ref = task.remote(cfg, [(m, store.image_data(m["sha256"])) for m in chunk], actor, 1 / workers, until)
                pending.append(ref)
                chunk_of[ref] = chunk
            done, pending = ray.wait(pending, num_returns=1)
            try:
                records, chunk_meters = ray.get(done[0])
            except Exception as e:  # noqa: BLE001 - a lost worker or node fails its chunk's units, not the run
                error = {"stage": "questions", "model": None, "kind": type(e).__name__, "detail": str(e)[:300]}
                records = [{**_record(cfg, m, until), "status": "failed", "error": error} for m in chunk_of[done[0]]]
                chunk_meters = {}
            for record in records:
                store.put_unit(record)
                failed_at = record.get("error", {}).get("stage")
                for s in STAGES[1:STAGES.index(until) + 1]:
                    if s == failed_at:
                        progress.advance(s, failed=True)
                        break
                    progress.advance(s)
            for name, m in chunk_meters.items():
                meters[name].merge(m)
    finally:
        ray.kill(actor)


def generate(config: str | Path | PipelineConfig, run_dir: str | Path, *, executor: str = "local", limit: int | None = None,
             until: str = "preferences", progress: bool = True) -> dict:
    """Run the pipeline into ``run_dir`` (created or resumed) and return the summary it writes."""
    t0 = time.perf_counter()
    if executor not in EXECUTORS:
        raise DataError(f"executor must be one of {EXECUTORS}, got {executor!r}", field="executor")
    if until not in STAGES:
        raise DataError(f"until must be one of {STAGES}, got {until!r}", field="until")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer, got {limit!r}", field="limit")
    cfg = config if isinstance(config, PipelineConfig) else PipelineConfig.load(config)
    store = RunStore(run_dir)
    # `${VAR}` stays unexpanded and keys are named, never held: nothing secret reaches the run directory.
    snapshot = {**_merge(DEFAULTS, cfg.unexpanded or cfg.raw, "", cfg.file), "taxonomy": cfg.taxonomy.source,
                "config_file": cfg.file, "units_fingerprint": cfg.units_fingerprint}
    _write_atomic(store.dir / "config.yaml", yaml.safe_dump(snapshot, sort_keys=False, allow_unicode=True))
    router = ModelRouter(cfg.models, store)

    async def run() -> tuple[dict, list[dict]]:  # one event loop: the clients and limiters belong to it
        try:
            images_info = await collect_units(cfg, store, router, limit, progress)
            metas = store.images()
            bar = Progress(STAGES[1:STAGES.index(until) + 1], len(metas), router.meters, progress)
            try:
                if until != "images" and executor == "local":
                    await _run_local(cfg, store, router, metas, until, bar)
                elif until != "images":
                    await asyncio.to_thread(_run_ray, cfg, store, router.meters, metas, until, bar)
            finally:
                bar.close()
        finally:
            await router.aclose()
        return images_info, metas

    try:
        images_info, metas = asyncio.run(run())
        summary = summarize(store, cfg, metas, router.meters, images_info, time.perf_counter() - t0, executor, until)
    finally:
        store.close()
    _write_atomic(Path(run_dir) / "summary.json", json.dumps(summary, indent=2, sort_keys=False) + "\n")
    return summary


def summarize(store: RunStore, cfg, metas: list[dict], meters: dict[str, Meter], images_info: dict, wall: float,
              executor: str, until: str) -> dict:
    records = store.units([m["sha256"] for m in metas]) if until != "images" else []
    failures = [{"unit": r["id"], **r["error"]} for r in records if r["status"] == "failed"]
    pairs = Counter(p.get("status", "answered") for r in records if r["status"] == "done" for p in r.get("pairs", {}).values())
    judged = pairs["agreed"] + pairs["position_disagreement"] + pairs["averaged"]  # averaged: verdicts disagreed
    models = {name: {"requests": m.requests, "cached": m.cached, "retries": m.retries, "failed": m.failed,
                     "prompt_tokens": m.prompt_tokens, "completion_tokens": m.completion_tokens,
                     "cost_usd": round(m.cost_usd, 6), "cached_tokens": m.cached_tokens,
                     "cached_cost_usd": round(m.cached_cost_usd, 6)} for name, m in meters.items() if m.requests or m.cached}
    return {
        "run_dir": str(store.dir), "config_fingerprint": cfg.fingerprint(), "executor": executor, "until": until,
        "images": images_info,
        "units": {"total": len(metas), "done": sum(r["status"] == "done" for r in records), "failed": len(failures),
                  "not_run": len(metas) - len(records), "failures": failures,
                  "failure_kinds": dict(Counter(f"{f['stage']}:{f['kind']}" for f in failures))},
        "pairs": {**dict(sorted(pairs.items())),
                  "kept": pairs["agreed"] + pairs["averaged"],
                  "position_disagreement_rate": round((pairs["position_disagreement"] + pairs["averaged"]) / judged, 4)
                  if judged else None},
        "requests": {"sent": sum(m.requests for m in meters.values()), "cached": sum(m.cached for m in meters.values()),
                     "retried": sum(m.retries for m in meters.values()), "failed": sum(m.failed for m in meters.values())},
        "models": models,
        "tokens": {"prompt": sum(m.prompt_tokens for m in meters.values()),
                   "completion": sum(m.completion_tokens for m in meters.values())},
        "cost_usd": round(sum(m.cost_usd for m in meters.values()), 6),
        # what the run's replies cost in all, this invocation's and those an earlier one paid for (cached)
        "run_total": {"tokens": sum(m.prompt_tokens + m.completion_tokens + m.cached_tokens for m in meters.values()),
                      "cost_usd": round(sum(m.cost_usd + m.cached_cost_usd for m in meters.values()), 6)},
        "wall_time_s": round(wall, 3),
    }


def summary_line(s: dict) -> str:
    u, r, p = s["units"], s["requests"], s["pairs"]
    rate, averaged = p["position_disagreement_rate"], p.get("averaged", 0)
    pairs = (f"{p['kept']:,} preference pairs kept{f' ({averaged:,} by averaging both orders)' if averaged else ''}, "
             f"{p.get('position_disagreement', 0):,} left out"
             + (f" (the two orders disagreed on {rate:.0%} of judged pairs)" if rate is not None else ""))
    return (f"generate: {u['total']:,} units ({u['done']:,} done, {u['failed']:,} failed) · {pairs} · "
            f"{r['sent']:,} requests sent, {r['cached']:,} cached, "
            f"{r['retried']:,} retried, {r['failed']:,} failed · ${s['cost_usd']:.4f} (run total "
            f"${s['run_total']['cost_usd']:.4f}) · {s['wall_time_s']:.1f} s "
            f"→ {Path(s['run_dir']) / 'summary.json'}")
