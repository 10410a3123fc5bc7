"""The work units of a run: collected (stage 1, one image each), then each run through the model stages.

:func:`collect_units` gathers the images one subcategory at a time into the run store and fixes the
work-unit order; :func:`process_unit` takes one unit through questions, responses and preferences and
returns its record (``status`` done, or failed with the stage, model and reason). Both executors of
:mod:`builder.generate.pipeline` (local asyncio, Ray) run units with these, so the output is the same::

    info = await collect_units(cfg, store, router, limit=12, progress=False)
    record = await process_unit(router, cfg, meta, store.image_data(meta["sha256"]), "preferences")
    record["status"], record["pairs"]["hardq"]["status"]
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter

from tqdm.auto import tqdm

from builder.errors import DataError
from builder.generate import stages
from builder.generate.config import PipelineConfig
from builder.generate.image_sources import build_source
from builder.generate.images import collect_images
from builder.generate.outcomes import RequestFailed
from builder.generate.router import ModelRouter
from builder.generate.run_store import RunStore


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
