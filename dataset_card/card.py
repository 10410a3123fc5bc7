"""Render a dataset folder's README.md: YAML metadata, then the prose a user needs.

Deterministic: the same folder contents give the same bytes (no dates, sorted tables).
"""

from __future__ import annotations

from huggingface_hub import DatasetCardData

GATING_PROMPT = (
    "SPA-VL contains images and text about harmful topics (toxicity, fraud, weapons, privacy "
    "violations and more), collected to train models to refuse or answer them safely. Agree to use "
    "it for safety research and alignment only."
)


def render_card(card_data: DatasetCardData, summary, taxonomy, version: str, card: dict) -> str:
    """``card`` may set ``title``, ``synthetic`` (bool) and ``description`` (markdown)."""
    data = card_data.to_dict()
    data.update(
        {
            "license": "cc-by-4.0",
            "language": ["en"],
            "pretty_name": card.get("title", "SPA-VL"),
            "task_categories": ["visual-question-answering", "image-text-to-text"],
            "tags": ["safety", "preference", "dpo", "rlhf", "vision-language"] + (["synthetic"] if card.get("synthetic") else []),
            "size_categories": [_size_category(summary.total_rows)],
            "extra_gated_prompt": GATING_PROMPT,
        }
    )
    yaml_text = DatasetCardData(**data).to_yaml()
    title = card.get("title", "SPA-VL")
    lines = [f"---\n{yaml_text}\n---", "", f"# {title} (version {version})", ""]
    if card.get("synthetic"):
        lines += [
            "> **Synthetic data.** Every image here was drawn by PIL and every text filled from a template by",
            "> `spa-vl fixture`. It has the shape of SPA-VL, not its content: use it for tests and demos only.",
            "",
        ]
    lines += [
        card.get(
            "description",
            "Safety preference data for vision-language models in the layout of the SPA-VL paper "
            "(arXiv 2406.12030): (image, question, chosen, rejected) with the harm labels class1/class2/class3. "
            "It contains harmful content by design, so that models learn to decline it.",
        ),
        "",
        "## Configs",
        "",
        "| config | split | rows |",
        "|---|---|---:|",
    ]
    for config, splits in summary.config_rows.items():
        for split, rows in splits.items():
            lines.append(f"| `{config}` | {split} | {rows:,} |")
    if summary.question_types:
        lines += ["", "## Question types", "", "| type | train | validation |", "|---|---:|---:|"]
        for qt in ("easy", "hardq", "hards"):
            n = [summary.question_types.get((qt, s), 0) for s in ("train", "validation")]
            lines.append(f"| {qt} | {n[0]:,} | {n[1]:,} |")
    lines += [
        "",
        "## Rows per harm category",
        "",
        "| domain (class1) | category (class2) | train | validation | harm | help |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for d in taxonomy.domains:
        for c in d.categories:
            n = [summary.by_category.get((d.label, c.label, s), 0) for s in ("train", "validation", "harm", "help")]
            lines.append(f"| {d.label} | {c.label} | " + " | ".join(f"{x:,}" for x in n) + " |")
    unattributed = summary.by_category.get((None, None, "train"), 0)
    if unattributed:
        lines += ["", f"{unattributed:,} train rows carry no harm labels (could not be attributed); "
                      "they are in the `default` config only."]
    lines += [
        "",
        "## Load",
        "",
        "```python",
        "from datasets import load_dataset",
        'ds = load_dataset("path/to/this/folder", "malicious_use")   # one harm domain: train + validation',
        'test = load_dataset("path/to/this/folder", "test")          # harm + help evaluation questions',
        "```",
        "",
        "Licence: CC-BY-4.0 (the SPA-VL dataset's). Citation: Zhang et al., *SPA-VL: A Comprehensive Safety "
        "Preference Alignment Dataset for Vision Language Models*, CVPR 2025.",
        "",
    ]
    return "\n".join(lines)


def _size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return name
    return "n>1M"
