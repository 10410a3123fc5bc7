"""The summary of a run: what ``generate`` writes to ``RUN_DIR/summary.json`` and says in one line.

Requests, tokens and cost are counted from the replies stored in the run store during this invocation
(so a lost Ray worker's spending is still counted); failures, retries and cache hits from the meters.
``summary["why"]`` groups what failed by stage, model and kind, most frequent first::

    summary = summarize(store, cfg, metas, router.meters, images_info, wall=12.5, executor="local", until="preferences")
    print(summary_line(summary))    # generate: 12 units (12 done, 0 failed) · 30 preference pairs kept, ...
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from builder.generate.config import PipelineConfig
from builder.generate.outcomes import Meter
from builder.generate.run_store import RunStore


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
