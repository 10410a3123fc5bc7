"""One YAML file per training run, typed once: the paper's settings as defaults, overrides from the CLI.

    cfg = load_config("training/configs/llava-1.5-7b-lora.yaml", "dpo", max_steps=10, output_dir="runs/x")
    cfg.beta, cfg.learning_rate, cfg.lora.r          # 0.1, 2e-05 (LoRA; 1e-06 full), 128

Each trainer has a dataclass of settings (``DPOSettings``, ``RMSettings``, ``PPOSettings``). Every value,
from the YAML or the command line (where ``--max_steps 10`` may arrive as the string ``"10"``), is
converted to its field's type and checked here, once: ``--max_steps abc``, a batch size of 0 or
``--max_steps -5`` are errors naming the field, as is an unknown key, so a typo never silently trains
with a default. Names follow transformers/trl (``per_device_train_batch_size``, ``learning_rate``, ...);
``spa-vl train dpo`` also accepts any other ``trl.DPOConfig`` field (``--label_smoothing 0.1``,
``--optim adamw_torch_fused``) and hands it to trl as given.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from builder.settings import expand_env as _expand
from builder.errors import DataError

KINDS = ("dpo", "rm", "ppo")
CONFIGS = Path(__file__).with_name("configs")
REPORT_TO = ("tensorboard", "trackio", "none")

# How each checked field may range (everything else: its type only).
POSITIVE = {"per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
            "max_length", "logging_steps", "rollout_batch_size", "mini_batch_size", "response_length", "ppo_epochs",
            "learning_rate", "lr_full", "lr_lora", "num_train_epochs", "temperature", "beta", "r", "alpha",
            "cliprange", "cliprange_value", "limit", "max_samples", "eval_samples"}
NON_NEGATIVE = {"warmup_steps", "save_steps", "eval_steps", "max_grad_norm", "weight_decay", "kl_coef", "vf_coef",
                "missing_eos_penalty", "dropout"}
UNIT = {"gamma", "lam", "dropout"}  # in [0, 1]
TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@dataclass
class LoraSettings:
    """LoRA on every linear layer of the language model (``target_modules``: others, as full module paths)."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] | None = None


@dataclass
class TrainSettings:
    """What every trainer reads: model, data, schedule, precision, training mode, logging."""

    kind: ClassVar[str] = ""
    model: str | None = None  # a Hub id or a local folder of an image-text-to-text model (or a LoRA adapter folder)
    dataset: str | None = None  # a spa-vl dataset folder or Hub repo id
    revision: str | None = None  # of the dataset (a tag such as v0.2.0)
    config_name: str = "default"  # a harm domain (malicious_use, ...) or default (all)
    split: str = "train"
    filters: dict | None = None  # {"class2": [...]} etc., applied in the parquet scan
    limit: int | None = None  # keep the first N rows (quick runs)
    max_samples: int | None = None  # N rows drawn evenly over class3 with the seed (the data-scale runs: 10k, 30k, 90k)
    output_dir: str | None = None
    max_length: int = 2048  # prompt + answer tokens, image tokens included; longer pairs are dropped, not cut
    max_steps: int = -1  # optimizer steps (PPO: iterations); -1: whole epochs
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 1
    learning_rate: float | None = None  # None: lr_lora with LoRA, else lr_full (the paper's values)
    lr_full: float = 1e-6
    lr_lora: float = 2e-5
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    bf16: bool | str = "auto"  # auto: when the GPU supports it
    gradient_checkpointing: bool = True
    freeze_vision_tower: bool = True  # the paper's setup: vision tower frozen...
    train_projector: bool = True  # ...and the multimodal projector trained
    lora: LoraSettings | None = None
    logging_steps: int = 10
    save_steps: int = 500
    report_to: str = "tensorboard"  # tensorboard | trackio | none
    seed: int = 42
    use_cpu: bool = False
    attn_implementation: str | None = None  # e.g. flash_attention_2, sdpa
    torch_dtype: str = "auto"  # auto: bf16 on a GPU that supports it, else float32

    def to_dict(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    def replace(self, **changes):
        """A copy with ``changes``, converted and checked like any override."""
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return _build(type(self), _merged(current, _checked(type(self), changes, "(in code)")), "(in code)")


@dataclass
class PairSettings(TrainSettings):
    """DPO and the reward model: preference pairs, evaluated on a subset of the validation split."""

    eval_split: str | None = "validation"  # None to skip evaluation during training
    eval_samples: int | None = 512  # pairs of it, drawn evenly over class3 with the seed; None: all of them
    eval_steps: int = 500
    per_device_eval_batch_size: int = 1
    gradient_accumulation_steps: int = 8


@dataclass
class DPOSettings(PairSettings):
    kind: ClassVar[str] = "dpo"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    trl: dict = field(default_factory=dict)  # other trl.DPOConfig fields, passed through as given


@dataclass
class RMSettings(PairSettings):
    kind: ClassVar[str] = "rm"
    per_device_train_batch_size: int = 4
    lr_full: float = 3e-5
    lr_lora: float = 3e-5


@dataclass
class PPOSettings(TrainSettings):
    """PPO. Batch sizes count all processes together, so a run keeps its batch on any number of GPUs."""

    kind: ClassVar[str] = "ppo"
    reward_model: str | None = None  # a folder written by `spa-vl train rm` (the value model starts from it)
    kl_coef: float = 0.1
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 1.0
    whiten_advantages: bool = True
    temperature: float = 1.0
    response_length: int = 128  # longest sampled answer; one cut there gets no EOS of its own
    missing_eos_penalty: float | None = 1.0  # subtracted from the score of an answer cut before its EOS (trl's PPO)
    ppo_epochs: int = 1
    rollout_batch_size: int = 8  # prompts per iteration, all processes together; each process samples its share
    mini_batch_size: int = 8  # sequences per optimizer step, all processes together
    lr_full: float = 5e-7
    lr_lora: float = 1e-6


SETTINGS: dict[str, type[TrainSettings]] = {"dpo": DPOSettings, "rm": RMSettings, "ppo": PPOSettings}
REQUIRED = ("model", "dataset", "output_dir")


def settings_class(kind: str) -> type[TrainSettings]:
    if kind not in KINDS:
        raise DataError(f"unknown trainer {kind!r}; expected one of {', '.join(KINDS)}", field="kind")
    return SETTINGS[kind]


def load_config(path: str | Path | None, kind: str, **overrides) -> TrainSettings:
    """The run's settings: defaults ← YAML file ← overrides (the CLI's ``--key value``; None = not given)."""
    cls = settings_class(kind)
    values, file = {}, "(command line)"
    if path is not None:
        p = resolve_config_path(path)
        file = str(p)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise DataError(f"not valid YAML: {e}", file=file) from None
        if not isinstance(data, dict):
            raise DataError("a training config is a mapping of settings", file=file)
        values = _checked(cls, _expand(data), file)
    given = _checked(cls, {k: v for k, v in overrides.items() if v is not None}, "(command line)")
    cfg = _build(cls, _merged(values, given), file)
    for key in REQUIRED:
        if getattr(cfg, key) in (None, ""):
            raise DataError(f"required: set it in the YAML or pass --{key}", file=file, field=key)
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


def _checked(cls, data: dict, file: str) -> dict:
    """``data`` with every value converted to its field's type; unknown keys are errors (DPO: trl's own fields
    go into ``trl``)."""
    hints, out = typing.get_type_hints(cls), {}
    for key, value in data.items():
        if key in hints and key != "kind":
            out[key] = _convert(value, hints[key], file, key)
            _check_value(key, out[key], file)
        elif cls is DPOSettings and key in _trl_fields():
            out.setdefault("trl", {})[key] = _convert(value, _trl_fields()[key], file, key)
        else:
            known = sorted(k for k in hints if k != "kind")
            raise DataError(f"unknown setting for `spa-vl train {cls.kind}` (known: {', '.join(known)}"
                            + (", or any trl.DPOConfig field)" if cls is DPOSettings else ")"), file=file, field=key)
    return out


def _merged(values: dict, over: dict) -> dict:
    """``over`` on top of ``values``; trl's pass-through settings merge key by key."""
    out = {**values, **over}
    if "trl" in values and "trl" in over:
        out["trl"] = {**values["trl"], **over["trl"]}
    return out


def _build(cls, values: dict, file: str) -> TrainSettings:
    values = dict(values)
    if values.get("learning_rate") is None:
        defaults = cls()
        lr_lora, lr_full = values.get("lr_lora", defaults.lr_lora), values.get("lr_full", defaults.lr_full)
        values["learning_rate"] = lr_lora if values.get("lora") else lr_full
    _check_value("learning_rate", values["learning_rate"], file)
    return cls(**values)


def _check_value(key: str, value, file: str) -> None:
    """The range of one converted value (its field's rule, if it has one)."""
    if key == "max_steps" and (value == 0 or value < -1):
        raise DataError(f"must be a positive number of steps, or -1 for whole epochs; got {value}", file=file, field=key)
    if key == "report_to" and value not in REPORT_TO:
        raise DataError(f"must be one of {', '.join(REPORT_TO)}, got {value!r}", file=file, field=key)
    if key == "bf16" and isinstance(value, str) and value != "auto":
        raise DataError(f"must be true, false or auto, got {value!r}", file=file, field=key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    name = key.removeprefix("lora.")
    if name in POSITIVE and value <= 0:
        raise DataError(f"must be positive, got {value}", file=file, field=key)
    if name in NON_NEGATIVE and value < 0:
        raise DataError(f"must be zero or more, got {value}", file=file, field=key)
    if name in UNIT and not 0 <= value <= 1:
        raise DataError(f"must be between 0 and 1, got {value}", file=file, field=key)


# --- converting one value to its field's type --------------------------------------------------------
def _convert(value, hint, file: str, key: str):
    """``value`` as ``hint`` says (int, float, bool, str, a LoraSettings, an Optional or union of these)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    nullable = type(None) in options
    if value is None or (nullable and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if nullable:
            return None
        raise DataError("must be set (not null)", file=file, field=key)
    for option in [o for o in options if o is not type(None)]:
        try:
            return _as(option, value, file, key)
        except DataError:
            raise
        except (TypeError, ValueError):
            continue
    names = " or ".join(TYPE_NAMES.get(o, getattr(o, "__name__", str(o))) for o in options if o is not type(None))
    raise DataError(f"must be {names}, got {value!r}", file=file, field=key)


def _as(kind, value, file: str, key: str):
    if kind is LoraSettings:
        return _lora(value, file)
    origin = typing.get_origin(kind) or kind
    if origin is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
            return value.strip().lower() in ("true", "yes")
        raise TypeError
    if origin is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError
        return int(value) if isinstance(value, (int, float)) else int(str(value).strip())
    if origin is float:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    if origin is str:
        if isinstance(value, (dict, list, bool)):
            raise TypeError
        return str(value)
    if origin in (dict, list) and isinstance(value, origin):
        return value
    if origin is typing.Any or isinstance(origin, typing.TypeVar):
        return value
    raise TypeError


def _lora(value, file: str) -> LoraSettings | None:
    if isinstance(value, LoraSettings):
        return value
    if value is True or (isinstance(value, str) and value.lower() == "true"):
        return LoraSettings()
    if value is False or (isinstance(value, str) and value.lower() == "false"):
        return None
    if not isinstance(value, dict):
        raise DataError(f"a mapping of LoRA settings (r, alpha, dropout, target_modules) or true/false, got {value!r}",
                        file=file, field="lora")
    unknown = set(value) - {f.name for f in dataclasses.fields(LoraSettings)}
    if unknown:
        raise DataError(f"unknown LoRA setting(s) {sorted(unknown)}", file=file, field="lora")
    hints, out = typing.get_type_hints(LoraSettings), {}
    for k, v in value.items():
        out[k] = _convert(v, hints[k], file, f"lora.{k}")
        _check_value(f"lora.{k}", out[k], file)
    return LoraSettings(**out)


_TRL_FIELDS: dict | None = None


def _trl_fields() -> dict:
    """trl.DPOConfig's fields and types, minus the ones this project sets itself."""
    global _TRL_FIELDS
    if _TRL_FIELDS is None:
        from trl import DPOConfig

        ours = {f.name for f in dataclasses.fields(DPOSettings)}
        hints = typing.get_type_hints(DPOConfig)
        _TRL_FIELDS = {f.name: hints.get(f.name, typing.Any) for f in dataclasses.fields(DPOConfig)
                       if f.init and f.name not in ours}
    return _TRL_FIELDS


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
