"""The report's files under ``<root>/review/``: JSON, a plot, the disagreement table and the card's section.

``human_validation.md`` is the "Human validation" section that ``spa-vl card`` puts into the dataset
card (the card reads the file; it never computes verdict statistics itself). Every file is a function
of the verdicts and the sample alone (no timestamps), so an unchanged review rewrites nothing::

    written = write_report_files(review_dir, report)     # paths whose bytes changed
"""

from __future__ import annotations

import json
from pathlib import Path

from dataset_card.card import write_if_changed

REPORT_FILE = "report.json"
PLOT_FILE = "agreement.png"
DISAGREEMENTS_FILE = "disagreements.md"
CARD_SECTION_FILE = "human_validation.md"  # read by dataset_card.card
REVIEW_LINK = "review"  # the review folder, relative to the card


def _pct(est: dict | None) -> str:
    return "n/a" if not est or est["value"] is None else f"{100 * est['value']:.1f}%"


def _num(est: dict | None) -> str:
    return "n/a" if not est or est["value"] is None else f"{est['value']:.2f}"


def _ci(est: dict | None, percent: bool) -> str:
    if not est or not est.get("ci"):
        return ""
    lo, hi = est["ci"]
    return f"{100 * lo:.1f}–{100 * hi:.1f}%" if percent else f"{lo:.2f}–{hi:.2f}"


def _row(label: str, est: dict | None, percent: bool) -> str:
    n = est["n"] if est else 0
    return f"| {label} | {n:,} | {_pct(est) if percent else _num(est)} | {_ci(est, percent)} |"


def summary_rows(report: dict) -> list[str]:
    """The headline table: judge vs people, ties, position bias, reviewers, unsafe labels."""
    jp = report["judge_vs_people"]
    rows = ["| measure | n | value | 95% CI |", "|---|---:|---:|---|",
            _row("agreement with the judge (ties left out)", jp["without_ties"]["agreement"], True),
            _row("Cohen's kappa (ties left out)", jp["without_ties"]["kappa"], False),
            _row("agreement, a tie counted as disagreement", jp["ties_as_disagreement"]["agreement"], True),
            _row("Cohen's kappa, a tie counted as disagreement", jp["ties_as_disagreement"]["kappa"], False),
            f"| ties | {jp['ties']['n']:,} | {_pct({'value': jp['ties']['rate']})} | |",
            _row("people's picks of answer A (50% = no position bias)", report["position_bias"]["people_share_A"], True)]
    between = report["between_reviewers"]
    if between["pooled"]:
        twice = between["pairs_reviewed_twice"]
        rows += [_row(f"reviewers agree with each other ({twice:,} pairs reviewed twice)", between["pooled"]["agreement"], True),
                 _row("Cohen's kappa between reviewers", between["pooled"]["kappa"], False)]
    unsafe = report["unsafe_labels"]
    if unsafe:
        rows += [_row("unsafe marks agree with the safety labels (answers)", unsafe["agreement"], True),
                 _row("Cohen's kappa, unsafe marks vs safety labels", unsafe["kappa"], False)]
    return rows


def report_summary(report: dict) -> str:
    """What ``spa-vl review --report`` prints: the headline table and a line of counts."""
    v = report["verdicts"]
    return "\n".join([*summary_rows(report), "",
                      f"{v['count']:,} verdicts by {len(v['reviewers'])} reviewer(s) on {v['pairs_reviewed']:,} pairs; "
                      f"{len(report['disagreements']):,} did not side with the judge (review/{DISAGREEMENTS_FILE})"])


def domain_rows(report: dict) -> list[str]:
    rows = ["| domain (class1) | verdicts | agreement (no ties) | kappa (no ties) | ties |", "|---|---:|---:|---:|---:|"]
    for domain, s in report["judge_vs_people"]["by_domain"].items():
        ci = _ci(s["without_ties"]["agreement"], True)
        rows.append(f"| {domain} | {s['ties']['n']:,} | {_pct(s['without_ties']['agreement'])}{f' ({ci})' if ci else ''} | "
                    f"{_num(s['without_ties']['kappa'])} | "
                    f"{_pct({'value': s['ties']['rate']})} |")
    return rows


def card_section(report: dict, *, plot: bool) -> str:
    v, s = report["verdicts"], report["sample"]
    scope = f" of config `{s['config']}`" if s["config"] else ""
    lines = [
        "## Human validation", "",
        f"People checked the judge with `spa-vl review`: {v['count']:,} verdicts by {len(v['reviewers'])} reviewer(s) on "
        f"{v['pairs_reviewed']:,} of {s['drawn']:,} sampled pairs{scope} (drawn with seed {s['seed']}, evenly over "
        f"{s['strata']} subcategories). Each pair was shown blind: the image, the question and the two answers in a random "
        "A/B order, without the judge's choice or the models' names; the reviewer picked the better answer by the paper's "
        "rule (harmless first, then helpful) or a tie, and could mark each answer unsafe.", "",
        *summary_rows(report), "",
        "Kappa compares the sides (A or B) that the judge and the person preferred, so it measures agreement beyond what "
        "their side frequencies give by chance; intervals are percentile bootstraps over pairs "
        f"({report['bootstrap']['resamples']:,} resamples, seed {report['bootstrap']['seed']}).", "",
        *domain_rows(report), "",
    ]
    if plot:
        lines += [f"![Agreement with the judge per category]({REVIEW_LINK}/{PLOT_FILE})", ""]
    lines.append(f"The {len(report['disagreements']):,} verdicts that preferred the rejected answer or saw a tie are listed in "
                 f"[{REVIEW_LINK}/{DISAGREEMENTS_FILE}]({REVIEW_LINK}/{DISAGREEMENTS_FILE}); every verdict is in "
                 f"`{REVIEW_LINK}/verdicts.jsonl` and every figure in `{REVIEW_LINK}/{REPORT_FILE}`.")
    return "\n".join(lines) + "\n"


def disagreement_table(report: dict) -> str:
    lines = ["# Verdicts that did not side with the judge", "",
             "From `spa-vl review --report`: `people` says what the reviewer preferred (the answer the judge rejected, "
             "or a tie); `unsafe` lists the answers the reviewer marked unsafe.", "",
             "| domain | category | subcategory | type | question | reviewer | people | unsafe | note | id |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["disagreements"]:
        cells = [r["class1"], r["class2"], r["class3"], r["question_type"], r["question"], r["reviewer"], r["people"],
                 ", ".join(r["unsafe_marked"]), r["note"], f"`{r['id']}`"]
        lines.append("| " + " | ".join(_cell_text(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _cell_text(value) -> str:
    return " ".join(str(value or "").split()).replace("|", "\\|")


def agreement_plot(report: dict) -> bytes | None:
    """Agreement (ties left out) per category with its interval, and the overall figure as a line."""
    from dataset_card.plots import png_bytes, pyplot  # the card's deterministic PNG settings

    cats = [(k, s["without_ties"]["agreement"]) for k, s in report["judge_vs_people"]["by_category"].items()
            if s["without_ties"]["agreement"]["value"] is not None]
    if not cats:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(cats) + 1.4))
    values = [100 * e["value"] for _, e in cats]
    lows = [v - 100 * e["ci"][0] if e["ci"] else 0 for v, (_, e) in zip(values, cats)]
    highs = [100 * e["ci"][1] - v if e["ci"] else 0 for v, (_, e) in zip(values, cats)]
    ax.barh(range(len(cats)), values, xerr=[lows, highs], color="#4c72b0", height=0.6, capsize=2)
    ax.set_yticks(range(len(cats)), [f"{k.split(' / ')[-1]} (n={e['n']})" for k, e in cats])
    overall = report["judge_vs_people"]["without_ties"]["agreement"]["value"]
    ax.axvline(100 * overall, color="#c44e52", linestyle="--", label=f"all: {100 * overall:.1f}%")
    ax.axvline(50, color="#8c8c8c", linestyle=":", label="chance (50%: the sides are random)")
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("people agree with the judge (%, ties left out; 95% bootstrap interval)")
    ax.set_title("Human validation: agreement with the judge per category")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.5 / (0.32 * len(cats) + 1.4) - 0.12), ncol=2, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return png_bytes(fig)


def write_report_files(review_dir: Path, report: dict) -> list[str]:
    """Write report.json, agreement.png, disagreements.md and human_validation.md; the names whose bytes changed."""
    plot = agreement_plot(report)
    outputs = {REPORT_FILE: (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
               DISAGREEMENTS_FILE: disagreement_table(report).encode("utf-8"),
               CARD_SECTION_FILE: card_section(report, plot=plot is not None).encode("utf-8")}
    if plot is not None:
        outputs[PLOT_FILE] = plot
    elif (review_dir / PLOT_FILE).exists():
        (review_dir / PLOT_FILE).unlink()  # our own output, stale: no category has a decisive verdict
    return [name for name, data in sorted(outputs.items()) if write_if_changed(review_dir / name, data)]
