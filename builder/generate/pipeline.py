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
import math
import os
import time
from collections import Counter
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from builder.generate import stages
from builder.generate.config import PipelineConfig
from builder.errors import DataError
from builder.generate.model_spec import resolve_endpoints
from builder.generate.outcomes import Meter, RequestFailed
from builder.generate.router import ModelRouter
from builder.generate.run_store import RunStore
from builder.shipped import PIPELINE_CONFIGS

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
        order = order[: math.ceil(limit / cfg.images.per_subcategory)]
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
    from builder.generate.images import build_source, collect_images

    tag = cfg.fingerprint("images", "keywords", "taxonomy", prompts=("keywords",))
    plan = f"{tag}:{limit}"
    if store.mark("images") == plan:
        return json.loads(store.mark("images_info") or "{}")
    sources = [build_source(s, index=i) for i, s in enumerate(cfg.images.sources)]  # checked when the config was read
    paths = _class_paths(cfg, limit)
    todo = [p for p in paths if store.mark(f"images:{tag}:{'/'.join(p)}") is None]
    failures: list[dict] = []
    unparseable: list[str] = []

    async def expand(path):
        try:
            words = await stages.expand_keywords(router, cfg, path)
        except RequestFailed as e:
            failures.append({"subcategory": "/".join(path), "stage": "keywords", "model": e.model, "kind": e.kind,
                             "detail": e.detail})
            return None
        if words is None:  # a reply without keywords (e.g. an echo of the prompt): search by the name instead
            unparseable.append("/".join(path))
            words = [path[2]]
        return words

    keywords = dict(zip(todo, await asyncio.gather(*(expand(p) for p in todo))))
    stored = store.tagged(tag)
    seen = ({m["sha256"] for m in stored}, [m["phash"] for m in stored if m.get("phash") is not None])
    rejected: Counter = Counter(json.loads(store.mark(f"images_rejected:{tag}") or "{}"))
    for path in tqdm(todo, desc="images", unit="subcat", disable=not progress, leave=False):
        if keywords[path] is None:
            continue  # its keyword call failed: left unmarked, so the next run tries again
        try:
            images, rej = await collect_images(
                sources, cfg.images.filters, {path: keywords[path]}, per_subcategory=cfg.images.per_subcategory,
                download_concurrency=cfg.images.download_concurrency, timeout=cfg.images.timeout,
                progress=False, seen=seen)
        except (ConnectionError, OSError) as e:  # a source that is down: this subcategory waits for the next run
            failures.append({"subcategory": "/".join(path), "stage": "images", "model": None, "kind": type(e).__name__,
                             "detail": str(e)[:300]})
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
            "subcategories": len(paths), "keywords_unparseable": sorted(unparseable), "failures": failures}
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
        record = failed_record(cfg, meta, until, stage, e.model if failed else None,
                               e.kind if failed else type(e).__name__, e.detail if failed else str(e)[:300])
        advance and advance(stage, failed=True)
    return record


def _record(cfg: PipelineConfig, meta: dict, until: str) -> dict:
    """A unit record's head: the image's metadata, the last stage asked for, the config it was made under."""
    return {**meta, "id": meta["sha256"], "until": until, "config": cfg.units_fingerprint}


def failed_record(cfg: PipelineConfig, meta: dict, until: str, stage: str, model: str | None, kind: str,
                  detail: str) -> dict:
    """The record of a unit that failed at ``stage``: why, in the words of the server or the error."""
    return {**_record(cfg, meta, until), "status": "failed",
            "error": {"stage": stage, "model": model, "kind": kind, "detail": detail}}


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
    _write_atomic(store.dir / "config.yaml", yaml.safe_dump(cfg.snapshot(), sort_keys=False, allow_unicode=True))
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
    _write_atomic(Path(run_dir) / "summary.json", json.dumps(summary, indent=2, sort_keys=False) + "\n")
    return summary


def _usage(store: RunStore, cfg: PipelineConfig, meters: dict[str, Meter]) -> dict[str, dict]:
    """Per model: requests, tokens and cost counted from the replies this invocation stored (wherever they
    were sent from), failures, retries and cache hits from the meters."""
    stored = store.usage()
    out = {}
    for name, m in meters.items():
        n, prompt, completion = stored.get(name, (0, 0, 0))
        if not (n or m.failed or m.cached):
            continue
        out[name] = {"requests": n + m.failed, "cached": m.cached, "retries": m.retries, "failed": m.failed,
                     "prompt_tokens": prompt, "completion_tokens": completion,
                     "cost_usd": round(cfg.models[name].cost(prompt, completion), 6), "cached_tokens": m.cached_tokens,
                     "cached_cost_usd": round(m.cached_cost_usd, 6)}
    return out


def _why(image_failures: list[dict], unit_failures: list[dict]) -> list[dict]:
    """What failed, grouped by stage, model and kind, most frequent first, with the first message of each."""
    groups: dict[tuple, dict] = {}
    for what, failures in (("subcategories", image_failures), ("units", unit_failures)):
        for f in failures:
            key = (what, f["stage"], f.get("model"), f["kind"])
            groups.setdefault(key, {"count": 0, "what": what, "stage": f["stage"], "model": f.get("model"),
                                    "kind": f["kind"], "detail": f.get("detail") or ""})["count"] += 1
    return sorted(groups.values(), key=lambda g: -g["count"])


def summarize(store: RunStore, cfg, metas: list[dict], meters: dict[str, Meter], images_info: dict, wall: float,
              executor: str, until: str) -> dict:
    records = store.units([m["sha256"] for m in metas]) if until != "images" else []
    failures = [{"unit": r["id"], **r["error"]} for r in records if r["status"] == "failed"]
    pairs = Counter(p.get("status", "answered") for r in records if r["status"] == "done" for p in r.get("pairs", {}).values())
    judged = pairs["agreed"] + pairs["position_disagreement"] + pairs["averaged"]  # averaged: verdicts disagreed
    models = _usage(store, cfg, meters)
    total = {k: sum(m[k] for m in models.values()) for k in
             ("requests", "cached", "retries", "failed", "prompt_tokens", "completion_tokens", "cost_usd",
              "cached_tokens", "cached_cost_usd")}
    return {
        "run_dir": str(store.dir), "config_fingerprint": cfg.fingerprint(), "executor": executor, "until": until,
        "images": images_info,
        "units": {"total": len(metas), "done": sum(r["status"] == "done" for r in records), "failed": len(failures),
                  "not_run": len(metas) - len(records), "failures": failures,
                  "failure_kinds": dict(Counter(f"{f['stage']}:{f['kind']}" for f in failures))},
        "why": _why(images_info.get("failures", []), failures),
        "pairs": {**dict(sorted(pairs.items())),
                  "kept": pairs["agreed"] + pairs["averaged"],
                  "position_disagreement_rate": round((pairs["position_disagreement"] + pairs["averaged"]) / judged, 4)
                  if judged else None},
        "requests": {"sent": total["requests"], "cached": total["cached"], "retried": total["retries"],
                     "failed": total["failed"]},
        "models": models,
        "tokens": {"prompt": total["prompt_tokens"], "completion": total["completion_tokens"]},
        "cost_usd": round(total["cost_usd"], 6),
        # what the run's replies cost in all, this invocation's and those an earlier one paid for (cached)
        "run_total": {"tokens": total["prompt_tokens"] + total["completion_tokens"] + total["cached_tokens"],
                      "cost_usd": round(total["cost_usd"] + total["cached_cost_usd"], 6)},
        "wall_time_s": round(wall, 3),
    }


def _why_line(s: dict) -> str:
    """The most frequent failure and its reason, for the summary line ('' when nothing failed)."""
    notes = []
    if s["why"]:
        top = s["why"][0]
        at = f"{top['stage']}" + (f" ({top['model']})" if top["model"] else "")
        notes.append(f"{top['count']:,} {top['what']} failed at {at}: {top['kind']}"
                     + (f": {top['detail'][:160]}" if top["detail"] else "")
                     + (f" (+{len(s['why']) - 1} other reasons in summary.json)" if len(s["why"]) > 1 else ""))
    unread = len(s["images"].get("keywords_unparseable", []))
    if unread:
        notes.append(f"{unread:,} keyword replies unparseable (searched by the subcategory name)")
    return "".join(f" · {n}" for n in notes)


def summary_line(s: dict) -> str:
    u, r, p = s["units"], s["requests"], s["pairs"]
    rate, averaged = p["position_disagreement_rate"], p.get("averaged", 0)
    unparseable = p.get("judge_unparseable", 0)
    pairs = (f"{p['kept']:,} preference pairs kept{f' ({averaged:,} by averaging both orders)' if averaged else ''}, "
             f"{p.get('position_disagreement', 0):,} left out"
             + (f" (the two orders disagreed on {rate:.0%} of judged pairs)" if rate is not None else "")
             + (f", {unparseable:,} with an unparseable verdict" if unparseable else ""))
    return (f"generate: {u['total']:,} units ({u['done']:,} done, {u['failed']:,} failed) · {pairs} · "
            f"{r['sent']:,} requests sent, {r['cached']:,} cached, "
            f"{r['retried']:,} retried, {r['failed']:,} failed · ${s['cost_usd']:.4f} (run total "
            f"${s['run_total']['cost_usd']:.4f}) · {s['wall_time_s']:.1f} s{_why_line(s)} "
            f"→ {Path(s['run_dir']) / 'summary.json'}")
