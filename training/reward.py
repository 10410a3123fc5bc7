"""A reward model for VLMs: the VLM's backbone plus a linear head on the last token, trained on SPA-VL pairs.

    spa-vl train rm --config llava-1.5-7b-rm --dataset path/to/spa_vl --output_dir runs/rm
    accelerate launch -m builder.cli train rm --config llava-1.5-7b-rm ...      # several GPUs

    rm = VLMRewardModel.from_pretrained("runs/rm")
    batch = preference_batch(rows, processor)        # chosen rows, then rejected rows
    scores = rm.score(**batch)                       # one scalar per row

As in the paper (and the authors' SPA-VL-RLHF code): the loss is −log σ(r_chosen − r_rejected), the
reward is the head's output on the last non-padding token (the answer's end-of-sequence token), the
vision tower is frozen and the projector trained, LoRA or the whole language model. The chosen and
rejected answers of a batch go through the model in one forward pass (2B rows).

A saved reward model is the backbone (a full model, or a LoRA adapter over its base) plus
``value_head.safetensors`` and ``reward_model.json``; PPO starts its value model from it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from builder.errors import DataError
from training.config import TrainResult
from training.data import load_rows, prepare_preferences
from training.models import apply_training_mode, load_vlm, trainable_summary

HEAD_FILE = "value_head.safetensors"
META_FILE = "reward_model.json"
RECORD_FILE = "spa_vl_train.json"
SECRET_HINTS = ("token", "secret", "password", "api_key")  # never written to the record
STALE_FILES = {RECORD_FILE, META_FILE, HEAD_FILE, "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
               "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json"}


class VLMRewardModel(nn.Module):
    """A VLM backbone and ``value_head`` (hidden → 1): a scalar for every token; the reward is the last one's.

    ``backbone`` is an ``AutoModelForImageTextToText`` (or a PeftModel around one); its inner model
    (``backbone.model``: vision tower, projector, language model, no LM head) gives the hidden states.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.get_input_embeddings().embedding_dim
        self.value_head = nn.Linear(hidden, 1)
        nn.init.normal_(self.value_head.weight, std=1 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.value_head.bias)
        # The LM head is never used: frozen, so neither the optimizer nor DDP waits for its gradient.
        lm_head, embeddings = backbone.get_output_embeddings(), backbone.get_input_embeddings()
        if lm_head is not None and lm_head.weight is not embeddings.weight:
            lm_head.weight.requires_grad_(False)

    def forward(self, input_ids, attention_mask, **inputs) -> torch.Tensor:
        """Values of every position, ``[batch, seq]`` (float32). ``inputs``: pixel_values and the like."""
        base = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        inner = getattr(base, "model", None)
        if isinstance(inner, nn.Module):  # the usual layout: wrapper.model returns hidden states, no logits
            hidden = inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs)[0]
        else:
            out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       output_hidden_states=True, **inputs)
            hidden = out.hidden_states[-1]
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def score(self, input_ids, attention_mask, **inputs) -> torch.Tensor:
        """The reward of each row, ``[batch]``: the value at its last non-padding token."""
        return last_token(self(input_ids, attention_mask, **inputs), attention_mask)

    def save_pretrained(self, path) -> None:
        """The backbone (a full model, or only the LoRA adapter), the head and a small json."""
        from safetensors.torch import save_file

        path = Path(path)
        self.backbone.save_pretrained(path)
        head = {k: v.detach().float().cpu().contiguous() for k, v in self.value_head.state_dict().items()}
        save_file(head, path / HEAD_FILE)
        meta = {"hidden_size": self.value_head.in_features, "adapter": hasattr(self.backbone, "peft_config"),
                "head": HEAD_FILE, "score": "value_head on the last non-padding token"}
        (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path, *, dtype="auto", use_cpu: bool = False, attn_implementation: str | None = None,
                        train_cfg: dict | None = None) -> VLMRewardModel:
        """A saved reward model. Frozen (eval mode), unless ``train_cfg`` is given: then its backbone is made
        trainable as that config says (LoRA or full, vision tower frozen), a saved adapter merged first."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / META_FILE).is_file():
            raise DataError(f"not a reward model folder (no {META_FILE}); write one with `spa-vl train rm`",
                            file=str(path), field="reward_model")
        backbone = load_backbone(str(path), train_cfg or {"lora": None}, dtype=dtype, use_cpu=use_cpu,
                                 attn_implementation=attn_implementation, trainable=train_cfg is not None)[0]
        model = cls(backbone)
        model.value_head.load_state_dict(load_file(path / HEAD_FILE))
        model.value_head.to(next(backbone.parameters()).device)
        if train_cfg is None:
            model.requires_grad_(False)
            model.eval()
        return model


def last_token(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``values[i, j]`` at each row's last position ``j`` with ``attention_mask == 1`` (left or right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask).argmax(-1)
    return values.gather(1, last[:, None]).squeeze(1)


def load_backbone(path: str, cfg: dict, *, dtype="auto", use_cpu: bool = False, attn_implementation=None,
                  trainable: bool = True):
    """Model and processor, ready to train as ``cfg`` says (see ``apply_training_mode``).

    A LoRA adapter folder is merged into its base first, so a new run trains new adapters (or the full
    model) on top of it. With ``gradient_checkpointing`` the backbone recomputes activations in the
    backward pass. ``trainable=False``: loaded as saved (frozen by the caller).
    """
    model, processor = load_vlm(path, dtype=dtype, use_cpu=use_cpu, attn_implementation=attn_implementation)
    if not trainable:
        return model, processor
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = apply_training_mode(model, cfg)
    if mixed_precision(cfg) == "bf16":
        # Under bf16 autocast, trainable bf16 weights (a full LM, the projector copy) become float32
        # master weights: AdamW steps of 1e-6..3e-5 are below bf16's resolution and would be lost.
        for p in model.parameters():
            if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
                p.data = p.data.float()
    if cfg.get("gradient_checkpointing") and getattr(model, "supports_gradient_checkpointing", True):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, processor


def preference_batch(rows: list[dict], processor) -> dict:
    """Chosen rows then rejected rows of a batch of conversational pairs, tokenized with their images (2B rows).

    Each row is rendered by the processor's chat template (prompt + answer, end-of-turn included), so
    the last non-padding token is the answer's end.
    """
    texts, images = [], []
    for answer in ("chosen", "rejected"):
        for row in rows:
            texts.append(processor.apply_chat_template(row["prompt"] + row[answer], tokenize=False))
            images.extend(image.convert("RGB") for image in row["images"])
    return dict(processor(text=texts, images=images, padding=True, add_special_tokens=False, return_tensors="pt"))


def mixed_precision(cfg: dict) -> str:
    """``bf16`` on a GPU that supports it (``bf16: auto``) or when asked; else ``no``."""
    if cfg.get("use_cpu") or not torch.cuda.is_available():
        return "no"
    bf16 = cfg.get("bf16", "auto")
    if bf16 == "auto":
        bf16 = torch.cuda.is_bf16_supported()
    return "bf16" if bf16 else "no"


def make_accelerator(cfg: dict, log=None, **kwargs):
    """An ``accelerate.Accelerator`` for the run (one process, or as many as ``accelerate launch`` starts),
    tracking to TensorBoard or trackio when asked for and installed, and ``say``: ``log`` on the main
    process only (stderr by default)."""
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available, is_trackio_available

    report = cfg.get("report_to") or "none"
    installed = {"tensorboard": is_tensorboard_available(), "trackio": is_trackio_available()}
    log_with = report if installed.get(report) else None
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg), cpu=bool(cfg.get("use_cpu")), log_with=log_with,
                              project_dir=cfg["output_dir"], **kwargs)
    say = (log or _stderr) if accelerator.is_main_process else (lambda message: None)
    if report != "none" and not log_with:
        say(f"report_to={report}, but {report} is not installed: logging to the console only")
    if log_with:
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.items()}
        accelerator.init_trackers(f"spa-vl-{cfg['kind']}", config=flat)
    return accelerator, say


def save_run(accelerator, cfg: dict, write, result: TrainResult | None = None, *, folder=None) -> None:
    """Write the run's model with ``write(folder)``, then ``spa_vl_train.json`` (main process only).

    Files are written to a hidden temp folder inside ``output_dir`` and moved into place when all are
    written, ``spa_vl_train.json`` last: its presence marks a complete save. The model files of an
    earlier save there are removed first (a stale adapter_config.json would make a full model load as
    an adapter); anything else (checkpoints, tracker logs) is kept.
    """
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out = Path(folder or cfg["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        for old in out.iterdir():
            if old.is_file() and (old.name in STALE_FILES or old.name.startswith("model-")):
                old.unlink()
        tmp = out / f".partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        config = {k: v for k, v in cfg.items() if not any(h in k.lower() for h in SECRET_HINTS)}
        record = {"kind": cfg["kind"], "config": config, "result": asdict(result) if result else None,
                  "versions": _versions()}
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == RECORD_FILE):
            dest = out / f.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(f, dest)
        tmp.rmdir()
    accelerator.wait_for_everyone()


def _versions() -> dict:
    import accelerate
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "peft": peft.__version__}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@torch.no_grad()
def evaluate_rm(model, loader, accelerator) -> dict:
    """Pairwise accuracy (r_chosen > r_rejected) and loss over a loader of preference batches."""
    model.eval()
    correct, losses = [], []
    for batch in loader:
        rewards = last_token(model(**batch), batch["attention_mask"])
        r_chosen, r_rejected = rewards.chunk(2)
        c, loss = accelerator.gather_for_metrics(((r_chosen > r_rejected).float(),
                                                  -F.logsigmoid(r_chosen - r_rejected)))
        correct.append(c)
        losses.append(loss)
    model.train()
    if not correct:
        return {}
    return {"eval_accuracy": torch.cat(correct).mean().item(), "eval_loss": torch.cat(losses).mean().item()}


def train_rm(cfg: dict, *, log=None) -> TrainResult:
    """Train a reward model on the preference rows of ``cfg`` (see ``training/configs/llava-1.5-7b-rm.yaml``).

    1. Load the VLM; freeze the vision tower; LoRA or the full language model (+ projector) trains.
    2. Pairs over ``max_length`` tokens are dropped (as the authors did), the rest batched chosen + rejected.
    3. AdamW, warm-up then cosine decay, gradient accumulation and clipping; bf16 autocast on a GPU.
    4. Validation accuracy every ``eval_steps`` and at the end; the model, processor and run record saved.
    """
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    started = time.time()
    accelerator, say = make_accelerator(cfg, log, gradient_accumulation_steps=int(cfg["gradient_accumulation_steps"]))
    set_seed(int(cfg["seed"]))

    backbone, processor = load_backbone(cfg["model"], cfg, dtype=cfg["torch_dtype"], use_cpu=cfg["use_cpu"],
                                        attn_implementation=cfg["attn_implementation"])
    processor.tokenizer.padding_side = "right"
    model = VLMRewardModel(backbone)
    say(trainable_summary(model))

    rows = {"revision": cfg["revision"], "filters": cfg["filters"], "limit": cfg["limit"]}
    eval_pairs = None
    with accelerator.main_process_first():  # the main process fills the datasets cache, the others reuse it
        pairs, report = prepare_preferences(load_rows(cfg["dataset"], cfg["config_name"], cfg["split"], **rows),
                                            processor, max_length=int(cfg["max_length"]), log=say)
        if cfg["eval_split"]:
            try:
                eval_rows = load_rows(cfg["dataset"], cfg["config_name"], cfg["eval_split"], **rows)
                eval_pairs, _ = prepare_preferences(eval_rows, processor, max_length=int(cfg["max_length"]),
                                                    log=lambda m: say(f"eval {m}"))
            except DataError as e:  # no such split, or nothing in it fits
                say(f"eval: {e}; training without evaluation")
    collate = partial(preference_batch, processor=processor)
    loader = DataLoader(pairs, batch_size=int(cfg["per_device_train_batch_size"]), shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(int(cfg["seed"])))
    eval_loader = None
    if eval_pairs is not None:
        eval_loader = DataLoader(eval_pairs, batch_size=int(cfg["per_device_eval_batch_size"]), collate_fn=collate)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=float(cfg["learning_rate"]),
                                  weight_decay=float(cfg["weight_decay"]))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    steps_per_epoch = math.ceil(len(loader) / int(cfg["gradient_accumulation_steps"]))
    total = int(cfg["max_steps"]) if int(cfg["max_steps"]) > 0 else steps_per_epoch * int(cfg["num_train_epochs"])
    scheduler = get_scheduler(cfg["lr_scheduler_type"], optimizer.optimizer, num_warmup_steps=int(cfg["warmup_steps"]),
                              num_training_steps=total)
    say(f"rm: {len(pairs):,} pairs, {total} optimizer steps of {int(cfg['per_device_train_batch_size'])} pairs × "
        f"{int(cfg['gradient_accumulation_steps'])} accumulation × {accelerator.num_processes} processes")

    step, samples, window, metrics = 0, 0, [], {}
    model.train()
    while step < total:
        for batch in loader:
            with accelerator.accumulate(model):
                rewards = last_token(model(**batch), batch["attention_mask"])
                r_chosen, r_rejected = rewards.chunk(2)
                loss = -F.logsigmoid(r_chosen - r_rejected).mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg["max_grad_norm"]:
                    accelerator.clip_grad_norm_(model.parameters(), float(cfg["max_grad_norm"]))
                optimizer.step()
                optimizer.zero_grad()
            samples += r_chosen.numel() * accelerator.num_processes
            window.append(torch.stack([loss.detach(), (r_chosen > r_rejected).float().mean().detach()]))
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            if step % max(1, int(cfg["logging_steps"])) == 0 or step == total:
                loss_mean, acc_mean = accelerator.reduce(torch.stack(window).mean(0), "mean").tolist()
                metrics = {"loss": loss_mean, "accuracy": acc_mean, "lr": scheduler.get_last_lr()[0]}
                window = []
                say(f"rm step {step}/{total}: loss {loss_mean:.4f}, accuracy {acc_mean:.3f}, lr {metrics['lr']:.3g}")
                accelerator.log({f"train/{k}": v for k, v in metrics.items()}, step=step)
            if eval_loader is not None and cfg["eval_steps"] and step < total and step % int(cfg["eval_steps"]) == 0:
                scores = evaluate_rm(model, eval_loader, accelerator)
                say(f"rm step {step}: eval accuracy {scores['eval_accuracy']:.3f}, eval loss {scores['eval_loss']:.4f}")
                accelerator.log({f"eval/{k.removeprefix('eval_')}": v for k, v in scores.items()}, step=step)
            if cfg["save_steps"] and step < total and step % int(cfg["save_steps"]) == 0:
                save_run(accelerator, cfg, partial(_write_rm, accelerator.unwrap_model(model), processor),
                         folder=Path(cfg["output_dir"]) / f"checkpoint-{step}")
            if step >= total:
                break

    if eval_loader is not None:
        scores = evaluate_rm(model, eval_loader, accelerator)
        if scores:
            say(f"rm: eval accuracy {scores['eval_accuracy']:.3f}, eval loss {scores['eval_loss']:.4f} "
                f"({cfg['eval_split']} split)")
            accelerator.log({f"eval/{k.removeprefix('eval_')}": v for k, v in scores.items()}, step=step)
            metrics.update(scores)
    result = TrainResult(kind="rm", output_dir=str(cfg["output_dir"]), steps=step, samples=samples,
                         seconds=time.time() - started, metrics={k: v for k, v in metrics.items() if k != "lr"},
                         dropped=report.dropped)
    save_run(accelerator, cfg, partial(_write_rm, accelerator.unwrap_model(model), processor), result)
    accelerator.end_training()
    return result


def _write_rm(model: VLMRewardModel, processor, folder: Path) -> None:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
