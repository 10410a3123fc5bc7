"""The review report's numbers, checked against examples worked by hand (in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from builder.review.report import compute_report
from builder.review.sample import Sample, SampledPair
from builder.review.stats import agreement, bootstrap, estimate, kappa, share_first
from builder.review.store import Verdict
from builder.taxonomy import Taxonomy


def _items(table: dict[int, int], size: int) -> np.ndarray:
    """One item (pair) per observation: row k of the result is a one-hot flattened table cell."""
    rows = [np.eye(size)[cell] for cell, count in sorted(table.items()) for _ in range(count)]
    return np.array(rows)


def test_kappa_of_a_two_by_two_table_worked_by_hand():
    # Rows: the judge's side, columns: the person's side (A, B).
    #            person A  person B
    #   judge A      8         2        judge A: 10
    #   judge B      1         9        judge B: 10
    #   person:      9        11        n = 20
    # p_o = (8 + 9) / 20 = 0.85;  p_e = (10*9 + 10*11) / 20^2 = 200 / 400 = 0.5
    # kappa = (0.85 - 0.5) / (1 - 0.5) = 0.7
    table = np.array([[8, 2, 1, 9]])
    assert agreement(table)[0] == pytest.approx(0.85)
    assert kappa(table)[0] == pytest.approx(0.7)


def test_kappa_with_ties_as_a_third_category_worked_by_hand():
    # Add 4 ties to the table above: judge A / person tie 3, judge B / person tie 1 (the judge never ties).
    #            A   B   tie
    #   judge A  8   2   3     13
    #   judge B  1   9   1     11
    #   tie      0   0   0      0
    #   person:  9  11   4     n = 24
    # p_o = 17/24 = 408/576;  p_e = (13*9 + 11*11 + 0*4) / 24^2 = 238/576
    # kappa = (408 - 238) / (576 - 238) = 170/338 = 0.502958...
    table = np.array([[8, 2, 3, 1, 9, 1, 0, 0, 0]])
    assert agreement(table)[0] == pytest.approx(17 / 24)
    assert kappa(table)[0] == pytest.approx(170 / 338)


def test_kappa_is_undefined_when_both_raters_use_one_category():
    # p_e = (4*4)/16 = 1: kappa is 0/0, reported as missing rather than a made-up 1 or 0.
    assert math.isnan(kappa(np.array([[4, 0, 0, 0]]))[0])
    assert estimate(_items({0: 4}, 4), kappa, resamples=200, seed=0).value is None


def test_bootstrap_interval_of_kappa_matches_the_interval_worked_by_hand():
    # The 2x2 table above, times 10: n = 200, p_o = 0.85, p_e = 0.5, kappa = 0.7.
    # Large-sample standard error (Cohen 1960): sqrt(p_o (1 - p_o) / (n (1 - p_e)^2))
    #   = sqrt(0.85 * 0.15 / (200 * 0.25)) = sqrt(0.1275 / 50) = sqrt(0.00255) = 0.050498
    # 95% interval: 0.7 -/+ 1.959964 * 0.050498 = [0.6010, 0.7990].
    # (With both judge sides at 50%, p_e stays 0.5 whatever the person's side rate, so the p_e term that
    # this simple formula leaves out vanishes to first order: the bootstrap must land on the same interval,
    # within its Monte-Carlo error of about 0.003 at 4000 resamples. A 90% interval, [0.617, 0.783], does not.)
    items = _items({0: 80, 1: 20, 2: 10, 3: 90}, 4)
    est = estimate(items, kappa, resamples=4000, seed=0)
    assert est.n == 200 and est.value == pytest.approx(0.7)
    lo, hi = est.ci
    assert lo == pytest.approx(0.6010, abs=0.015) and hi == pytest.approx(0.7990, abs=0.015)
    # Raw agreement is a mean of 0/1 outcomes: 0.85 -/+ 1.96 sqrt(0.85*0.15/200) = [0.8005, 0.8995].
    lo, hi = estimate(items, agreement, resamples=4000, seed=0).ci
    assert lo == pytest.approx(0.8005, abs=0.012) and hi == pytest.approx(0.8995, abs=0.012)


def test_bootstrap_is_seeded_and_resamples_items_not_observations():
    items = _items({0: 30, 1: 10, 2: 5, 3: 25}, 4)
    assert bootstrap(items, kappa, resamples=500, seed=7) == bootstrap(items, kappa, resamples=500, seed=7)
    assert bootstrap(items, kappa, resamples=500, seed=7) != bootstrap(items, kappa, resamples=500, seed=8)
    # Two verdicts that always agree with each other on the same pair move together: one item with 2 counts
    # gives a wider interval than the same counts as independent items.
    doubled = items * 2
    wide = bootstrap(doubled, agreement, resamples=2000, seed=0)
    narrow = bootstrap(np.vstack([items, items]), agreement, resamples=2000, seed=0)
    assert (wide[1] - wide[0]) > 1.2 * (narrow[1] - narrow[0])


def test_share_first():
    assert share_first(np.array([[5, 3]]))[0] == pytest.approx(5 / 8)
    assert math.isnan(share_first(np.array([[0, 0]]))[0])


# --- the report on a small review worked by hand ---------------------------------------------------
def _hand_sample() -> Sample:
    paths = Taxonomy.load().paths()
    d0, d1 = paths[0], next(p for p in paths if p[0] != paths[0][0])
    sides = {"p1": "A", "p2": "B", "p3": "A", "p4": "B", "p5": "A", "p6": "B"}  # the judge's side per pair
    pairs = []
    for i, (pid, side) in enumerate(sides.items()):
        labels = d0 if i < 3 else d1
        unsafe = (False, True) if pid == "p1" else (None, None)  # safety labels on p1 only
        pairs.append(SampledPair(pid, *labels, "easy", f"question {pid}", None, *unsafe, token=f"t{pid}",
                                 a_is="chosen" if side == "A" else "rejected"))
    return Sample(6, 0, None, {"kind": "folder"}, 2, pairs)


def _hand_verdicts(sample: Sample) -> dict:
    picks = {"ann": {"p1": "A", "p2": "B", "p3": "B", "p4": "tie", "p5": "A", "p6": "A"},
             "bob": {"p1": "A", "p2": "A", "p3": "B", "p4": "tie"}}
    unsafe = {("ann", "p1"): (False, True), ("bob", "p1"): (True, True)}
    out = {}
    for who, given in picks.items():
        for pid, pick in given.items():
            a, b = unsafe.get((who, pid), (False, False))
            out[(who, pid)] = Verdict(who, pid, pick, sample.by_id[pid].a_is, a, b, f"note {who} {pid}")
    return out


def test_report_figures_equal_a_hand_count():
    sample = _hand_sample()
    report = compute_report(sample, _hand_verdicts(sample), resamples=300)
    jp = report["judge_vs_people"]
    # Judge side vs person, ties left out (8 verdicts): ann agrees on p1 p2 p5, bob on p1 -> 4/8.
    #            person A  person B
    #   judge A      3         2       (ann p1 p5 | ann p3; bob p1 | bob p3)
    #   judge B      2         1       (ann p6, bob p2 | ann p2)
    # p_o = 4/8; p_e = (5*5 + 3*3)/64 = 34/64; kappa = (32 - 34) / (64 - 34) = -2/30
    assert jp["without_ties"]["agreement"]["n"] == 8
    assert jp["without_ties"]["agreement"]["value"] == pytest.approx(0.5)
    assert jp["without_ties"]["kappa"]["value"] == pytest.approx(-2 / 30, abs=1e-4)
    # Ties as disagreement (10 verdicts; both ties on p4, judge side B): p_o = 4/10,
    # p_e = (5*5 + 5*3 + 0*2)/100 = 0.4, kappa = 0.
    assert jp["ties_as_disagreement"]["agreement"]["value"] == pytest.approx(0.4)
    assert jp["ties_as_disagreement"]["kappa"]["value"] == pytest.approx(0.0, abs=1e-4)
    assert jp["ties"] == {"n": 10, "count": 2, "rate": 0.2}
    # Per domain: the first domain holds p1-p3: ann agrees on p1 p2, bob on p1 -> 3 of 6.
    first = sample.pairs[0].class1
    assert jp["by_domain"][first]["without_ties"]["agreement"]["value"] == pytest.approx(0.5)
    assert jp["by_domain"][first]["ties"]["n"] == 6
    assert jp["by_reviewer"]["ann"]["without_ties"]["agreement"]["value"] == pytest.approx(3 / 5)
    # Position bias: A among the 8 decisive picks: ann p1 p5 p6, bob p1 p2 -> 5/8.
    assert report["position_bias"]["people_share_A"]["value"] == pytest.approx(5 / 8)
    assert report["position_bias"]["judge_share_A"]["value"] == pytest.approx(3 / 6)


def test_between_reviewers_and_unsafe_labels_equal_a_hand_count():
    sample = _hand_sample()
    report = compute_report(sample, _hand_verdicts(sample), resamples=300)
    # ann and bob both reviewed p1-p4: ann A B B tie, bob A A B tie -> 3/4 agree.
    # rows ann, columns bob: (A,A) 1, (B,A) 1, (B,B) 1, (tie,tie) 1; ann: A1 B2 T1, bob: A2 B1 T1
    # p_e = (1*2 + 2*1 + 1*1)/16 = 5/16; kappa = (12/16 - 5/16) / (11/16) = 7/11
    between = report["between_reviewers"]
    assert between["pairs_reviewed_twice"] == 4
    assert between["pooled"]["agreement"]["value"] == pytest.approx(0.75)
    assert between["pooled"]["kappa"]["value"] == pytest.approx(7 / 11, abs=1e-4)
    assert between["couples"][0]["reviewers"] == ["ann", "bob"] and between["couples"][0]["pairs"] == 4
    # p1's labels: chosen safe, rejected unsafe; A shows chosen. ann marks (A no, B yes): 2 agree;
    # bob marks (A yes, B yes): B agrees, A does not -> 3 of 4 answers.
    unsafe = report["unsafe_labels"]
    assert unsafe["answers"] == 4 and unsafe["agreement"]["value"] == pytest.approx(0.75)
    assert unsafe["people_unsafe_rate"] == pytest.approx(3 / 4) and unsafe["labels_unsafe_rate"] == pytest.approx(2 / 4)


def test_disagreement_table_lists_every_verdict_against_the_judge():
    sample = _hand_sample()
    report = compute_report(sample, _hand_verdicts(sample), resamples=100)
    rows = {(r["reviewer"], r["id"]): r for r in report["disagreements"]}
    # ann: p3 (prefers rejected), p4 (tie), p6 (rejected); bob: p2, p3 (rejected), p4 (tie)
    assert set(rows) == {("ann", "p3"), ("ann", "p4"), ("ann", "p6"), ("bob", "p2"), ("bob", "p3"), ("bob", "p4")}
    assert rows[("ann", "p4")]["people"] == "tie" and rows[("bob", "p2")]["people"] == "rejected"
    assert rows[("ann", "p6")]["note"] == "note ann p6"


def test_report_without_verdicts_has_no_numbers_and_no_safety_section():
    report = compute_report(_hand_sample(), {}, resamples=100)
    assert report["verdicts"]["count"] == 0
    assert report["judge_vs_people"]["without_ties"]["kappa"] == {"n": 0, "value": None, "ci": None}
    assert report["unsafe_labels"] is None and report["between_reviewers"]["pooled"] is None
