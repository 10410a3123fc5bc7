"""What `spa-vl evaluate` shows and writes: the results table, metrics.md, the per-category plot, one line.

    print(results_table(metrics)); print(summary_line(metrics))
    write_outputs(out, metrics, judgments, category_domain)   # metrics.json, metrics.md, .png, judgments.jsonl
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from builder.files import atomic_write


def _order(labels, rank: dict[str, int]) -> list[str]:
    return sorted(labels, key=lambda x: (rank.get(x, len(rank)), x))


def _taxonomy_ranks() -> tuple[dict[str, int], dict[str, int]]:
    from builder.taxonomy import Taxonomy

    c1, c2 = {}, {}
    for a, b, _ in Taxonomy.load().paths():
        c1.setdefault(a, len(c1))
        c2.setdefault(b, len(c2))
    return c1, c2


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _ci(ci, fmt=_pct) -> str:
    return "" if ci is None else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def _scale(h: dict) -> str:
    return f"{h['scale'][0]}-{h['scale'][1]}" if h.get("scale") else "none"


def _overall_rows(m: dict) -> list[tuple[str, ...]]:
    """(benchmark, metric, value, 95% CI, n, failed) for the headline figures."""
    h, p = m["harm"], m["help"]
    rows = [("HarmEval", "USR", _pct(h["usr"]), _ci(h["usr_ci"]), str(h["n"]), str(h["failed"]))]
    if h.get("scale"):
        rows.append(("HarmEval", f"harm score ({_scale(h)})", _num(h["harm_score"]), _ci(h["harm_score_ci"], _num),
                     str(h["n_scored"]), ""))
    rows.append(("HelpEval", "win rate", _pct(p["win_rate"]), _ci(p["win_rate_ci"]), str(p["n"]), str(p["failed"])))
    return rows


def results_table(m: dict) -> str:
    """The headline figures as an aligned plain-text table (printed at the end of `spa-vl evaluate`)."""
    head = ("benchmark", "metric", "value", "95% CI", "n", "failed")
    rows = [head, *_overall_rows(m)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _judge_line(m: dict) -> str:
    def one(d):
        where = f" at {d['endpoint']}" if d.get("endpoint") else ""
        return f"`{d['name']}` ({d['model']}, {d['backend']}{where})"

    j = m["judge"]
    return (f"- harm judge: {one(j['harm_judge'])}, format `{j['harm_format']}`; help judge: {one(j['help_judge'])}")


def metrics_markdown(m: dict, category_domain: dict[str, str]) -> str:
    h, p, c = m["harm"], m["help"], m["cost"]
    r1, r2 = _taxonomy_ranks()
    lines = [
        f"# Evaluation of `{m['model']}`", "",
        f"- dataset: `{m['dataset']}` (config `test`: harm {m['rows']['harm']} rows, help {m['rows']['help']} rows; "
        f"revision {m['dataset_revision']['value'] or 'unknown'})",
        f"- HelpEval reference: `{m['reference']}`", _judge_line(m),
        (f"- judge calls: {c['requests']} sent, {c['cached']} from the cache, {c['failed']} failed; "
         f"{c['prompt_tokens'] + c['completion_tokens']:,} tokens, ${c['cost_usd']:.4f}"),
        f"- spa-vl {m['versions']['spa_vl']}, seed {m['seed']}, {m['started_at']}", "",
        (f"USR: share of answers judged unsafe (lower is better), 95% Wilson interval. Harm score: mean on the "
         f"judge's {_scale(h)} scale (lower is better), 95% bootstrap interval. Win rate: mean over questions of "
         "the model's score against the reference, judged in both answer orders (1 win, 0.5 tie, 0 loss; 50% = as "
         "good as the reference), 95% bootstrap interval over questions."), "",
        "## Overall", "",
        "| benchmark | metric | value | 95% CI | n | failed |", "|---|---|---|---|---|---|",
        *(f"| {' | '.join(r)} |" for r in _overall_rows(m)),
        f"| HelpEval | verdicts won / tied / lost | {p['wins']} / {p['ties']} / {p['losses']} | | {2 * p['n']} | |",
        f"| HelpEval | questions whose two orders disagree | {p['inconsistent']} | | {p['n']} | |", "",
        "## Per domain", "",
        "| domain | USR | 95% CI | harm score | n (harm) | win rate | 95% CI | n (help) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    empty_h = {"usr": None, "usr_ci": None, "harm_score": None, "n": 0}
    empty_p = {"win_rate": None, "win_rate_ci": None, "n": 0}
    for d in _order(set(h["by_domain"]) | set(p["by_domain"]), r1):
        a, b = h["by_domain"].get(d, empty_h), p["by_domain"].get(d, empty_p)
        lines.append(f"| {d} | {_pct(a['usr'])} | {_ci(a['usr_ci'])} | {_num(a['harm_score'])} | {a['n']} | "
                     f"{_pct(b['win_rate'])} | {_ci(b['win_rate_ci'])} | {b['n']} |")
    lines += ["", "## Per category", "",
              "| domain | category | USR | harm score | n (harm) | win rate | n (help) |",
              "|---|---|---|---|---|---|---|"]
    for k in _order(set(h["by_category"]) | set(p["by_category"]), r2):
        a, b = h["by_category"].get(k, empty_h), p["by_category"].get(k, empty_p)
        lines.append(f"| {category_domain.get(k, '')} | {k} | {_pct(a['usr'])} | {_num(a['harm_score'])} | {a['n']} | "
                     f"{_pct(b['win_rate'])} | {b['n']} |")
    return "\n".join(lines) + "\n"


def metrics_plot(m: dict) -> bytes:
    """Grouped horizontal bars: USR and win rate (%) per category (no bar where a rate is undefined)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _, r2 = _taxonomy_ranks()
    h, p = m["harm"]["by_category"], m["help"]["by_category"]
    labels = _order(set(h) | set(p), r2)

    def rate(table, key, label):
        v = table.get(label, {}).get(key)
        return float("nan") if v is None else 100 * v

    fig = Figure(figsize=(8, 0.5 * max(1, len(labels)) + 1.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series = (("HarmEval USR", "usr", h, "#c44e52"), ("HelpEval win rate", "win_rate", p, "#4c72b0"))
    for i, (name, key, table, colour) in enumerate(series):
        ys, values = [k + (i - 0.5) * 0.4 for k in range(len(labels))], [rate(table, key, lb) for lb in labels]
        ax.barh(ys, values, height=0.4, color=colour, label=name)
        for y, v in zip(ys, values):  # the value at the bar's end, so a 0% bar still reads
            ax.text(0 if math.isnan(v) else v, y, " n/a" if math.isnan(v) else f" {v:.0f}%", va="center", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 108)
    ax.axvline(50, color="#8c8c8c", linewidth=0.8, linestyle="--")
    ax.set_xlabel("%")
    ax.set_title(f"{Path(str(m['model'])).name}: USR (lower is better) and win rate vs reference", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None}, bbox_inches="tight")
    return buf.getvalue()


def summary_line(m: dict) -> str:
    """One line for the terminal: USR, harm score, win rate, failures, what the judge cost, the time."""
    h, p, c = m["harm"], m["help"], m["cost"]
    failed = f", {h['failed']} failed" if h["failed"] else ""
    score = f", harm score {_num(h['harm_score'])} ({_scale(h)})" if h.get("scale") else ""
    harm = f"HarmEval: USR {_pct(h['usr'])} {_ci(h['usr_ci'])}{score} (n={h['n']}{failed})"
    failed = f", {p['failed']} failed" if p["failed"] else ""
    ref = Path(str(m["reference"])).name
    helpful = (f"HelpEval: win rate {_pct(p['win_rate'])} {_ci(p['win_rate_ci'])} vs {ref} "
               f"(verdicts W/T/L {p['wins']}/{p['ties']}/{p['losses']}, n={p['n']}{failed})")
    cost = f"judge: {c['requests']} calls, {c['cached']} cached, ${c['cost_usd']:.4f}"
    return f"{harm} | {helpful} | {cost} | {m['elapsed_s']:.0f}s | {m['out']}/metrics.md"


def write_outputs(out: Path, m: dict, judgments: list[dict], category_domain: dict[str, str]) -> None:
    """judgments.jsonl, metrics.md, metrics_by_category.png and metrics.json (last), each swapped into place."""
    atomic_write(out / "judgments.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in judgments))
    atomic_write(out / "metrics.md", metrics_markdown(m, category_domain))
    atomic_write(out / "metrics_by_category.png", metrics_plot(m))
    atomic_write(out / "metrics.json", json.dumps(m, indent=2, ensure_ascii=False) + "\n")
