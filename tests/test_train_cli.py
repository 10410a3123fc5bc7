"""`spa-vl train` as a user runs it, and the typed settings behind it.

The shipped real-model configs (LLaVA-1.5-7B: DPO with LoRA, the reward model, PPO with LoRA) run two
steps each on CPU with only the model (a tiny LLaVA in llava-hf's format) and the data overridden.
Bad values are one-line errors with exit status 2; subsets are drawn evenly over class3 with the seed;
the trained model's card names its base model and dataset.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from builder.errors import DataError
from training.config import load_config

SPA_VL = str(Path(sys.executable).with_name("spa-vl"))


def spa_vl(*args, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([SPA_VL, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def real_runs(tiny_llava_data, tmp_path_factory):
    """``spa-vl train {dpo,rm,ppo} --config llava-1.5-7b-... --model TINY --dataset D --config_name malicious_use
    --max_steps 2 --output_dir OUT`` (PPO also ``--reward_model`` the RM just trained)."""
    root = tmp_path_factory.mktemp("real-configs")
    common = ["--model", tiny_llava_data["model"], "--dataset", tiny_llava_data["data"],
              "--config_name", "malicious_use", "--max_steps", "2"]
    runs = {}
    for kind, config, extra in (("dpo", "llava-1.5-7b-lora", []), ("rm", "llava-1.5-7b-rm", []),
                                ("ppo", "llava-1.5-7b-ppo-lora", ["--reward_model", root / "rm"])):
        runs[kind] = (root / kind, spa_vl("train", kind, "--config", config, *common, "--output_dir", root / kind, *extra))
    return runs


@pytest.mark.parametrize("kind", ["dpo", "rm", "ppo"])
def test_shipped_real_model_configs_run_two_steps_on_cpu(kind, real_runs, tiny_llava_data):
    out, proc = real_runs[kind]
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = [line for line in proc.stdout.splitlines() if line.startswith(f"train {kind}: 2 steps")]
    assert len(summary) == 1, proc.stdout[-2000:]
    record = json.loads((out / "spa_vl_train.json").read_text())
    config = record["config"]
    assert config["model"] == tiny_llava_data["model"] and config["lora"]["r"] == 128  # the rest is the shipped file
    assert config["learning_rate"] == {"dpo": 2e-5, "rm": 3e-5, "ppo": 1e-6}[kind]
    card = (out / "README.md").read_text()
    assert tiny_llava_data["model"] in card and tiny_llava_data["data"] in card and "malicious_use" in card


@pytest.mark.parametrize("flag,value,message", [
    ("--max_steps", "abc", "train: --max_steps takes an integer, not 'abc'"),  # the command line's own check
    ("--max_steps", "-5", "train: --max_steps must be >= -1, not -5"),
    ("--per_device_train_batch_size", "0", "field per_device_train_batch_size: must be positive"),
    ("--learning_rate", "fast", "field learning_rate: must be a number"),
    ("--lora", "{rank: 8}", "field lora: unknown LoRA setting"),
    ("--betta", "0.2", "field betta: unknown setting for `spa-vl train dpo`"),
    ("--lr_scheduler_type", "cosinus", "field lr_scheduler_type: must be one of linear, cosine,"),
    ("--warmup_steps", "1.5", "field warmup_steps: must be a whole number of steps, or a share"),
    ("--remove_unused_columns", "true", "field remove_unused_columns: spa-vl sets it to False"),
])
def test_bad_values_are_one_line_errors_with_exit_2(flag, value, message, tmp_path):
    out = tmp_path / "never"
    proc = spa_vl("train", "dpo", "--config", "tiny-dpo", "--model", tmp_path, "--dataset", tmp_path,
                  "--output_dir", out, flag, value, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spa-vl: error: ") and message in lines[0], proc.stderr
    assert not out.exists()


def test_settings_are_typed_once():
    """Strings from a command line become the fields' types; nothing downstream casts."""
    cfg = load_config("tiny-dpo", "dpo", model="m", dataset="d", output_dir="o", max_steps="10", learning_rate="1e-5",
                      bf16="false", lora="false", eval_samples="null", beta="0.2")
    assert (cfg.max_steps, cfg.learning_rate, cfg.bf16, cfg.lora, cfg.eval_samples, cfg.beta) == \
        (10, 1e-5, False, None, None, 0.2)
    assert cfg.replace(lora=True).lora.r == 128 and cfg.replace(lora=True).learning_rate == 1e-5  # given, kept
    assert load_config("tiny-dpo", "dpo", model="m", dataset="d", output_dir="o").learning_rate == 5e-3
    with pytest.raises(DataError, match="must be true or false"):
        load_config("tiny-dpo", "dpo", model="m", dataset="d", output_dir="o", use_cpu="maybe")
    with pytest.raises(DataError, match="gamma: must be between 0 and 1"):
        load_config("tiny-ppo", "ppo", model="m", dataset="d", output_dir="o", gamma=1.5)
    with pytest.raises(DataError, match="gradient_accumulation_steps: unknown setting for `spa-vl train ppo`"):
        load_config("tiny-ppo", "ppo", model="m", dataset="d", output_dir="o", gradient_accumulation_steps=2)


def test_trl_flags_pass_through_to_dpo_config(tmp_path):
    from training.dpo import dpo_args

    cfg = load_config("tiny-dpo", "dpo", model="m", dataset="d", output_dir=str(tmp_path), label_smoothing="0.1",
                      optim="adamw_torch", beta=0.3)
    assert cfg.trl == {"label_smoothing": 0.1, "optim": "adamw_torch"}
    args = dpo_args(cfg, log=lambda m: None)
    assert args.label_smoothing == 0.1 and args.optim == "adamw_torch" and args.beta == 0.3
    assert args.max_length is None  # ours drops over-long pairs; trl must not truncate image tokens
    with pytest.raises(DataError, match="or any trl.DPOConfig field"):
        load_config("tiny-dpo", "dpo", model="m", dataset="d", output_dir="o", label_smothing=0.1)
    with pytest.raises(DataError, match="label_smoothing"):
        load_config("tiny-dpo", "dpo", model="m", dataset="d", output_dir="o", label_smoothing="lots")


# Settings named like a trl/transformers field that differ on purpose (training/config.py says why).
OUR_OWN_MEANING = {"max_length", "bf16", "report_to", "learning_rate"}


@pytest.mark.parametrize("kind", ["dpo", "rm", "ppo"])
def test_settings_named_like_trl_fields_take_their_values(kind):
    """What trl's DPOConfig (DPO) or transformers' TrainingArguments (RM, PPO) accepts for a field, the setting
    of that name accepts too, and keeps: its default, and a share below 1 where the field is a float."""
    import dataclasses

    from transformers import TrainingArguments
    from trl import DPOConfig

    from training.config import settings_class

    theirs = {f.name: f for f in dataclasses.fields(DPOConfig if kind == "dpo" else TrainingArguments) if f.init}
    shared = [f.name for f in dataclasses.fields(settings_class(kind)) if f.name in theirs and
              f.name not in OUR_OWN_MEANING | {"output_dir"}]
    assert {"warmup_steps", "logging_steps", "gradient_accumulation_steps"} & set(shared)
    for name in shared:
        field = theirs[name]
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        values = [v for v in (default, 0.5 if field.type in ("float", float) else None) if v is not None]
        for value in values:
            cfg = load_config(f"tiny-{kind}", kind, model="m", dataset="d", output_dir="o", **{name: value})
            assert getattr(cfg, name) == value, name


def test_the_dpo_config_is_built_once_from_the_settings_by_name(tmp_path):
    """Every setting that is a DPOConfig field arrives under its name; a trl user's flags work as in trl (a list
    of losses, a warmup share, transformers 5's activation_checkpointing, fields spa-vl only defaults)."""
    import dataclasses

    from trl import DPOConfig

    from training.dpo import dpo_args

    cfg = load_config("tiny-dpo", "dpo", model="m", dataset="d", output_dir=str(tmp_path), beta="0.25",
                      loss_type="sigmoid,bco_pair", loss_weights="0.8,0.2", warmup_steps="0.1", save_total_limit=5,
                      activation_checkpointing="true", eval_strategy="epoch", max_grad_norm=0.5)
    assert cfg.loss_type == ["sigmoid", "bco_pair"] and cfg.gradient_checkpointing is True
    args = dpo_args(cfg, log=lambda m: None)
    theirs = {f.name for f in dataclasses.fields(DPOConfig)}
    for f in dataclasses.fields(cfg):
        if f.name in theirs and f.name not in OUR_OWN_MEANING:
            assert getattr(args, f.name) == getattr(cfg, f.name), f.name
    assert (args.loss_weights, args.save_total_limit, args.activation_checkpointing) == ([0.8, 0.2], 5, True)
    assert args.eval_strategy == "epoch" and args.save_strategy == "steps"  # the run's flag over spa-vl's default
    assert args.max_length is None and args.remove_unused_columns is False  # what spa-vl needs, always
    with pytest.raises(DataError, match="trl.DPOConfig refused the settings: .*fp16 and bf16"):
        dpo_args(cfg.replace(bf16=True, fp16=True), log=lambda m: None)


def test_step_settings_read_a_share_of_the_run():
    from training.config import step_count

    cfg = load_config("tiny-rm", "rm", model="m", dataset="d", output_dir="o", warmup_steps="0.1", logging_steps=0.25,
                      save_steps="3", eval_steps=1.0)
    assert (cfg.warmup_steps, cfg.logging_steps, cfg.save_steps, cfg.eval_steps) == (0.1, 0.25, 3, 1)
    assert isinstance(cfg.save_steps, int) and isinstance(cfg.eval_steps, int)
    assert [step_count(v, 40) for v in (cfg.warmup_steps, cfg.logging_steps, cfg.save_steps)] == [4, 10, 3]
    assert step_count(0.1, 3) == 1 and step_count(0, 3) == 0  # rounded up, as transformers does


def test_max_samples_are_drawn_evenly_over_class3_with_the_seed(tiny_llava_data):
    from training.data import load_rows, sample_evenly

    ds = load_rows(tiny_llava_data["data"], "default", "train")
    full = Counter(ds["class3"])
    n = len(full) + len(full) // 2  # one per category, plus half of them a second
    picked = sample_evenly(ds, n, seed=1)
    counts = Counter(picked["class3"])
    assert len(picked) == n and set(counts) == set(full) and max(counts.values()) - min(counts.values()) <= 1
    assert picked["id"] == sample_evenly(ds, n, seed=1)["id"]  # the seed decides
    assert picked["id"] != sample_evenly(ds, n, seed=2)["id"]
    assert sample_evenly(ds, len(ds) + 5, seed=1) is ds and sample_evenly(ds, None, seed=1) is ds
    ids = picked["id"]
    assert ids == [i for i in ds["id"] if i in set(ids)]  # the dataset's order is kept


def test_eval_runs_on_a_validation_subset(tiny_llava_data, tmp_path):
    from builder.vlm.chat import load_processor
    from training.dpo import eval_pairs

    processor = load_processor(tiny_llava_data["model"])
    cfg = load_config("tiny-dpo", "dpo", model=tiny_llava_data["model"], dataset=tiny_llava_data["data"],
                      output_dir=str(tmp_path), config_name="default", eval_samples=4, max_samples=6)
    lines = []
    pairs = eval_pairs(cfg, processor, lines.append)
    assert len(pairs) == 4 and any("eval data: 4 of 4 pairs" in line for line in lines)
    from training.data import load_rows, rows_for

    whole = len(load_rows(tiny_llava_data["data"], "default", "validation"))
    assert whole > 4 and len(eval_pairs(cfg.replace(eval_samples=None), processor, lambda m: None)) == whole
    assert len(rows_for(cfg, cfg.split, samples=cfg.max_samples)) == 6


def test_model_card_header_names_hub_models_and_datasets():
    import yaml

    from training.card import model_card
    from training.config import TrainResult

    cfg = load_config("llava-1.5-7b-lora", "dpo", model="llava-hf/llava-1.5-7b-hf", dataset="my-org/SPA-VL",
                      output_dir="runs/dpo-llava", max_samples=10000)
    card = model_card(cfg, TrainResult("dpo", "runs/dpo-llava", 12, 96, 3.0, {"loss": 0.5}), pairs=10000)
    header = yaml.safe_load(card.split("---")[1])
    assert header["base_model"] == "llava-hf/llava-1.5-7b-hf" and header["datasets"] == ["my-org/SPA-VL"]
    assert header["library_name"] == "peft" and "dpo" in header["tags"]
    body = card.split("---", 2)[2]
    assert "**llava-hf/llava-1.5-7b-hf**" in body and "**my-org/SPA-VL**" in body and "10,000 rows drawn evenly" in body
