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


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "spa-vl", "font.size": 9})
    return plt


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None}, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def _grouped(keys: list[tuple[str, str]]) -> tuple[list[float], list[float], list[str], list[bool]]:
    """Bar positions for (domain, category) keys grouped by domain under a header row, top to bottom;
    and the y ticks: positions, labels, and which ones are domain headers."""
    bars, ticks, labels, header = [], [], [], []
    y, last = 0.0, None
    for domain, category in keys:
        if domain != last:
            y += 0.4 if last is not None else 0.0  # a gap before every domain but the first
            ticks.append(y)
            labels.append(str(domain))
            header.append(True)
            y, last = y + 1, domain
        bars.append(y)
        ticks.append(y)
        labels.append(f"  {category}")
        header.append(False)
        y += 1
    return bars, ticks, labels, header


def _axes_for(keys: list[tuple[str, str]], row_height: float):
    plt = pyplot()
    bars, ticks, labels, header = _grouped(keys)
    fig, ax = plt.subplots(figsize=(8, row_height * len(ticks) + 1.2))
    ax.set_yticks(ticks, labels)
    for tick, bold in zip(ax.get_yticklabels(), header):
        if bold:
            tick.set_fontweight("bold")
    ax.set_ylim(max(ticks) + 0.7, -0.7)  # top to bottom, as the card's table
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax, bars


def rows_per_category(keys: list[tuple[str, str]], counts: dict[str, list[int]]) -> bytes:
    """Horizontal stacked bars, one per (domain, category) key grouped by domain; one segment per split
    (``counts[split][i]`` for ``keys[i]``)."""
    fig, ax, y = _axes_for(keys, 0.3)
    left = [0] * len(keys)
    for split, values in counts.items():
        ax.barh(y, values, left=left, color=_SPLIT_COLOURS.get(split), label=split, height=0.7)
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlabel("rows")
    ax.set_title("Rows per harm category, by domain")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=4, frameon=False)
    return png_bytes(fig)


def unsafe_rate_per_category(keys: list[tuple[str, str]], rates: dict[str, list[float]]) -> bytes:
    """Grouped horizontal bars: unsafe rate (%) of questions, chosen and rejected answers per category, by domain."""
    fig, ax, y = _axes_for(keys, 0.45)
    width = 0.8 / max(1, len(rates))
    for i, (which, values) in enumerate(rates.items()):
        ax.barh([k + (i - (len(rates) - 1) / 2) * width for k in y], [100 * v for v in values],
                height=width, color=_UNSAFE_COLOURS.get(which), label=which)
    ax.set_xlabel("unsafe rate (%)")
    ax.set_xlim(0, 100)
    ax.set_title("Unsafe rate per harm category, by domain (train + validation)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=4, frameon=False)
    return png_bytes(fig)
