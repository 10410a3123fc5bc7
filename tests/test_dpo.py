"""DPO on the tiny random-weight LLaVA (CPU, offline): LoRA and full fine-tune, saving, freezing, data drops."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from builder.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def tiny(tiny_llava_data, tmp_path_factory):
    return {**tiny_llava_data, "root": tmp_path_factory.mktemp("dpo")}


def _cfg(tiny, name, **overrides):
    from training.config import load_config

    return load_config("tiny-dpo", "dpo", model=tiny["model"], dataset=tiny["data"],
                       output_dir=str(tiny["root"] / name), **overrides)


class Grab:
    """A TrainerCallback that keeps the trained model (the trainer's own object) at the end of training."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Grab(TrainerCallback):
            model = None

            def on_train_end(self, args, state, control, model=None, **kwargs):
                self.model = model

        return _Grab()


def _load(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def _parts(model) -> dict:
    """{"vision": state dict, "projector": ..., "lm": ...} keyed relative to each part."""
    from training.models import vlm_parts

    parts = vlm_parts(model)
    return {"vision": parts.vision.state_dict(), "projector": parts.projector.state_dict(),
            "lm": parts.language_model.state_dict()}


def _one_input(tiny):
    from PIL import Image

    from builder.vlm.chat import ChatFormat, answer_messages, prompt_messages
    from builder.vlm.loading import load_vlm

    _, processor = load_vlm(tiny["model"], dtype="float32", use_cpu=True)
    row = {"prompt": prompt_messages("What is in the image?"), "chosen": answer_messages("A dog."),
           "rejected": answer_messages("A cat."), "images": [Image.new("RGB", (32, 32), (120, 40, 200))]}
    batch = ChatFormat(processor).pair_batch([row])
    batch.pop("completion_mask")
    return batch


@pytest.fixture(scope="module")
def lora_run(tiny):
    from training.dpo import train_dpo

    grab = Grab()
    lines = []
    result = train_dpo(_cfg(tiny, "lora", report_to="tensorboard"), log=lines.append, callbacks=[grab])
    return {"result": result, "model": grab.model, "log": lines, "out": tiny["root"] / "lora"}


@pytest.fixture(scope="module")
def full_run(tiny):
    from training.dpo import train_dpo

    grab = Grab()
    result = train_dpo(_cfg(tiny, "full", lora=False), log=lambda m: None, callbacks=[grab])
    return {"result": result, "model": grab.model, "out": tiny["root"] / "full"}


def test_lora_loss_moves_and_adapters_train(lora_run):
    r = lora_run["result"]
    assert r.kind == "dpo" and r.steps == 2 and r.samples == 4 and r.dropped == 0
    assert r.metrics["loss_first"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1: log 2
    assert r.metrics["loss"] != r.metrics["loss_first"]
    assert "rewards/accuracies" in r.metrics and "eval_loss" in r.metrics  # the domain has a validation split
    lora_b = [p for n, p in lora_run["model"].named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero
    assert any("LoRA r=8" in line and "vision tower frozen" in line for line in lora_run["log"])
    assert any(line.startswith("data: ") for line in lora_run["log"])


def test_lora_run_logs_to_tensorboard(lora_run):
    from tb_events import tensorboard_scalars

    scalars = tensorboard_scalars(lora_run["out"])
    assert len(scalars["train/loss"]) == 2  # logging_steps 1, two steps
    assert scalars["train/loss"][0] == pytest.approx(0.6931, abs=1e-3)
    assert "train/rewards/accuracies" in scalars and "eval/loss" in scalars


def test_lora_freezes_vision_trains_projector_and_reference_is_base(tiny, lora_run):
    from training.models import vlm_parts

    model, plain = lora_run["model"], _load(tiny["model"])
    base = _parts(plain)
    vision = vlm_parts(model).vision
    assert all(torch.equal(t, base["vision"][k]) for k, t in vision.state_dict().items())
    assert len(vision.state_dict()) == len(base["vision"]) > 0
    assert not any(p.requires_grad for p in vision.parameters())
    trained = {n.split("modules_to_save.default.")[1]: p for n, p in model.named_parameters()
               if "multi_modal_projector.modules_to_save.default." in n}
    assert trained and all(p.requires_grad for p in trained.values())
    assert any(not torch.equal(p.detach(), base["projector"][k]) for k, p in trained.items())

    # trl's reference is the same model with the adapters (and the projector copy) disabled: the base model.
    batch = _one_input(tiny)
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(**batch).logits
    with torch.no_grad():
        assert torch.allclose(ref_logits, plain(**batch).logits, atol=1e-5)
        assert not torch.allclose(model(**batch).logits, ref_logits, atol=1e-5)


def test_lora_adapter_saves_and_reloads(tiny, lora_run):
    from peft import PeftModel

    from builder.vlm.loading import load_vlm

    out = lora_run["out"]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    saved = load_file(out / "adapter_model.safetensors")
    assert any("multi_modal_projector" in k for k in saved)  # the projector travels with the adapter
    assert not any("vision_tower" in k for k in saved)
    reloaded, processor = load_vlm(str(out), dtype="float32", use_cpu=True)
    assert isinstance(reloaded, PeftModel) and processor is not None
    batch = _one_input(tiny)
    model = lora_run["model"].eval()
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(**batch).logits, model(**batch).logits, atol=1e-5)

    summary = json.loads((out / "spa_vl_train.json").read_text())
    assert summary["kind"] == "dpo" and summary["result"]["steps"] == 2
    assert summary["config"]["lora"]["r"] == 8 and summary["data"]["dropped"] == 0
    card = (out / "README.md").read_text()  # the model card names the base model and the dataset
    assert tiny["model"] in card and tiny["data"] in card and "library_name: peft" in card


def test_full_finetune_trains_lm_and_projector_not_vision(tiny, full_run):
    r = full_run["result"]
    assert r.steps == 2 and r.metrics["loss"] != r.metrics["loss_first"]
    assert not (full_run["out"] / "adapter_config.json").exists()
    base, saved = _parts(_load(tiny["model"])), _parts(_load(str(full_run["out"])))
    assert base["vision"] and all(torch.equal(v, base["vision"][k]) for k, v in saved["vision"].items())
    layers = [k for k in saved["lm"] if k.startswith("layers.")]
    assert layers and sum(not torch.equal(saved["lm"][k], base["lm"][k]) for k in layers) > len(layers) // 2
    assert any(not torch.equal(v, base["projector"][k]) for k, v in saved["projector"].items())
    trained = _parts(full_run["model"])  # the in-memory model is the one saved
    assert all(torch.equal(v, saved["lm"][k]) for k, v in trained["lm"].items())
    assert json.loads((full_run["out"] / "spa_vl_train.json").read_text())["config"]["lora"] is None


def test_overlong_pairs_dropped_and_overrides_respected(tiny):
    from training.data import load_rows, pair_lengths, prepare_preferences
    from training.dpo import train_dpo
    from builder.vlm.loading import load_vlm

    _, processor = load_vlm(tiny["model"], dtype="float32", use_cpu=True)
    rows = load_rows(tiny["data"], "malicious_use", "train")
    counted = pair_lengths(rows[:], processor)
    lengths = [max(a, b) for a, b in zip(counted["len_chosen"], counted["len_rejected"])]
    cut = sorted(lengths)[len(lengths) // 2]  # the median: some pairs are longer, some fit
    expected = sum(n > cut for n in lengths)
    assert 0 < expected < len(lengths)
    _, report = prepare_preferences(rows, processor, max_length=cut, log=lambda m: None)
    assert report.dropped == expected and report.kept == len(lengths) - expected

    out = tiny["root"] / "override"
    lines = []
    cfg = _cfg(tiny, "override", max_length=cut, max_steps=1, eval_split="no_such_split")
    assert cfg.output_dir == str(out) and cfg.max_steps == 1
    result = train_dpo(cfg, log=lines.append)
    assert result.dropped == expected and result.steps == 1 and result.output_dir == str(out)
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and state["max_steps"] == 1
    assert any(f"{expected:,} dropped" in line for line in lines)
    assert any("no 'no_such_split' split" in line for line in lines)  # eval skipped, said
    assert "eval_loss" not in result.metrics


def test_unknown_setting_is_an_error_naming_it(tmp_path, tiny):
    from training.config import load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ndataset: d\noutput_dir: o\nbetta: 0.2\n")
    with pytest.raises(DataError) as e:
        load_config(bad, "dpo")
    assert "betta" in str(e.value) and "bad.yaml" in str(e.value) and "`spa-vl train dpo`" in str(e.value)
    with pytest.raises(DataError, match="lr"):
        _cfg(tiny, "x", lr=1e-5)
    lora = tmp_path / "lora.yaml"
    lora.write_text("model: m\ndataset: d\noutput_dir: o\nlora: {rank: 8}\n")
    with pytest.raises(DataError, match="rank"):
        load_config(lora, "dpo")


def test_shipped_configs_load(tiny):
    from training.config import load_config

    full = load_config("llava-1.5-7b-full", "dpo")
    lora = load_config("llava-1.5-7b-lora", "dpo")
    qwen = load_config("qwen2.5-vl-3b-lora", "dpo")
    assert full.lora is None and full.learning_rate == 1e-6 and full.torch_dtype == "float32"
    assert (lora.lora.r, lora.lora.alpha, lora.lora.dropout) == (128, 256, 0.05) and lora.learning_rate == 2e-5
    assert qwen.model == "Qwen/Qwen2.5-VL-3B-Instruct" and qwen.lora.r == 128
    for cfg in (full, lora, qwen):
        assert cfg.beta == 0.1 and cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps == 8
        assert cfg.warmup_steps == 10 and cfg.lr_scheduler_type == "cosine" and cfg.max_grad_norm == 1.0
        assert cfg.eval_samples == 512  # a validation subset, not all 7,000 pairs every eval_steps


def test_dpo_args_resolve_bf16_and_report_to(tmp_path):
    from training.config import load_config
    from training.dpo import dpo_args

    cfg = load_config("tiny-dpo", "dpo", output_dir=str(tmp_path), bf16="auto", report_to="tensorboard")
    lines = []
    args = dpo_args(cfg, log=lines.append)
    assert args.bf16 is False  # use_cpu
    assert args.max_length is None and args.remove_unused_columns is False
    from transformers.integrations.integration_utils import is_tensorboard_available

    if not is_tensorboard_available():
        assert args.report_to in ([], "none", ["none"])
        assert any("tensorboard is not installed" in line for line in lines)


def test_demo_run_one_line(tiny):
    from training.dpo import demo_run

    line = demo_run(tiny["model"], tiny["data"], str(tiny["root"] / "demo"), limit=8)
    assert line.startswith("train dpo: 2 steps, 4 samples") and "loss" in line and "\n" not in line
    assert (tiny["root"] / "demo" / "adapter_model.safetensors").is_file()


def test_load_rows_errors_name_the_dataset_or_the_config(tiny, tmp_path):
    from training.data import load_rows

    for missing in (tmp_path / "nope", tmp_path):  # no folder at all; a folder without spa-vl shards
        with pytest.raises(DataError) as e:
            load_rows(str(missing), "malicious_use", "train")
        assert e.value.field == "dataset" and e.value.file == str(missing)
    with pytest.raises(DataError) as e:
        load_rows(tiny["data"], "malicous_use", "train")
    assert e.value.field == "config_name/split" and "malicious_use" in str(e.value)  # lists the real names
