"""A reward model for VLMs: the VLM's backbone plus a linear head on the last token, trained on SPA-VL pairs.

    spa-vl train rm --config llava-1.5-7b-rm --dataset path/to/spa_vl --output_dir runs/rm
    accelerate launch -m builder.cli train rm --config llava-1.5-7b-rm ...      # several GPUs

    rm = VLMRewardModel.from_pretrained("runs/rm")
    batch = preference_batch(rows, processor)        # chosen rows, then rejected rows
    scores = rm.score(**batch)                       # one scalar per row

As in the paper (and the authors' SPA-VL-RLHF code): the loss is −log σ(r_chosen − r_rejected), the
reward is the head's output on the answer's EOS token (``</s>`` for LLaVA, ``<|im_end|>`` for Qwen: see
``builder.vlm.chat``), the last token of every sequence, which PPO reads at the same place; the vision
tower is frozen and the projector trained, LoRA or the whole language model. The chosen and rejected
answers of a batch go through the model in one forward pass (2B rows).

A saved reward model is the backbone (a full model, or a LoRA adapter over its base) plus
``value_head.safetensors`` and ``reward_model.json``; PPO starts its value model from it.
"""

from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from builder.errors import DataError
from builder.vlm.chat import ChatFormat
from builder.vlm.loading import load_vlm
from training.config import TrainResult, step_count
from training.data import prepare_preferences, rows_for
from training.models import apply_training_mode, trainable_summary, upcast_trainable
from training.run import make_accelerator, mixed_precision, save_run

HEAD_FILE = "value_head.safetensors"
META_FILE = "reward_model.json"


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
                "head": HEAD_FILE, "score": "value_head on the last token: the answer's EOS"}
        (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path, *, dtype="auto", use_cpu: bool = False, attn_implementation: str | None = None,
                        train_cfg=None) -> VLMRewardModel:
        """A saved reward model. Frozen (eval mode), unless ``train_cfg`` is given: then its backbone is made
        trainable as that config says (LoRA or full, vision tower frozen), a saved adapter merged first."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / META_FILE).is_file():
            raise DataError(f"not a reward model folder (no {META_FILE}); write one with `spa-vl train rm`",
                            file=str(path), field="reward_model")
        backbone = load_backbone(str(path), train_cfg, dtype=dtype, use_cpu=use_cpu,
                                 attn_implementation=attn_implementation)[0]
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


def load_backbone(path: str, cfg=None, *, dtype="auto", use_cpu: bool = False, attn_implementation=None):
    """Model and processor, ready to train as the settings ``cfg`` say (see ``apply_training_mode``).

    A LoRA adapter folder is merged into its base first, so a new run trains new adapters (or the full
    model) on top of it. With ``gradient_checkpointing`` the backbone recomputes activations in the
    backward pass. ``cfg=None``: loaded as saved (frozen by the caller).
    """
    model, processor = load_vlm(path, dtype=dtype, use_cpu=use_cpu, attn_implementation=attn_implementation)
    if cfg is None:
        return model, processor
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = apply_training_mode(model, cfg)
    if mixed_precision(cfg) == "bf16":  # trainable bf16 weights (a full LM, the projector copy) → float32 masters
        upcast_trainable(model)
    if cfg.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", True):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, processor


def preference_batch(rows: list[dict], processor) -> dict:
    """Chosen rows then rejected rows of a batch of conversational pairs, as model inputs (2B rows): the
    prompt format of ``builder.vlm.chat`` (the same as DPO's, PPO's and evaluate's), each answer followed by
    EOS, flush left, so a row's last non-padding token is its EOS."""
    chat = processor if isinstance(processor, ChatFormat) else ChatFormat(processor)
    batch = chat.pair_batch(rows)
    batch.pop("completion_mask")
    return batch


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


def train_rm(cfg, *, log=None) -> TrainResult:
    """Train a reward model on the preference rows of ``cfg`` (see ``training/configs/llava-1.5-7b-rm.yaml``).

    1. Load the VLM; freeze the vision tower; LoRA or the full language model (+ projector) trains.
    2. Pairs over ``max_length`` tokens are dropped (as the authors did), the rest batched chosen + rejected.
    3. AdamW, warm-up then cosine decay, gradient accumulation and clipping; bf16 autocast on a GPU.
    4. Accuracy on ``eval_samples`` validation pairs every ``eval_steps`` and at the end; the model,
       processor, run record and model card saved.
    """
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    started = time.time()
    accelerator, say = make_accelerator(cfg, log, gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    set_seed(cfg.seed)
    backbone, processor = load_backbone(cfg.model, cfg, dtype=cfg.torch_dtype, use_cpu=cfg.use_cpu,
                                        attn_implementation=cfg.attn_implementation)
    model = VLMRewardModel(backbone)
    say(trainable_summary(model))
    loader, eval_loader, report = _loaders(cfg, processor, accelerator, say)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    steps_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.num_train_epochs)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer.optimizer,
                              num_warmup_steps=step_count(cfg.warmup_steps, total), num_training_steps=total)
    say(f"rm: {report.kept:,} pairs, {total} optimizer steps of {cfg.per_device_train_batch_size} pairs × "
        f"{cfg.gradient_accumulation_steps} accumulation × {accelerator.num_processes} processes")
    write = partial(_write_rm, processor=processor)
    step, samples, metrics = _train_loop(cfg, model, optimizer, scheduler, loader, eval_loader, accelerator, say, total,
                                         write)
    if eval_loader is not None:
        scores = evaluate_rm(model, eval_loader, accelerator)
        if scores:
            say(f"rm: eval accuracy {scores['eval_accuracy']:.3f}, eval loss {scores['eval_loss']:.4f} "
                f"({cfg.eval_split} split)")
            accelerator.log({f"eval/{k.removeprefix('eval_')}": v for k, v in scores.items()}, step=step)
            metrics.update(scores)
    result = TrainResult(kind="rm", output_dir=str(cfg.output_dir), steps=step, samples=samples,
                         seconds=time.time() - started, metrics={k: v for k, v in metrics.items() if k != "lr"},
                         dropped=report.dropped)
    save_run(accelerator, cfg, partial(write, accelerator.unwrap_model(model)), result, pairs=report.kept)
    accelerator.end_training()
    return result


def _loaders(cfg, processor, accelerator, say):
    """The training pairs (shuffled with the seed) and the eval subset, batched by ``preference_batch``."""
    from torch.utils.data import DataLoader

    eval_pairs = None
    with accelerator.main_process_first():  # the main process fills the datasets cache, the others reuse it
        pairs, report = prepare_preferences(rows_for(cfg, cfg.split, samples=cfg.max_samples), processor,
                                            max_length=cfg.max_length, log=say)
        if cfg.eval_split:
            try:
                eval_pairs, _ = prepare_preferences(rows_for(cfg, cfg.eval_split, samples=cfg.eval_samples),
                                                    processor, max_length=cfg.max_length, log=lambda m: say(f"eval {m}"))
            except DataError as e:  # no such split, or nothing in it fits
                say(f"eval: {e}; training without evaluation")
    collate = partial(preference_batch, processor=ChatFormat(processor))
    loader = DataLoader(pairs, batch_size=cfg.per_device_train_batch_size, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(cfg.seed))
    eval_loader = None
    if eval_pairs is not None:
        eval_loader = DataLoader(eval_pairs, batch_size=cfg.per_device_eval_batch_size, collate_fn=collate)
    return loader, eval_loader, report


def _train_loop(cfg, model, optimizer, scheduler, loader, eval_loader, accelerator, say, total: int, write):
    """``total`` optimizer steps over the loader (again from the start as often as needed): (steps, samples,
    the last logged metrics)."""
    step, samples, window, metrics = 0, 0, [], {}
    every = {name: step_count(getattr(cfg, name), total) for name in ("logging_steps", "eval_steps", "save_steps")}
    model.train()
    while step < total:
        for batch in loader:
            with accelerator.accumulate(model):
                rewards = last_token(model(**batch), batch["attention_mask"])
                r_chosen, r_rejected = rewards.chunk(2)
                loss = -F.logsigmoid(r_chosen - r_rejected).mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            samples += r_chosen.numel() * accelerator.num_processes
            window.append(torch.stack([loss.detach(), (r_chosen > r_rejected).float().mean().detach()]))
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            if step % every["logging_steps"] == 0 or step == total:
                loss_mean, acc_mean = accelerator.reduce(torch.stack(window).mean(0), "mean").tolist()
                metrics = {"loss": loss_mean, "accuracy": acc_mean, "lr": scheduler.get_last_lr()[0]}
                window = []
                say(f"rm step {step}/{total}: loss {loss_mean:.4f}, accuracy {acc_mean:.3f}, lr {metrics['lr']:.3g}")
                accelerator.log({f"train/{k}": v for k, v in metrics.items()}, step=step)
            if eval_loader is not None and every["eval_steps"] and step < total and step % every["eval_steps"] == 0:
                scores = evaluate_rm(model, eval_loader, accelerator)
                say(f"rm step {step}: eval accuracy {scores['eval_accuracy']:.3f}, eval loss {scores['eval_loss']:.4f}")
                accelerator.log({f"eval/{k.removeprefix('eval_')}": v for k, v in scores.items()}, step=step)
            if every["save_steps"] and step < total and step % every["save_steps"] == 0:
                save_run(accelerator, cfg, partial(write, accelerator.unwrap_model(model)),
                         folder=Path(cfg.output_dir) / f"checkpoint-{step}")
            if step >= total:
                break
    return step, samples, metrics


def _write_rm(model: VLMRewardModel, folder: Path, *, processor) -> None:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
