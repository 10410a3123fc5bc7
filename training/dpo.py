"""DPO on SPA-VL with trl's ``DPOTrainer``, in the paper's setup (vision tower frozen, projector trained).

    from training.config import load_config
    from training.dpo import train_dpo
    cfg = load_config("training/configs/llava-1.5-7b-lora.yaml", "dpo", dataset="out/spa_vl", output_dir="runs/dpo")
    result = train_dpo(cfg)       # TrainResult; result.line() is the one-line summary

From the command line (one process, or one per GPU with accelerate; nothing here assumes a single
process: data are prepared on the main process first, only the main process logs and writes)::

    spa-vl train dpo --config llava-1.5-7b-lora --dataset out/spa_vl --config_name malicious_use --output_dir runs/dpo
    accelerate launch --num_processes 8 -m builder.cli train dpo --config llava-1.5-7b-lora \\
        --dataset out/spa_vl --output_dir runs/dpo
    # full fine-tune of a 7B model: shard it (FSDP or DeepSpeed ZeRO-3 through an accelerate config file)
    accelerate launch --config_file fsdp.yaml -m builder.cli train dpo --config llava-1.5-7b-full ...

What happens:

1. the split is read with ``rows_for`` (``max_samples`` rows drawn evenly over class3 when set; the eval
   split: ``eval_samples`` of them) and mapped to trl's conversational vision format by
   ``prepare_preferences``; pairs longer than ``max_length`` tokens (image tokens included) are dropped
   and counted, never truncated (trl gets ``max_length=None``). The chosen answer is trl's ``chosen``.
   Batches are made by ``builder.vlm.chat``'s collator: the prompt as evaluate and PPO encode it (LLaVA: with
   its BOS), each answer followed by EOS (the authors' ``</s>``; Qwen: ``<|im_end|>``);
2. the model is loaded with ``load_vlm``; the vision tower is frozen. With ``lora:`` trl wraps the model
   with our ``lora_config`` (adapters on every linear layer of the language model, the projector trained
   in full as a module to save) and the reference is the same model with adapters disabled (no copy);
   without LoRA the language model and projector train in full against a second, frozen copy;
3. with LoRA under bf16 autocast, the trainable weights held in bf16 (the projector copy) are upcast to
   float32 master weights: AdamW steps of 2e-5 are below bf16's resolution and would be lost. A full
   fine-tune keeps the dtype it was loaded in: use ``torch_dtype: float32`` with ``bf16`` autocast
   (as the shipped llava-1.5-7b-full config does); bf16 weights are warned about;
4. at the end the model (LoRA: the adapter and the projector; full: the whole model) and the processor
   are saved into ``output_dir`` with ``spa_vl_train.json`` (resolved settings and result: ``training.run``'s
   record) and a model card (``README.md``) naming the base model and the dataset.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

from builder.errors import DataError
from builder.vlm.chat import ChatFormat, PreferenceCollator
from builder.vlm.loading import default_device, load_vlm, resolve_dtype
from training.card import write_model_card
from training.config import TRL_FIXED, TrainResult, trl_fields
from training.data import prepare_preferences, rows_for
from training.models import apply_training_mode, lora_config, trainable_summary, upcast_trainable
from training.run import write_record

# trl.DPOConfig settings of every spa-vl run that a run's own trl flags may change (--save_total_limit 5).
TRL_DEFAULTS = {"save_strategy": "steps", "save_total_limit": 2,  # a 7B full checkpoint with optimizer state is
                "eval_strategy": "no"}                             # ~100 GB: keep two; "steps" when there is eval data


def dpo_args(cfg, *, log=None):
    """trl's ``DPOConfig``, built once: every setting of ``cfg`` that is a DPOConfig field, by name; bf16
    ``auto``, ``report_to`` and gradient checkpointing resolved; the run's other trl flags (``cfg.trl``) over
    spa-vl's defaults; no truncation by trl (``max_length``: over-long pairs were dropped). trl refusing the
    combination is a DataError."""
    import torch
    from transformers.integrations.integration_utils import (
        is_tensorboard_available,
        is_trackio_available,
    )
    from trl import DPOConfig

    log = log or _stderr
    bf16 = cfg.bf16
    if bf16 == "auto":
        bf16 = (not cfg.use_cpu and not cfg.trl.get("fp16") and torch.cuda.is_available()
                and torch.cuda.is_bf16_supported())
    report_to = cfg.report_to
    available = {"tensorboard": is_tensorboard_available, "trackio": is_trackio_available}
    if report_to in available and not available[report_to]():
        log(f"report_to: {report_to} is not installed (pip install {report_to}); not reporting")
        report_to = "none"
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in trl_fields()}
    resolved = {"bf16": bf16, "report_to": report_to, "activation_checkpointing": cfg.gradient_checkpointing}
    fixed = {"max_length": None} | {name: value for name, (value, _) in TRL_FIXED.items()}
    try:
        return DPOConfig(**(shared | resolved | TRL_DEFAULTS | cfg.trl | fixed))
    except (ValueError, TypeError) as e:
        raise DataError(f"trl.DPOConfig refused the settings: {e}"[:800]) from None


def train_dpo(cfg, *, log=None, callbacks=None) -> TrainResult:
    """Run DPO as ``cfg`` (from ``load_config(path, "dpo", ...)``) says; returns the run's ``TrainResult``.

    ``log`` takes each progress line (default: stderr, main process only); ``callbacks`` are extra
    ``transformers.TrainerCallback`` objects (the tests use one to look at the trained model)."""
    import torch

    start = time.perf_counter()
    args = dpo_args(cfg, log=_main_only(log))  # first: it sets up the (possibly distributed) process state
    log = _main_only(log, args)

    model, processor = load_vlm(cfg.model, dtype=cfg.torch_dtype, use_cpu=cfg.use_cpu,
                                attn_implementation=cfg.attn_implementation)
    with args.main_process_first(desc="prepare SPA-VL pairs"):  # other ranks then read the datasets cache
        rows = rows_for(cfg, cfg.split, samples=cfg.max_samples)
        train_ds, report = prepare_preferences(rows, processor, max_length=cfg.max_length, log=log)
        eval_ds = eval_pairs(cfg, processor, log)
    ref_model = None
    if not cfg.lora:
        # The frozen reference: a second copy (bf16 when training in bf16 mixed precision: forward only).
        dtype = resolve_dtype(cfg.torch_dtype, device=default_device(cfg.use_cpu))
        ref_dtype = torch.bfloat16 if args.bf16 and dtype == torch.float32 else dtype
        ref_model, _ = load_vlm(cfg.model, dtype=ref_dtype, use_cpu=cfg.use_cpu,
                                attn_implementation=cfg.attn_implementation)
    trainer = make_trainer(cfg, args, model, processor, train_ds, eval_ds, ref_model=ref_model, log=log,
                           callbacks=callbacks)

    output = trainer.train()
    metrics = _metrics(trainer.state.log_history, output.training_loss)
    if eval_ds is not None and "eval_loss" not in metrics:  # the Trainer evaluates at the last step itself
        metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
    trainer.save_model(args.output_dir)  # main process writes; LoRA: adapter + projector; full: the whole model

    world = args.world_size
    samples = trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    if args.max_steps <= 0:  # whole epochs: the last batch of each may be short
        samples = min(samples, len(train_ds) * math.ceil(args.num_train_epochs))
    result = TrainResult(kind="dpo", output_dir=str(args.output_dir), steps=trainer.state.global_step,
                         samples=samples, seconds=time.perf_counter() - start, metrics=metrics, dropped=report.dropped)
    if trainer.is_world_process_zero():
        processor.save_pretrained(args.output_dir)
        write_model_card(args.output_dir, cfg, result, pairs=report.kept)
        write_record(args.output_dir, cfg, result, processes=world, data={
            "rows": report.rows, "kept": report.kept, "dropped": report.dropped, "max_length": report.max_length})
    return result


def demo_run(model: str, dataset: str, output_dir: str, *, config_name: str = "default", steps: int = 2,
             limit: int | None = 32, log=None) -> str:
    """Two DPO steps (LoRA) of a tiny model on a dataset folder with ``tiny-dpo.yaml``: the one-line summary.

    For ``spa-vl demo``: ``demo_run("demo_out/models/tiny-llava", "demo_out/spa_vl", "demo_out/runs/dpo")``."""
    from training.config import load_config

    cfg = load_config("tiny-dpo", "dpo", model=str(model), dataset=str(dataset), output_dir=str(output_dir),
                      config_name=config_name, max_steps=steps, limit=limit)
    return train_dpo(cfg, log=log or (lambda message: None)).line()


def make_trainer(cfg, args, model, processor, train_ds, eval_ds=None, *, ref_model=None, log=None, callbacks=None):
    """trl's ``DPOTrainer`` on an already loaded model in our training mode and prompt format (``train_dpo`` and
    the GPU bench).

    Freezes the vision tower; with ``cfg.lora`` hands trl our ``lora_config`` (trl wraps the model, and the
    reference is the model with adapters disabled); without it ``ref_model`` (a frozen copy) is the reference
    (None: trl loads one from the model's ``name_or_path``). Batches come from ``builder.vlm.chat``'s collator:
    the prompt as every other path encodes it (BOS included), each answer ending with EOS."""
    import torch
    from transformers.trainer_utils import IntervalStrategy
    from trl import DPOTrainer

    log = log or _stderr
    if eval_ds is not None and "eval_strategy" not in cfg.trl:  # a run's own --eval_strategy stands
        args.eval_strategy = IntervalStrategy.STEPS
    if args.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        log(f"gradient checkpointing: not supported by {type(model).__name__}; off")
        args.gradient_checkpointing = args.activation_checkpointing = False
    peft_config = lora_config(model, cfg)
    model = apply_training_mode(model, cfg, add_lora=False)  # freeze the vision tower; LoRA is added by trl
    if not cfg.lora:
        if ref_model is not None:
            ref_model.requires_grad_(False).eval()
        dtype = next(p for p in model.parameters() if p.requires_grad).dtype
        if dtype in (torch.bfloat16, torch.float16):
            log(f"warning: full fine-tune with {dtype} weights: AdamW steps below their resolution are lost; "
                "set torch_dtype: float32 (bf16 autocast keeps the speed)")
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=processor, peft_config=peft_config, callbacks=callbacks,
                         data_collator=PreferenceCollator(ChatFormat(processor)))
    if cfg.lora and (args.bf16 or args.fp16):
        # Under autocast the few trainable weights (adapters: already fp32 from peft; the projector copy)
        # become fp32 master weights: a bf16 projector would round 2e-5 steps away.
        upcast_trainable(trainer.model)
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    log(f"dpo: {f'LoRA r={cfg.lora.r}' if cfg.lora else 'full fine-tune'}, vision tower "
        f"{'frozen' if cfg.lora or cfg.freeze_vision_tower else 'trained'}; "  # peft freezes the base
        f"{trainable_summary(trainer.model)}; {batch} pairs per optimizer step ({args.per_device_train_batch_size} "
        f"x {args.gradient_accumulation_steps} accumulation x {args.world_size} processes)")
    return trainer


def eval_pairs(cfg, processor, log):
    """``cfg.eval_samples`` pairs of the eval split drawn evenly over class3 (all with None), or None: no
    eval_split, the config has no such split, or nothing fits."""
    split = cfg.eval_split
    if not split:
        return None
    try:
        rows = rows_for(cfg, split, samples=cfg.eval_samples)
    except DataError as e:
        if "split" not in str(e).lower():
            raise
        log(f"eval: config {cfg.config_name!r} has no {split!r} split; training without evaluation")
        return None
    if len(rows) == 0:
        log(f"eval: the {split!r} split is empty (after filters); training without evaluation")
        return None
    try:
        pairs, _ = prepare_preferences(rows, processor, max_length=cfg.max_length, log=lambda m: log(f"eval {m}"))
    except DataError as e:
        log(f"eval: {e}; training without evaluation")
        return None
    return pairs


def _metrics(history: list[dict], training_loss: float | None) -> dict:
    """First and last logged train loss, and the last reward accuracy / margin trl logged."""
    steps = [h for h in history if "loss" in h and "eval_loss" not in h]
    out = {}
    if steps:
        out["loss_first"] = float(steps[0]["loss"])
        out["loss"] = float(steps[-1]["loss"])
    elif training_loss is not None:
        out["loss"] = float(training_loss)
    for key in ("rewards/accuracies", "rewards/margins"):
        found = [h[key] for h in history if key in h and "eval_loss" not in h]
        if found:
            out[key] = float(found[-1])
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    if evals:
        out["eval_loss"] = float(evals[-1])
    return out


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _main_only(log, args=None):
    """``log`` (default: stderr) on the main process only (before ``args`` exist: rank 0 of the launcher)."""
    log = log or _stderr
    main = os.environ.get("RANK", "0") == "0" if args is None else args.process_index == 0
    return log if main else (lambda message: None)

