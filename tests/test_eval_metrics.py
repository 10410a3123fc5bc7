"""Evaluation figures: confidence intervals, the printed results table, endpoints written without keys."""

from __future__ import annotations

import json
import math

import pytest
from eval_doubles import ScriptedJudge, fresh_out, judge_yaml
from openai_server import OpenAIServer

from builder.cli import main
from training.judge_config import public_endpoint
from training.metrics import bootstrap_interval, harm_summary, help_summary, wilson_interval

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile

pytest_plugins = ["eval_fixtures"]  # module fixtures: work, ds, tiny, rows, ref_file, answers_file


def _wilson(k: int, n: int) -> tuple[float, float]:
    """The Wilson score interval, written out from its formula."""
    p = k / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 / (1 + Z95**2 / n) * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(3, 6), (0, 265), (117, 265), (265, 265), (1, 1)])
def test_usr_interval_is_wilsons(k, n):
    assert wilson_interval(k, n) == pytest.approx(_wilson(k, n), abs=1e-12)
    low, high = wilson_interval(k, n)
    assert 0 <= low <= k / n <= high <= 1


def test_wilson_is_not_degenerate_at_zero_where_aligned_models_land():
    low, high = wilson_interval(0, 265)  # the paper's USR after DPO: 0 of 265
    assert low == pytest.approx(0, abs=1e-12) and 0.01 < high < 0.02  # "at most ~1.4%", not [0, 0]
    assert wilson_interval(0, 0) is None


def test_win_rate_interval_is_a_seeded_bootstrap_over_questions():
    scores = [1.0, 0.5, 0.0, 0.75, 0.25, 1.0, 0.5, 0.5] * 10
    ci = bootstrap_interval(scores, seed=0)
    assert ci == bootstrap_interval(scores, seed=0)  # the same seed, the same interval
    spread = [(i * 37 % 101) / 100 for i in range(60)]  # (scores on a grid of quarters often tie across seeds)
    assert bootstrap_interval(spread, seed=0) != bootstrap_interval(spread, seed=1)
    mean = sum(scores) / len(scores)
    assert ci[0] < mean < ci[1] and 0 <= ci[0] and ci[1] <= 1
    # close to the normal approximation of the mean at n = 80
    sd = math.sqrt(sum((x - mean) ** 2 for x in scores) / (len(scores) - 1) / len(scores))
    assert ci[0] == pytest.approx(mean - Z95 * sd, abs=0.02) and ci[1] == pytest.approx(mean + Z95 * sd, abs=0.02)
    assert bootstrap_interval([0.5, 0.5, 0.5], seed=0) == [0.5, 0.5]
    assert bootstrap_interval([], seed=0) is None and bootstrap_interval([0.75], seed=0) is None


def test_summaries_carry_their_intervals_and_failures():
    harm = [{"unsafe": u, "harm_score": s} for u, s in ((True, 8), (False, 1), (False, 2))]
    harm += [{"failed": "unparseable: x", "failure": "unparseable"}]
    h = harm_summary(harm, (1, 10), seed=0)
    assert (h["usr"], h["n"], h["failed"], h["failures"]) == (pytest.approx(1 / 3), 3, 1, {"unparseable": 1})
    assert h["usr_ci"] == pytest.approx(_wilson(1, 3))
    assert h["harm_score"] == pytest.approx(11 / 3) and h["harm_score_ci"] == bootstrap_interval([8, 1, 2], seed=0)
    p = help_summary([{"score": 1.0}, {"score": 0.25}, {"failed": "x", "failure": "reference_failed"}], seed=0)
    assert (p["win_rate"], p["n"], p["failed"]) == (0.625, 2, 1)
    assert p["win_rate_ci"] == bootstrap_interval([1.0, 0.25], 0)


def test_endpoints_are_written_without_credentials():
    url = "https://user:sk-secret@example.com:8443/v1?api-key=sk-other#x"
    assert public_endpoint(url) == "https://example.com:8443/v1"
    assert public_endpoint("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


def test_evaluate_prints_the_results_table_and_writes_the_record(tmp_path, capsys, ds, tiny, rows, ref_file,
                                                                 answers_file):
    out = fresh_out(tmp_path, answers_file)
    with OpenAIServer(ScriptedJudge(rows)) as srv:
        main(["evaluate", str(tiny), str(ds), "--judge", judge_yaml(tmp_path / "j.yaml", srv.url), "--out", str(out),
              "--reference", str(ref_file), "--seed", "7", "--progress", "False"])
    printed = capsys.readouterr().out.splitlines()
    m = json.loads((out / "metrics.json").read_text())
    assert printed[0].split() == ["benchmark", "metric", "value", "95%", "CI", "n", "failed"]
    low, high = (f"{100 * x:.1f}%" for x in m["harm"]["usr_ci"])
    assert printed[2].split() == ["HarmEval", "USR", "50.0%", f"[{low},", f"{high}]", "6", "0"]
    assert printed[3].split()[:4] == ["HarmEval", "harm", "score", "(1-10)"] and printed[3].split()[4] == "5.00"
    low, high = (f"{100 * x:.1f}%" for x in m["help"]["win_rate_ci"])
    assert printed[4].split() == ["HelpEval", "win", "rate", "54.2%", f"[{low},", f"{high}]", "6", "0"]
    assert len(printed) == 6 and printed[5].startswith("HarmEval: USR 50.0%") and "metrics.md" in printed[5]
    assert m["seed"] == 7 and m["help"]["win_rate_ci"] == bootstrap_interval([0.5, 1.0, 0.0, 0.5, 0.75, 0.5], seed=7)
    md = (out / "metrics.md").read_text()
    assert f"| HarmEval | USR | 50.0% | [{100 * m['harm']['usr_ci'][0]:.1f}%" in md and "Wilson" in md
