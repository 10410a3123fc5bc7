"""One YAML file per training run, with the paper's settings as defaults and overrides from the CLI.

    cfg = load_config("training/configs/llava-1.5-7b-lora.yaml", "dpo", max_steps=10, output_dir="runs/x")
    cfg["beta"], cfg["learning_rate"]     # 0.1, 2e-05 (LoRA) or 1e-06 (full)

Every trainer (`dpo`, `rm`, `ppo`) reads the same common keys (model, dataset, config_name, split,
max_steps, output_dir, ...) and its own section of defaults. An unknown key is an error naming the
file and key, so a typo never silently trains with a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from builder.config import _expand
from builder.errors import DataError

KINDS = ("dpo", "rm", "ppo")
CONFIGS = Path(__file__).with_name("configs")

COMMON = {
    "model": None,  # a Hub id or a local folder of an image-text-to-text model
    "dataset": None,  # a spa-vl dataset folder or Hub repo id
    "revision": None,  # of the dataset (a tag such as v0.2.0)
    "config_name": "default",  # a harm domain (malicious_use, ...) or default (all)
    "split": "train",
    "eval_split": "validation",  # None to skip evaluation during training
    "filters": None,  # {"class2": [...]} etc., applied in the parquet scan
    "limit": None,  # keep the first N rows (quick runs)
    "output_dir": None,
    "max_length": 2048,  # prompt + answer tokens, image tokens included; longer pairs are dropped
    "max_steps": -1,
    "num_train_epochs": 1,
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1,
    "gradient_accumulation_steps": 8,
    "learning_rate": None,  # None: the paper's value for the mode (full or LoRA)
    "lr_scheduler_type": "cosine",
    "warmup_steps": 10,
    "max_grad_norm": 1.0,
    "weight_decay": 0.0,
    "bf16": "auto",  # auto: when the GPU supports it
    "gradient_checkpointing": True,
    "freeze_vision_tower": True,  # the paper's setup: vision tower frozen...
    "train_projector": True,  # ...and the multimodal projector trained
    "lora": None,  # {"r": 128, "alpha": 256, "dropout": 0.05}: LoRA on every linear layer of the language model
    "logging_steps": 10,
    "save_steps": 500,
    "eval_steps": 500,
    "report_to": "tensorboard",  # tensorboard | trackio | none
    "seed": 42,
    "use_cpu": False,
    "attn_implementation": None,  # e.g. flash_attention_2, sdpa
    "torch_dtype": "auto",  # auto: bf16 on a GPU that supports it, else float32
}
DEFAULTS = {
    "dpo": {"beta": 0.1, "loss_type": "sigmoid", "lr_full": 1e-6, "lr_lora": 2e-5},
    "rm": {"lr_full": 3e-5, "lr_lora": 3e-5, "per_device_train_batch_size": 4},
    "ppo": {
        "reward_model": None,  # a folder written by `spa-vl train rm` (its value model starts from it)
        "kl_coef": 0.1, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1, "gamma": 1.0, "lam": 1.0,
        "whiten_advantages": True, "temperature": 1.0, "response_length": 128, "ppo_epochs": 1,
        "rollout_batch_size": 8, "mini_batch_size": 1, "lr_full": 5e-7, "lr_lora": 1e-6,
    },
}
REQUIRED = ("model", "dataset", "output_dir")


def defaults(kind: str) -> dict:
    if kind not in KINDS:
        raise DataError(f"unknown trainer {kind!r}; expected one of {', '.join(KINDS)}", field="kind")
    return {**COMMON, **DEFAULTS[kind]}


def load_config(path: str | Path | None, kind: str, **overrides) -> dict:
    """The run's settings: defaults ← YAML file ← overrides (the CLI's ``--key value``); checked."""
    cfg = defaults(kind)
    file = str(path) if path is not None else "(command line)"
    if path is not None:
        p = resolve_config_path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise DataError(f"not valid YAML: {e}", file=str(p)) from None
        if not isinstance(data, dict):
            raise DataError("a training config is a mapping of settings", file=str(p))
        data = _expand(data)
        file = str(p)
        _merge_checked(cfg, data, file, kind)
    _merge_checked(cfg, {k: v for k, v in overrides.items() if v is not None}, "(command line)", kind)
    for key in REQUIRED:
        if cfg[key] in (None, ""):
            raise DataError(f"required: set it in the YAML or pass --{key}", file=file, field=key)
    if cfg["learning_rate"] is None:
        cfg["learning_rate"] = cfg["lr_lora"] if cfg["lora"] else cfg["lr_full"]
    if cfg["lora"] is True:
        cfg["lora"] = {}
    if cfg["lora"]:
        cfg["lora"] = {"r": 128, "alpha": 256, "dropout": 0.05, **cfg["lora"]}
    if cfg["report_to"] not in ("tensorboard", "trackio", "none", None):
        raise DataError("must be tensorboard, trackio or none", file=file, field="report_to")
    cfg["kind"] = kind
    return cfg


def resolve_config_path(path: str | Path) -> Path:
    """A path as given, or the name of a shipped config (``llava-1.5-7b-lora`` → training/configs/...)."""
    p = Path(path)
    if p.is_file():
        return p
    for shipped in (CONFIGS / f"{p.name}.yaml", CONFIGS / p.name):  # "llava-1.5-7b-lora": its "suffix" is .5-7b-lora
        if shipped.is_file():
            return shipped
    raise DataError(f"no such config file (shipped ones: {', '.join(sorted(q.stem for q in CONFIGS.glob('*.yaml')))})",
                    file=str(path))


def _merge_checked(cfg: dict, data: dict, file: str, kind: str) -> None:
    for key, value in data.items():
        if key not in cfg:
            raise DataError(f"unknown setting for `spa-vl train {kind}` (known: {', '.join(sorted(cfg))})",
                            file=file, field=key)
        if key == "lora" and isinstance(value, dict):
            unknown = set(value) - {"r", "alpha", "dropout", "target_modules"}
            if unknown:
                raise DataError(f"unknown LoRA setting(s) {sorted(unknown)}", file=file, field="lora")
        cfg[key] = value


@dataclass
class TrainResult:
    """What every trainer returns; the CLI prints ``line()`` as the job's one-line summary."""

    kind: str
    output_dir: str
    steps: int
    samples: int
    seconds: float
    metrics: dict = field(default_factory=dict)  # final train/eval figures (loss, accuracy, reward, kl, ...)
    dropped: int = 0  # pairs over max_length

    def line(self) -> str:
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.metrics.items())
        return (f"train {self.kind}: {self.steps} steps, {self.samples:,} samples ({self.dropped:,} over-long pairs "
                f"dropped) in {self.seconds:.1f} s; {shown} -> {self.output_dir}")
