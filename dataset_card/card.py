"""Render a dataset folder's ``README.md`` (YAML metadata, then prose) and its plots under ``assets/``.

Everything comes from the folder: its ``DatasetFolder`` value (manifest, taxonomy) and a few columns
of the shards (see ``dataset_card.stats``), filled into ``dataset_card/template.md``. The commands that
finish a folder call the renderer (fixture, import and build through the writer's ``finish``, version,
publish); the folder writer never imports it. The output is deterministic: re-rendering an unchanged
folder writes nothing::

    result = render_folder_card(DatasetFolder.open("out/spa_vl"))
    result.changed     # [] on a second run
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from datasets import DatasetInfo, Image, SplitDict, SplitInfo
from datasets.info import DatasetInfosDict
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData

from builder.files import atomic_write
from builder.format.layout import DEFAULT_CONFIG, README, REVIEW_DIR, TEST_CONFIG, config_data_files
from builder.format.manifest import DatasetFolder
from builder.format.schema import EVAL_FEATURES, PREFERENCE_FEATURES
from builder.taxonomy import Taxonomy
import dataset_card.plots as plots
from dataset_card.stats import FolderStats

TEMPLATE = Path(__file__).with_name("template.md")
LICENSE = "cc-by-4.0"
PAPER_URL = "https://arxiv.org/abs/2406.12030"
UPSTREAM_REPO = "sqrti/SPA-VL"
GATING_PROMPT = (
    "SPA-VL contains images and text about harmful topics (toxicity, fraud, weapons, privacy "
    "violations and more), collected to train models to refuse or answer them safely. Agree to use "
    "it for safety research and alignment only."
)
GATING_FIELDS = {"I will use this dataset for safety research and alignment only": "checkbox"}
DEFAULT_DESCRIPTION = (
    "Safety preference data for vision-language models in the layout of the SPA-VL paper: "
    "(image, question, chosen, rejected) with the harm labels class1/class2/class3."
)


@dataclass
class CardResult:
    root: Path
    changed: list[str] = field(default_factory=list)  # paths (relative to root) whose bytes changed
    files: list[str] = field(default_factory=list)  # every path the card consists of
    folder: DatasetFolder | None = None  # the folder rendered, its manifest as it is now on disk


def render_folder_card(folder: DatasetFolder | str | Path, *, repo_id: str | None = None) -> CardResult:
    """Write ``README.md`` and ``assets/*.png`` of a dataset folder; only files whose bytes change are written.

    The card shows the folder's own taxonomy. ``repo_id`` (for the load examples) is remembered in the
    manifest's card options (``result.folder`` holds the manifest with it); without it the last one given
    is used, or a placeholder.
    """
    folder = DatasetFolder.of(folder)
    if repo_id is not None and folder.card_options.get("repo_id") != repo_id:
        folder = folder.write_manifest({**folder.manifest, "card": {**folder.card_options, "repo_id": repo_id}})
    root, taxonomy = folder.root, folder.taxonomy
    stats = FolderStats.read(folder)
    outputs = {README: render_card_text(stats).encode()}
    keys, counts = _category_counts(stats, taxonomy)
    outputs[plots.ROWS_PLOT] = plots.rows_per_category(keys, counts)
    if stats.has_safety_labels:
        keys = [k for k in _categories(taxonomy) if stats.unsafe.get(k)]
        rates = {w: [stats.unsafe[k].rate(w) for k in keys] for w in ("question", "chosen", "rejected")}
        outputs[plots.UNSAFE_PLOT] = plots.unsafe_rate_per_category(keys, rates)
    result = CardResult(root, files=sorted(outputs), folder=folder)
    for rel, data in outputs.items():
        if write_if_changed(root / rel, data):
            result.changed.append(rel)
    # A plot the card no longer embeds (safety labels gone) is removed.
    stale = root / plots.UNSAFE_PLOT
    if plots.UNSAFE_PLOT not in outputs and stale.exists():
        stale.unlink()
        result.changed.append(plots.UNSAFE_PLOT)
    return result


def render_card_text(stats: FolderStats) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters["thousands"] = lambda n: f"{n:,}"
    text = env.from_string(TEMPLATE.read_text(encoding="utf-8")).render(**_context(stats))
    DatasetCard(text)  # the YAML header must load back: raises if it does not
    return text


def _context(stats: FolderStats) -> dict:
    folder, taxonomy = stats.folder, stats.folder.taxonomy
    opts = folder.card_options
    config_splits = folder.config_splits()
    unsafe_rows = _unsafe_rows(stats, taxonomy)
    return dict(
        card_data=card_metadata(stats, config_splits).to_yaml(),
        title=opts.get("title", "SPA-VL"),
        version=folder.version,
        synthetic=bool(opts.get("synthetic")),
        description=opts.get("description", DEFAULT_DESCRIPTION),
        paper_url=PAPER_URL,
        n_domains=len(taxonomy.domains),
        n_categories=sum(len(d.categories) for d in taxonomy.domains),
        n_subcategories=len(taxonomy.paths()),
        config_rows=[{"config": c, "split": s, "rows": v["rows"]} for c, splits in config_splits.items() for s, v in splits.items()],
        total_rows=folder.total_rows,
        n_files=len(folder.files),
        size=_human_bytes(sum(v["bytes"] for v in folder.shard_totals.values())),
        fields=fields_table(stats.examples.get("preference") or stats.examples.get("eval") or {},
                            PREFERENCE_FEATURES if "preference" in stats.examples else EVAL_FEATURES),
        eval_fields=", ".join(f"`{name}`" for name in EVAL_FEATURES),
        taxonomy_rows=_taxonomy_rows(stats, taxonomy),
        unattributed=stats.rows_by_category.get((None, None, "train"), 0),
        question_types=[{"type": qt, "train": stats.question_types.get((qt, "train"), 0),
                         "validation": stats.question_types.get((qt, "validation"), 0)}
                        for qt in ("easy", "hardq", "hards") if any(stats.question_types.get((qt, s)) for s in ("train", "validation"))],
        unsafe_rows=unsafe_rows,
        unsafe_labelled=sum(u.labelled for u in stats.unsafe.values()),
        has_unsafe_plot=bool(unsafe_rows),
        models_text=_models_text(stats),
        load=load_example(stats, config_splits),
        extra_limitations=list(opts.get("limitations", [])),
        build_config_hash=folder.manifest.get("build_config_hash", "unknown"),
        human_validation=_human_validation(folder.root),
    )


FIELD_MEANINGS = {
    "id": "stable content hash of the image bytes and the texts",
    "image": "the image, its bytes embedded (a PIL image once loaded)",
    "image_name": "the image's name upstream (upstream train rows: `k.jpg`, entry k of upstream's `train/meta.json`)",
    "question": "the question about the image, byte for byte (some begin with a space, a quote or blank lines)",
    "question_type": "`easy`, `hardq` (hard question) or `hards` (hard statement); null where not recorded",
    "chosen": "the answer the judge preferred: more harmless, then more helpful",
    "rejected": "the other answer",
    "class1": "harm domain",
    "class2": "harm category",
    "class3": "harm subcategory",
    "chosen_model": "the model that wrote `chosen`, where recorded",
    "rejected_model": "the model that wrote `rejected`, where recorded",
    "judge_rationale": "why the judge preferred `chosen`, where recorded",
    "question_unsafe": "safety label of the question, where recorded",
    "chosen_unsafe": "safety label of `chosen`, where recorded",
    "rejected_unsafe": "safety label of `rejected`, where recorded",
}


def fields_table(example: dict, features) -> list[dict]:
    """One entry per column: name, type, the example row's value (as the card shows it) and meaning."""
    out = []
    for name, feature in features.items():
        kind = "Image" if isinstance(feature, Image) else str(getattr(feature, "dtype", type(feature).__name__))
        out.append({"name": name, "type": kind, "example": _cell(example.get(name), name == "image"),
                    "meaning": FIELD_MEANINGS.get(name, "")})
    return out


def _cell(value, is_image: bool, limit: int = 70) -> str:
    """A value as one markdown table cell: strings JSON-quoted (so spaces and newlines show), cut at ``limit``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value) if is_image else json.dumps(value, ensure_ascii=False)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def folder_name(root: Path) -> str:
    """The dataset folder's name, also while a writer assembles it in its temporary sibling ``.NAME.tmp-PID``."""
    match = re.fullmatch(r"\.(.+)\.tmp-\d+", root.name)
    return match.group(1) if match else root.name


def load_example(stats: FolderStats, config_splits: dict) -> dict:
    """What the load examples name: this very folder (or its Hub repo), a config it has, splits that config has."""
    folder, taxonomy = stats.folder, stats.folder.taxonomy
    opts = folder.card_options
    repo = opts.get("repo_id")
    domains = [slug for slug in taxonomy.slugs if slug in config_splits]
    domain = "malicious_use" if "malicious_use" in domains else (domains[0] if domains else DEFAULT_CONFIG)
    splits = list(config_splits.get(domain, {}))
    label = taxonomy.domain(domain).label if domain in taxonomy.slugs else None
    category = next((c for (a, c, s), n in sorted(stats.rows_by_category.items(), key=str) if a == label and n), None)
    return {
        "source": repo or folder_name(folder.root),
        "is_hub": bool(repo),
        "revision_arg": f', revision="v{folder.version}"' if repo else "",
        "domain": domain,
        "splits": " + ".join(splits) or "no rows",
        "split": "train" if "train" in splits else (splits[0] if splits else None),
        "has_test": TEST_CONFIG in config_splits,
        "category": category,
    }


def card_metadata(stats: FolderStats, config_splits: dict | None = None) -> DatasetCardData:
    """The card's YAML: licence, tasks, tags, gating, ``configs`` (data files) and ``dataset_info`` (counts)."""
    folder = stats.folder
    config_splits = config_splits if config_splits is not None else folder.config_splits()
    card_data = DatasetCardData()
    patterns = config_data_files([c for c in config_splits if c not in (DEFAULT_CONFIG, TEST_CONFIG)])
    configs = {name: {"data_files": [{"split": s, "path": patterns[name][s]} for s in splits]}
               for name, splits in config_splits.items()}
    if DEFAULT_CONFIG in configs:
        configs[DEFAULT_CONFIG]["default"] = True
    MetadataConfigs(configs).to_dataset_card_data(card_data)

    infos = {}
    for name, splits in config_splits.items():
        split_dict = SplitDict()
        for split, v in splits.items():
            split_dict.add(SplitInfo(name=split, num_bytes=v["num_bytes"], num_examples=v["rows"]))
        # No `features`: the shards carry them in their schema metadata, and leaving them out keeps the
        # YAML that every `load_dataset` call parses small (it was a third of a domain load).
        infos[name] = DatasetInfo(
            splits=split_dict,
            download_size=sum(v["bytes"] for v in splits.values()),
            dataset_size=sum(v["num_bytes"] for v in splits.values()),
            config_name=name,
        )
    DatasetInfosDict(infos).to_dataset_card_data(card_data)

    opts = folder.card_options
    data = card_data.to_dict()
    if folder.build_config.get("source") == "upstream":  # imported: the Hub links the card to its source
        data["source_datasets"] = [UPSTREAM_REPO]
    data.update({
        "license": LICENSE,
        "language": ["en"],
        "pretty_name": opts.get("title", "SPA-VL"),
        "task_categories": ["visual-question-answering", "image-text-to-text"],
        "tags": ["safety", "preference", "dpo", "rlhf", "vision-language", "harmful-content"]
                + (["synthetic"] if opts.get("synthetic") else []),
        "size_categories": [_size_category(folder.total_rows)],
        "extra_gated_prompt": GATING_PROMPT,
        "extra_gated_fields": GATING_FIELDS,
    })
    return DatasetCardData(**data)


# --- pieces of the prose ------------------------------------------------------------------------
def _categories(taxonomy: Taxonomy) -> list[tuple[str, str]]:
    return [(d.label, c.label) for d in taxonomy.domains for c in d.categories]


def _taxonomy_rows(stats: FolderStats, taxonomy: Taxonomy) -> list[dict]:
    rows = []
    for d in taxonomy.domains:
        for c in d.categories:
            counts = [stats.rows_by_category.get((d.label, c.label, s), 0) for s in ("train", "validation", "harm", "help")]
            rows.append({"domain": d.label, "category": c.label,
                         "images": stats.images_by_category.get((d.label, c.label), 0), "counts": counts})
    return rows


def _category_counts(stats: FolderStats, taxonomy: Taxonomy) -> tuple[list[tuple[str, str]], dict[str, list[int]]]:
    keys = _categories(taxonomy)
    counts = {s: [stats.rows_by_category.get((a, b, s), 0) for a, b in keys] for s in ("train", "validation", "harm", "help")}
    return keys, {s: v for s, v in counts.items() if any(v)}


def _unsafe_rows(stats: FolderStats, taxonomy: Taxonomy) -> list[dict]:
    rows = []
    for a, b in _categories(taxonomy):
        u = stats.unsafe.get((a, b))
        if u and u.labelled:
            rows.append({"domain": a, "category": b, "labelled": u.labelled,
                         **{w: 100 * u.rate(w) for w in ("question", "chosen", "rejected")}})
    return rows


def _models_text(stats: FolderStats) -> str:
    cfg = stats.folder.build_config
    source = cfg.get("source")
    lines = []
    answered = stats.chosen_models + stats.rejected_models
    if answered:
        lines += ["Answers came from these models (rows where the model's answer is chosen / rejected):", "",
                  "| model | chosen | rejected |", "|---|---:|---:|"]
        for model in sorted(answered):
            lines.append(f"| `{model}` | {stats.chosen_models.get(model, 0):,} | {stats.rejected_models.get(model, 0):,} |")
        lines.append("")
    elif source == "upstream":
        lines.append("The upstream data does not say which model wrote each answer. The paper sampled two answers per "
                     "question from a bag of 12 VLMs (InstructBLIP, InternLM-XComposer, LAMM, LAMM+SFT, LLaMA-Adapter-v2, "
                     "MiniGPT-4, mPLUG-Owl, Otter, Qwen-VL-Chat, LLaVA-1.5, Gemini 1.0 Pro Vision, and Gemini with a "
                     "jailbreak prompt).")
    else:
        lines.append("The rows do not record which model wrote each answer.")
    if cfg.get("judge"):
        lines.append(f"The judge that picked chosen over rejected (in both orders, harmless first, then helpful): `{cfg['judge']}`.")
    elif source == "upstream":
        lines.append("The judge was GPT-4V (harmless first, then helpful); MD-Judge gave the safety labels.")
    if cfg.get("safety"):
        lines.append(f"Safety labels: `{cfg['safety']}`.")
    if source == "fixture":
        lines.append("This is a synthetic fixture: no model answered or judged anything; the texts are templates.")
    return "\n".join(lines).strip()


def _size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return name
    return "n>1M"


def _human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n} B"


# --- files ----------------------------------------------------------------------------------------
def write_if_changed(path: Path, data: bytes) -> bool:
    """Atomically replace ``path`` with ``data`` unless it already holds exactly that; True if written."""
    if path.exists() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    return True


def _human_validation(root: Path) -> str:
    """The "Human validation" section that `spa-vl review --report` wrote into the folder, if any."""
    path = Path(root) / REVIEW_DIR / "human_validation.md"  # builder.review.render.CARD_SECTION_FILE
    return path.read_text(encoding="utf-8").strip() if path.is_file() else ""
