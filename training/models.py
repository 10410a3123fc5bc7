"""A loaded VLM in the paper's training setup: vision tower frozen, projector trained, LoRA or full LM.

    model, processor = load_vlm("llava-hf/llava-1.5-7b-hf", dtype="auto")  # builder.vlm.loading
    parts = vlm_parts(model)                 # vision tower, projector, language model (any family)
    model = apply_training_mode(model, cfg)  # freeze / LoRA as the settings say; returns a PeftModel with LoRA

Works for any ``AutoModelForImageTextToText`` whose wrapper keeps the usual sub-module names
(LLaVA / LLaVA-NeXT: ``vision_tower``, ``multi_modal_projector``, ``language_model``; Qwen2-VL and
Qwen2.5-VL: ``visual`` with its ``merger`` as the projector, ``language_model``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from builder.errors import DataError

VISION_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder")
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "merger", "connector", "projector")
LM_NAMES = ("language_model", "text_model", "llm")


@dataclass
class VLMParts:
    vision: torch.nn.Module | None
    projector: torch.nn.Module | None
    language_model: torch.nn.Module
    vision_name: str | None
    projector_name: str | None
    language_model_name: str


def _find(root: torch.nn.Module, names: tuple[str, ...], within: torch.nn.Module | None = None):
    """The first sub-module whose last name component is one of ``names`` (shortest path first)."""
    found = []
    for path, module in (within or root).named_modules():
        if path and path.split(".")[-1] in names:
            found.append((path.count("."), path, module))
    if not found:
        return None, None
    _, path, module = min(found, key=lambda t: (t[0], names.index(t[1].split(".")[-1])))
    return path, module


def vlm_parts(model: torch.nn.Module) -> VLMParts:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vision_name, vision = _find(base, VISION_NAMES)
    projector_name, projector = _find(base, PROJECTOR_NAMES)
    lm_name, lm = _find(base, LM_NAMES)
    if lm is None:
        raise DataError(f"cannot find the language model inside {type(base).__name__} (looked for {LM_NAMES})",
                        field="model")
    return VLMParts(vision, projector, lm, vision_name, projector_name, lm_name)


def lora_target_modules(model: torch.nn.Module) -> list[str]:
    """Every linear layer of the language model (not the vision tower, projector or LM head), as full paths."""
    parts = vlm_parts(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = next(p for p, m in base.named_modules() if m is parts.language_model)
    return [f"{prefix}.{name}" for name, mod in parts.language_model.named_modules()
            if name and isinstance(mod, torch.nn.Linear)]


def lora_config(model: torch.nn.Module, cfg):
    """The ``peft.LoraConfig`` of ``cfg.lora`` (None without LoRA): adapters on every linear layer of the
    language model, and the projector trained in full as a module to save (unless ``train_projector`` is off).

    Trainers that take a ``peft_config`` (trl's DPOTrainer) wrap the model themselves, so the reference model
    is the base with adapters disabled rather than a copy."""
    lora = cfg.lora
    if not lora:
        return None
    from peft import LoraConfig

    parts = vlm_parts(model)
    targets = lora.target_modules or lora_target_modules(model)
    modules_to_save = [parts.projector_name] if cfg.train_projector and parts.projector_name else None
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      modules_to_save=modules_to_save, task_type="CAUSAL_LM")


def apply_training_mode(model: torch.nn.Module, cfg, *, add_lora: bool = True) -> torch.nn.Module:
    """Freeze the vision tower (unless told not to), keep the projector trainable, and add LoRA when asked
    (``add_lora=False``: a trainer that adds the adapters itself, as trl's DPOTrainer does).

    With LoRA only the adapters (and the projector, saved as a module to save) train; without it the
    language model and projector train in full.
    """
    parts = vlm_parts(model)
    lora = cfg.lora if add_lora else None
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(model, cfg))
        parts = vlm_parts(model)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if parts.vision is not None and cfg.freeze_vision_tower:
        for name, p in parts.vision.named_parameters():
            if "modules_to_save" not in name:  # a LoRA run's trained projector copy (Qwen's `visual.merger`)
                p.requires_grad_(False)
    # After the freeze: Qwen2-VL's projector (`visual.merger`) sits inside the vision tower.
    if parts.projector is not None and not lora:
        for p in parts.projector.parameters():
            p.requires_grad_(cfg.train_projector)
    return model


def upcast_trainable(model: torch.nn.Module) -> int:
    """Trainable parameters held in bf16/fp16 → float32 in place, before the optimizer is made: under bf16
    autocast they are the master weights, and AdamW steps of 1e-6..3e-5 are below bf16's resolution."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
            n += 1
    return n


def trainable_summary(model: torch.nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable parameters: {train:,} of {total:,} ({100 * train / max(1, total):.2f}%)"
