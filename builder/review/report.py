"""How far the judge agrees with people: the numbers of ``spa-vl review DIR --report``.

Judge against people is measured on the sides the page showed, not on chosen/rejected: the judge
always "picks chosen", so in those terms its labels are constant and kappa is 0 by construction. On
the sides, the judge says A or B (random per pair) and a person says A, B or tie, and Cohen's kappa
measures agreement beyond what the two raters' side frequencies give by chance. Ties are counted two
ways: left out (the main figures: the judge cannot tie), and as disagreements (the judge never ties,
so a tie never matches it). Intervals are percentile bootstraps over pairs (a pair carries all its
verdicts), seeded with the sample's seed::

    report = compute_report(sample, store.latest(), resamples=2000)
    report["judge_vs_people"]["without_ties"]["kappa"]     # {"n": 412, "value": 0.63, "ci": [0.55, 0.70]}
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations

import numpy as np

from builder.review.sample import Sample, SampledPair
from builder.review.stats import agreement, estimate, kappa, share_first
from builder.review.store import PICKS, Verdict

FORMAT = "spa-vl-review-report/1"
DEFAULT_RESAMPLES = 2000
_DECISIVE = [0, 1, 3, 4]  # the A/B block of a flattened 3x3 (A, B, tie) table
QUESTION_CHARS = 200


def _cell(row: str, col: str) -> int:
    return 3 * PICKS.index(row) + PICKS.index(col)


class _Items:
    """Per-pair flattened tables, summed over the verdicts given on the pair."""

    def __init__(self, size: int):
        self.size = size
        self.tables: dict[str, np.ndarray] = {}

    def add(self, pair_id: str, cell: int, count: int = 1) -> None:
        self.tables.setdefault(pair_id, np.zeros(self.size))[cell] += count

    def counts(self, ids=None, columns=None) -> np.ndarray:
        keys = sorted(self.tables if ids is None else set(ids) & set(self.tables))
        out = np.array([self.tables[k] for k in keys]).reshape(len(keys), self.size)
        return out[:, columns] if columns is not None else out


def compute_report(sample: Sample, latest: dict[tuple[str, str], Verdict], *, resamples: int = DEFAULT_RESAMPLES,
                   source: dict | None = None) -> dict:
    """Every figure of the report, as plain JSON-ready values."""
    verdicts = [v for (_, pid), v in sorted(latest.items()) if pid in sample.by_id]
    opts = {"resamples": resamples, "seed": sample.seed}
    reviewers = defaultdict(int)
    for v in verdicts:
        reviewers[v.reviewer] += 1
    judge = _Items(9)
    for v in verdicts:
        judge.add(v.id, _cell(sample.by_id[v.id].judge_side, v.pick))
    return {
        "format": FORMAT,
        "source": source or sample.source,
        "sample": {"n": sample.n, "seed": sample.seed, "config": sample.config, "drawn": len(sample.pairs),
                   "strata": sample.strata},
        "verdicts": {"count": len(verdicts), "pairs_reviewed": len({v.id for v in verdicts}),
                     "reviewers": dict(sorted(reviewers.items())), "ignored": len(latest) - len(verdicts)},
        "bootstrap": {"resamples": resamples, "seed": sample.seed, "level": 0.95, "unit": "pair", "method": "percentile"},
        "judge_vs_people": _judge_vs_people(sample, verdicts, judge, opts),
        "between_reviewers": _between_reviewers(verdicts, opts),
        "position_bias": _position_bias(sample, verdicts, opts),
        "unsafe_labels": _unsafe_labels(sample, verdicts, opts),
        "disagreements": _disagreements(sample, verdicts),
    }


def _pair_stats(items: _Items, ids, opts: dict) -> dict:
    """Agreement and kappa without ties (main) and with ties as disagreement, on the pairs ``ids``."""
    full = items.counts(ids)
    decisive = full[:, _DECISIVE]
    ties = full.sum() - decisive.sum()
    return {
        "without_ties": {"agreement": estimate(decisive, agreement, **opts).to_dict(),
                         "kappa": estimate(decisive, kappa, **opts).to_dict()},
        "ties_as_disagreement": {"agreement": estimate(full, agreement, **opts).to_dict(),
                                 "kappa": estimate(full, kappa, **opts).to_dict()},
        "ties": {"n": int(full.sum()), "count": int(ties), "rate": round(ties / full.sum(), 4) if full.sum() else None},
    }


def _judge_vs_people(sample: Sample, verdicts: list[Verdict], judge: _Items, opts: dict) -> dict:
    by_domain, by_category, by_reviewer = defaultdict(set), defaultdict(set), defaultdict(list)
    for v in verdicts:
        pair = sample.by_id[v.id]
        by_domain[pair.class1 or "(none)"].add(v.id)
        by_category[f"{pair.class1 or '(none)'} / {pair.class2 or '(none)'}"].add(v.id)
        by_reviewer[v.reviewer].append(v)
    out = _pair_stats(judge, None, opts)
    out["by_domain"] = {k: _pair_stats(judge, ids, opts) for k, ids in sorted(by_domain.items())}
    out["by_category"] = {k: _pair_stats(judge, ids, opts) for k, ids in sorted(by_category.items())}
    out["by_reviewer"] = {}
    for name, own in sorted(by_reviewer.items()):
        items = _Items(9)
        for v in own:
            items.add(v.id, _cell(sample.by_id[v.id].judge_side, v.pick))
        out["by_reviewer"][name] = _pair_stats(items, None, opts)
    return out


def _between_reviewers(verdicts: list[Verdict], opts: dict) -> dict:
    """Cohen's kappa between every two reviewers on the pairs both reviewed (A, B, tie), and pooled."""
    picks: dict[str, dict[str, str]] = defaultdict(dict)  # pair id -> reviewer -> pick
    for v in verdicts:
        picks[v.id][v.reviewer] = v.pick
    pooled, per_couple = _Items(9), defaultdict(lambda: _Items(9))
    for pid, by in picks.items():
        for r1, r2 in combinations(sorted(by), 2):
            pooled.add(pid, _cell(by[r1], by[r2]))
            per_couple[(r1, r2)].add(pid, _cell(by[r1], by[r2]))
    twice = sum(len(by) >= 2 for by in picks.values())
    out = {"pairs_reviewed_twice": twice, "pooled": None, "couples": []}
    if twice:
        full = pooled.counts()
        out["pooled"] = {"agreement": estimate(full, agreement, **opts).to_dict(), "kappa": estimate(full, kappa, **opts).to_dict()}
    for (r1, r2), items in sorted(per_couple.items()):
        full = items.counts()
        out["couples"].append({"reviewers": [r1, r2], "pairs": len(full),
                               "agreement": estimate(full, agreement, **opts).to_dict(),
                               "kappa": estimate(full, kappa, **opts).to_dict()})
    return out


def _position_bias(sample: Sample, verdicts: list[Verdict], opts: dict) -> dict:
    """How often people pick A among their A/B picks (0.5: no bias), beside the judge's side on the same pairs."""
    from scipy.stats import binomtest

    people, judge = _Items(2), _Items(2)
    for v in verdicts:
        if v.pick != "tie":
            people.add(v.id, PICKS.index(v.pick))
    for pid in {v.id for v in verdicts}:
        judge.add(pid, PICKS.index(sample.by_id[pid].judge_side))
    total = people.counts().sum(axis=0) if people.tables else np.zeros(2)
    p_value = binomtest(int(total[0]), int(total.sum()), 0.5).pvalue if total.sum() else None
    return {"people_share_A": estimate(people.counts(), share_first, **opts).to_dict(),
            "binomial_p": None if p_value is None else round(float(p_value), 4),
            "judge_share_A": estimate(judge.counts(), share_first, **opts).to_dict()}


def _unsafe_labels(sample: Sample, verdicts: list[Verdict], opts: dict) -> dict | None:
    """People's unsafe marks against the data's safety labels, per answer where labels exist; None without labels."""
    items = _Items(4)  # rows: person says unsafe / safe; columns: label unsafe / safe
    for v in verdicts:
        pair = sample.by_id[v.id]
        for side, marked in (("A", v.unsafe_a), ("B", v.unsafe_b)):
            label = pair.unsafe_label(side)
            if label is not None:
                items.add(v.id, 2 * (not marked) + (not label))
    if not items.tables:
        return None
    full = items.counts()
    total = full.sum(axis=0)
    return {"answers": int(total.sum()),
            "agreement": estimate(full, agreement, **opts).to_dict(), "kappa": estimate(full, kappa, **opts).to_dict(),
            "people_unsafe_rate": round(float(total[0] + total[1]) / total.sum(), 4),
            "labels_unsafe_rate": round(float(total[0] + total[2]) / total.sum(), 4)}


def _disagreements(sample: Sample, verdicts: list[Verdict]) -> list[dict]:
    """Every verdict that did not side with the judge (preferred the rejected answer, or a tie)."""
    rows = []
    for v in verdicts:
        if v.people == "chosen":
            continue
        pair: SampledPair = sample.by_id[v.id]
        question = " ".join(pair.question.split())
        rows.append({"id": v.id, "class1": pair.class1, "class2": pair.class2, "class3": pair.class3,
                     "question_type": pair.question_type,
                     "question": question if len(question) <= QUESTION_CHARS else question[:QUESTION_CHARS - 1] + "…",
                     "reviewer": v.reviewer, "people": v.people,
                     "unsafe_marked": sorted(_judge_term(v, s) for s, m in (("A", v.unsafe_a), ("B", v.unsafe_b)) if m),
                     "note": v.note})
    return sorted(rows, key=lambda r: (r["class1"] or "", r["class2"] or "", r["class3"] or "", r["id"], r["reviewer"]))


def _judge_term(v: Verdict, side: str) -> str:
    return v.a_is if side == "A" else ("rejected" if v.a_is == "chosen" else "chosen")
