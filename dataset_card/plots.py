"""The card's plots, drawn with matplotlib's Agg backend into PNG bytes.

The bytes are deterministic for the same numbers (no timestamp or software tag in the PNG, fixed
size and fonts), so re-rendering an unchanged folder rewrites nothing.
"""

from __future__ import annotations

import io

ROWS_PLOT = "assets/rows_per_category.png"
UNSAFE_PLOT = "assets/unsafe_rate_per_category.png"
_SPLIT_COLOURS = {"train": "#4c72b0", "validation": "#55a868", "harm": "#c44e52", "help": "#8172b2"}
_UNSAFE_COLOURS = {"question": "#8c8c8c", "chosen": "#55a868", "rejected": "#c44e52"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "spa-vl", "font.size": 9})
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None}, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def rows_per_category(labels: list[str], counts: dict[str, list[int]]) -> bytes:
    """Horizontal stacked bars: one bar per category, one segment per split (``counts[split][i]``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(labels) + 1.2))
    y = list(range(len(labels)))
    left = [0] * len(labels)
    for split, values in counts.items():
        ax.barh(y, values, left=left, color=_SPLIT_COLOURS.get(split), label=split, height=0.7)
        left = [a + b for a, b in zip(left, values)]
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    ax.set_title("Rows per harm category")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def unsafe_rate_per_category(labels: list[str], rates: dict[str, list[float]]) -> bytes:
    """Grouped horizontal bars: unsafe rate (%) of questions, chosen and rejected answers per category."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(labels) + 1.2))
    width = 0.8 / max(1, len(rates))
    for i, (which, values) in enumerate(rates.items()):
        ax.barh([k + (i - (len(rates) - 1) / 2) * width for k in range(len(labels))], [100 * v for v in values],
                height=width, color=_UNSAFE_COLOURS.get(which), label=which)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("unsafe rate (%)")
    ax.set_xlim(0, 100)
    ax.set_title("Unsafe rate per harm category (train + validation)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)
