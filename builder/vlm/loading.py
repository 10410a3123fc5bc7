"""The one way a VLM folder or Hub id becomes a model and its processor, for training, evaluate and the pipeline.

    model, processor = load_vlm("llava-hf/llava-1.5-7b-hf", dtype="auto")           # to train (accelerate places it)
    model, processor = load_vlm("runs/dpo", dtype=resolve_dtype("auto", device="cuda", training=False),
                                device_map="cuda")                                  # to generate
    adapter_base("runs/dpo")             # "llava-hf/llava-1.5-7b-hf": a LoRA adapter folder names its base model

- **Processor**: ``builder.vlm.chat.load_processor`` (Qwen2.5-VL without the video half that wants torchvision),
  from the folder itself when it holds one, else from the adapter's base model.
- **dtype**: a torch dtype or its name; ``auto`` is bf16 on a CUDA device that supports it, float32 on CPU,
  and on an older GPU float16 to generate (half of float32's memory) but float32 to train (fp16 weights
  round AdamW's small steps away).
- **LoRA adapters**: a folder with ``adapter_config.json`` loads its base model, then the adapter on top
  (a ``peft.PeftModel``; trainable only when asked).

Errors are :class:`builder.errors.DataError` naming the folder and the caller's ``field`` (``model``,
``reference``, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from builder.errors import DataError

ADAPTER_CONFIG = "adapter_config.json"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def default_device(use_cpu: bool = False) -> str:
    """``cuda`` when a GPU is there (and not refused), else ``cpu``."""
    return "cuda" if torch.cuda.is_available() and not use_cpu else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None = "auto", *, device: str | None = None,
                  training: bool = True) -> torch.dtype:
    """A torch dtype from its name (``auto``/None: see the module docstring); ``device`` defaults to
    ``default_device()``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if not str(device or default_device()).startswith("cuda") or not torch.cuda.is_available():
            return torch.float32
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32 if training else torch.float16
    found = getattr(torch, str(dtype), None)
    if not isinstance(found, torch.dtype):
        raise DataError(f"unknown torch dtype {dtype!r}", field="torch_dtype")
    return found


def adapter_base(path: str) -> str | None:
    """The base model a LoRA adapter folder names; None when ``path`` is no adapter folder (a model folder
    or a Hub id)."""
    config = Path(path) / ADAPTER_CONFIG
    if not config.is_file():
        return None
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except (ValueError, AttributeError):
        raise DataError("not valid JSON", file=str(config)) from None
    if not base:
        raise DataError("the adapter does not name its base model", file=str(config), field="base_model_name_or_path")
    return base


def load_vlm(path: str, *, dtype="auto", use_cpu: bool = False, attn_implementation: str | None = None,
             trainable_adapter: bool = False, device_map=None, field: str = "model"):
    """Model and processor from a Hub id, a model folder or a LoRA adapter folder (the model is then a
    ``PeftModel`` over its base). ``dtype``: see ``resolve_dtype`` (``use_cpu``: as a trainer on CPU sees it);
    ``device_map``: where the weights load (None: CPU, for accelerate to place)."""
    from transformers import AutoModelForImageTextToText

    from builder.vlm.chat import load_processor

    kwargs = {"dtype": resolve_dtype(dtype, device=default_device(use_cpu))}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    base = adapter_base(path) or path
    own_processor = any((Path(path) / name).is_file() for name in PROCESSOR_FILES)
    try:
        model = AutoModelForImageTextToText.from_pretrained(base, **kwargs)
        processor = load_processor(path if own_processor else base, field=field)
        if base != path:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, path, is_trainable=trainable_adapter)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load the model as an image-text-to-text model: {e}"[:800], file=str(path),
                        field=field) from None
    return model, processor
