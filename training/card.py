"""The model card (README.md) of a trained model: its base model, the SPA-VL data it saw, how it was trained.

    write_model_card("runs/dpo", cfg, result)      # cfg: the run's settings; result: its TrainResult

The YAML header is the Hub's (``base_model``, ``datasets``, ``library_name``, ``tags``), rendered by
``huggingface_hub.ModelCardData``; a local folder is named in the text but kept out of the header, whose
fields the Hub reads as repo ids.
"""

from __future__ import annotations

import os
from pathlib import Path

from builder.vlm.loading import adapter_base

KIND_NAMES = {"dpo": "DPO", "rm": "a reward model", "ppo": "PPO"}
PAPER = "SPA-VL: A Comprehensive Safety Preference Alignment Dataset for Vision Language Model"


def _hub_id(name: str | None) -> str | None:
    """``name`` when it reads as a Hub repo id (not a local folder), else None."""
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    return name


def model_card(cfg, result, *, base_model: str | None = None, pairs: int | None = None) -> str:
    """The card's text. ``base_model``: the model under ``cfg.model`` (default: the base a LoRA adapter folder
    names)."""
    from huggingface_hub import ModelCard, ModelCardData

    model = str(cfg.model)
    base_model = base_model or adapter_base(model)
    base = base_model or model
    data = ModelCardData(
        base_model=_hub_id(base), datasets=[d for d in [_hub_id(str(cfg.dataset))] if d],
        library_name="peft" if cfg.lora else "transformers", pipeline_tag="image-text-to-text",
        tags=["spa-vl", cfg.kind, "safety", "vision-language", *(["lora"] if cfg.lora else [])])
    start = f"**{model}**" + (f" (a LoRA adapter on **{base_model}**)" if base_model and base_model != model else "")
    mode = (f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha} on every linear layer of the language model"
            if cfg.lora else "the whole language model")
    revision = f", revision `{cfg.revision}`" if cfg.revision else ""
    subset = f", {cfg.max_samples:,} rows drawn evenly over class3" if cfg.max_samples else ""
    metrics = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.metrics.items())
    lines = [
        f"# {Path(str(cfg.output_dir)).name}",
        "",
        f"{KIND_NAMES.get(cfg.kind, cfg.kind)} training of {start} on the SPA-VL safety preference dataset "
        f"**{cfg.dataset}** (config `{cfg.config_name}`, split `{cfg.split}`{revision}{subset}), "
        f"with `spa-vl train {cfg.kind}`.",
        "",
        f"- base model: `{base}`",
        f"- dataset: `{cfg.dataset}`",
        f"- trained: {mode}; vision tower {'frozen' if cfg.freeze_vision_tower else 'trained'}, projector "
        f"{'trained' if cfg.train_projector else 'frozen'}",
        f"- learning rate {cfg.learning_rate:g}, {result.steps:,} steps, {result.samples:,} samples"
        + (f" of {pairs:,} pairs" if pairs is not None else "")
        + (f" ({result.dropped:,} over {cfg.max_length:,} tokens dropped)" if result.dropped else ""),
    ]
    if cfg.kind == "ppo":
        lines.append(f"- reward model: `{cfg.reward_model}`; KL coefficient {cfg.kl_coef:g}")
    if metrics:
        lines.append(f"- final figures: {metrics}")
    lines += ["", f"The method follows the paper *{PAPER}*. `spa_vl_train.json` next to this card holds every "
              "setting of the run.", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def write_model_card(folder, cfg, result, **kwargs) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(model_card(cfg, result, **kwargs))
    return path
