"""PPO for VLMs on SPA-VL prompts, with a reward model from ``spa-vl train rm``: one small, readable loop.

    spa-vl train ppo --config llava-1.5-7b-ppo-lora --dataset path/to/spa_vl --reward_model runs/rm --output_dir runs/ppo
    accelerate launch -m builder.cli train ppo --config llava-1.5-7b-ppo-lora ...     # several GPUs (DDP)

The paper's setup (SPA-VL, after LLaVA-RLHF); the arithmetic is in ``training.ppo_core``:

- four models: the **policy** (trained; LoRA or full), a frozen **reference** (with LoRA: the same
  model with its adapters switched off), the frozen **reward model** and a **value model** that starts
  as a copy of the reward model and learns to predict returns token by token;
- per token, reward = −kl_coef · (log π − log π_ref), plus the reward model's score on the last
  response token; GAE with γ = λ = 1, advantages whitened over every process's response tokens;
- clipped policy loss (cliprange 0.2) plus vf_coef (0.1) × clipped value loss (cliprange_value 0.2).

Each iteration (``max_steps`` of them): ``rollout_batch_size`` prompts, all processes together, each
process sampling its own share of one shared shuffled order; ``rollout`` (generate, score, advantages;
no gradients), then ``update``: ``ppo_epochs`` passes, an optimizer step per ``mini_batch_size``
sequences (all processes together; forwards of ``per_device_train_batch_size``, the accumulation
follows from the number of processes), so a run keeps its batch on any number of GPUs.

Sampling is the policy's own distribution at ``temperature`` (no top-k/top-p, no repetition penalty,
whatever the checkpoint's generation config says) with the tokens an answer can never hold removed:
image placeholders, padding and other special tokens but EOS (``ChatFormat.unsampleable_ids``). The
log-probabilities use the same distribution. The reward model reads its score at the answer's EOS, as
it was trained (``builder.vlm.chat``); an answer cut at ``response_length`` gets an EOS appended for the
scoring and loses ``missing_eos_penalty``. Dropout is switched off everywhere, so the rollout's
log-probabilities and the first update's agree (ratio 1). The reward model must share the policy's
tokenizer: it scores the policy's tokens.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext

import torch
from torch import nn

from builder.errors import DataError
from builder.vlm.chat import ChatFormat, prompt_messages
from builder.vlm.loading import default_device, resolve_dtype
from training.config import TrainResult, step_count
from training.data import rows_for
from training.models import trainable_summary
from training.ppo_core import (
    advantages_and_returns,
    at_positions,
    penalize_missing_eos,
    policy_loss,
    response_mask,
    token_logprobs,
    value_loss,
)
from training.reward import VLMRewardModel, last_token, load_backbone
from training.run import make_accelerator, save_run


class PolicyAndValue(nn.Module):
    """Policy and value model as one module, so that one ``accelerator.prepare`` and one optimizer serve both."""

    def __init__(self, policy: nn.Module, value: VLMRewardModel):
        super().__init__()
        self.policy = policy
        self.value = value

    def forward(self, input_ids, attention_mask, positions, **images):
        """Logits and values at ``positions`` (``[B, T]``: the position before each response token)."""
        logits, start = policy_logits(self.policy, input_ids, attention_mask, positions, **images)
        values = self.value(input_ids, attention_mask, **images)
        return at_positions(logits, positions, start), at_positions(values, positions)


def policy_logits(model, input_ids, attention_mask, positions, **images):
    """The logits of the last positions a flush-left batch needs (from its earliest response position on), and
    the sequence position of the first one."""
    keep = input_ids.shape[1] - int(positions.min())
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep,
                   **images).logits
    return logits, input_ids.shape[1] - keep


def select_rows(batch: dict, idx: torch.Tensor) -> dict:
    """Rows ``idx`` of a processor batch. Qwen2-VL-style ``pixel_values`` (every image's patches in one
    tensor, ``image_grid_thw`` giving each image's grid) are split per row first."""
    out = {k: v[idx] for k, v in batch.items() if not (k == "pixel_values" and "image_grid_thw" in batch)}
    if "image_grid_thw" in batch:  # one image per row
        patches = batch["pixel_values"].split(batch["image_grid_thw"].prod(-1).tolist())
        out["pixel_values"] = torch.cat([patches[i] for i in idx.tolist()])
    return out


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def batch_plan(cfg, processes: int) -> dict:
    """Per-process sizes that keep the run's batches (all processes together) on ``processes`` processes."""
    per_device = cfg.per_device_train_batch_size
    if cfg.rollout_batch_size % processes or cfg.mini_batch_size % processes:
        raise DataError(f"rollout_batch_size ({cfg.rollout_batch_size}) and mini_batch_size ({cfg.mini_batch_size}) "
                        f"must be multiples of the number of processes ({processes})", field="rollout_batch_size")
    if cfg.rollout_batch_size % cfg.mini_batch_size:
        raise DataError(f"rollout_batch_size ({cfg.rollout_batch_size}) must be a multiple of mini_batch_size "
                        f"({cfg.mini_batch_size})", field="rollout_batch_size")
    local_mini = cfg.mini_batch_size // processes
    if local_mini % per_device:
        raise DataError(f"mini_batch_size / processes ({local_mini}) must be a multiple of per_device_train_batch_size "
                        f"({per_device})", field="per_device_train_batch_size")
    return {"rollout": cfg.rollout_batch_size // processes, "mini": local_mini, "forward": per_device,
            "accumulation": local_mini // per_device}


def encode_prompts(chat: ChatFormat, rows: dict):
    """Left-padded prompt inputs of rows with ``image`` and ``question`` (``builder.vlm.chat``'s format)."""
    return chat.prompt_inputs([prompt_messages(q) for q in rows["question"]], [[image] for image in rows["image"]])


def prompt_fits(batch: dict, chat: ChatFormat, room: int) -> list[bool]:
    """Batched: whether each prompt (image tokens as the processor counts them) leaves ``room`` tokens."""
    return (encode_prompts(chat, batch)["attention_mask"].sum(1) <= room).tolist()


def prompt_share(order: list[int], rank: int, processes: int) -> list[int]:
    """This process's contiguous share of one iteration's prompts (the same ``order`` on every process)."""
    size = len(order) // processes
    return order[rank * size:(rank + 1) * size]


class PPOTrainer:
    """The models, prompts and optimizer of one PPO run. ``train()`` alternates ``rollout`` and ``update``.

        trainer = PPOTrainer(load_config("tiny-ppo", "ppo", model=..., reward_model=...))
        result = trainer.train()          # what train_ppo(cfg) returns; trainer.policy, .reference, ... stay
    """

    def __init__(self, cfg, *, log=None):
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        self.cfg = cfg
        if not cfg.reward_model:
            raise DataError("required: the folder written by `spa-vl train rm` (--reward_model)", field="reward_model")
        self.accelerator, self.say = make_accelerator(cfg, log)
        self.plan = batch_plan(cfg, self.accelerator.num_processes)
        set_seed(cfg.seed)
        policy, value = self._load_models()
        self.chat = ChatFormat(self.processor)
        self.banned = self.chat.unsampleable_ids(policy.get_output_embeddings().weight.shape[0])
        self.prompts, self.dropped = self._load_prompts()
        self.prompt_rng = torch.Generator().manual_seed(cfg.seed)  # the same order on every process
        self.generator = torch.Generator().manual_seed(cfg.seed + self.accelerator.process_index)
        self.order: list[int] = []

        model = PolicyAndValue(policy, value)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                      weight_decay=cfg.weight_decay)
        self.iterations = cfg.max_steps if cfg.max_steps > 0 else \
            math.ceil(len(self.prompts) * cfg.num_train_epochs / cfg.rollout_batch_size)
        updates = self.iterations * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_training_steps=updates,
                                       num_warmup_steps=step_count(cfg.warmup_steps, updates))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.reward_model.to(self.accelerator.device)
        if self.reference is not None:
            self.reference.to(self.accelerator.device)

    def _load_models(self):
        """The policy, its frozen reference (with LoRA: the policy with adapters disabled), the frozen reward
        model, and the value model that starts from it (trainable as the policy is)."""
        cfg = self.cfg
        load = {"dtype": cfg.torch_dtype, "use_cpu": cfg.use_cpu, "attn_implementation": cfg.attn_implementation}
        policy, self.processor = load_backbone(cfg.model, cfg, **load)
        self.reference = None
        if not cfg.lora:
            # A copy in the dtype it was loaded in (the policy's trainable weights may have been upcast).
            dtype = resolve_dtype(cfg.torch_dtype, device=default_device(cfg.use_cpu))
            self.reference = copy.deepcopy(policy).to(dtype)
            self.reference.requires_grad_(False).eval()
        self.reward_model = VLMRewardModel.from_pretrained(cfg.reward_model, **load)
        value = VLMRewardModel.from_pretrained(cfg.reward_model, train_cfg=cfg, **load)
        vocab = policy.get_input_embeddings().num_embeddings
        if self.reward_model.backbone.get_input_embeddings().num_embeddings != vocab:
            raise DataError("the reward model's vocabulary differs from the policy's: train the RM from the same base",
                            field="reward_model")
        for model in (policy, self.reference, self.reward_model, value):
            if model is not None:
                disable_dropout(model)
        self.say(f"policy {trainable_summary(policy)}; value model {trainable_summary(value)}")
        return policy, value

    @property
    def policy(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model).policy

    @property
    def value_model(self) -> VLMRewardModel:
        return self.accelerator.unwrap_model(self.model).value

    def _load_prompts(self):
        """Image + question of each preference row; prompts too long to leave room for a response are dropped."""
        cfg = self.cfg
        rows = rows_for(cfg, cfg.split, samples=cfg.max_samples).select_columns(["image", "question"])
        with self.accelerator.main_process_first():  # the main process fills the datasets cache
            kept = rows.filter(prompt_fits, batched=True, batch_size=32, desc="prompt lengths",
                               fn_kwargs={"chat": self.chat, "room": cfg.max_length - cfg.response_length})
        dropped = len(rows) - len(kept)
        self.say(f"ppo: {len(kept):,} prompts ({dropped:,} dropped: no room for {cfg.response_length} response tokens "
                 f"within max_length {cfg.max_length})")
        if not len(kept):
            raise DataError("no prompt leaves room for a response; raise max_length or lower response_length",
                            field="max_length")
        return kept, dropped

    def next_prompts(self) -> dict:
        """This process's share of the next ``rollout_batch_size`` prompts of one shared shuffled order, each
        prompt used once per pass."""
        batch = []
        while len(batch) < self.cfg.rollout_batch_size:
            if not self.order:
                self.order = torch.randperm(len(self.prompts), generator=self.prompt_rng).tolist()
            batch.append(self.order.pop())
        accelerator = self.accelerator
        return self.prompts[prompt_share(batch, accelerator.process_index, accelerator.num_processes)]

    def encode(self, prompts: dict):
        return encode_prompts(self.chat, prompts)

    def generation_kwargs(self) -> dict:
        """Sampling from the policy's own distribution at ``temperature``: every setting that would reshape it
        is given explicitly, so a checkpoint's generation config (Qwen: top_k 1, repetition_penalty 1.05)
        does not apply; the unsampleable tokens are suppressed."""
        cfg = self.cfg
        return dict(do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
                    epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                    min_new_tokens=0, max_new_tokens=cfg.response_length, eos_token_id=self.chat.eos_token_id,
                    pad_token_id=self.chat.pad_token_id, suppress_tokens=self.banned)

    def sequences(self, inputs, response: torch.Tensor, mask: torch.Tensor, *, close: bool = False):
        """Prompt + response as a flush-left batch, and each response token's preceding position. ``close``:
        an answer cut before its EOS gets one (the reward model reads its score there)."""
        lengths = mask.sum(1).tolist()
        completions = []
        for row, n in zip(response.tolist(), lengths):
            ids = row[:n]
            if close and (not ids or ids[-1] != self.chat.eos_token_id):
                ids = ids + [self.chat.eos_token_id]
            completions.append(ids)
        batch = self.chat.sequences(inputs.to("cpu"), completions)
        batch.pop("completion_mask")
        batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
        starts = inputs["attention_mask"].sum(1).to(self.accelerator.device)
        positions = starts[:, None] - 1 + torch.arange(response.shape[1], device=starts.device)
        return batch, positions

    @torch.no_grad()
    def rollout(self, prompts: dict) -> dict:
        """Sample an answer to each prompt and compute everything the update needs, without gradients."""
        cfg, accelerator = self.cfg, self.accelerator
        inputs = self.encode(prompts).to(accelerator.device)
        self.model.eval()
        with accelerator.autocast():
            sequences = self.policy.generate(**inputs, **self.generation_kwargs())
            response = sequences[:, inputs["input_ids"].shape[1]:]
            mask = response_mask(response, self.chat.eos_token_id)
            response = response.masked_fill(mask == 0, self.chat.pad_token_id)
            has_eos = (response == self.chat.eos_token_id).any(1)
            batch, positions = self.sequences(inputs, response, mask)
            logits, values = self.model(**batch, positions=positions)
            logprobs, _ = token_logprobs(logits, response, cfg.temperature, self.banned)
            ref_logprobs, _ = token_logprobs(self._reference_logits(batch, positions), response, cfg.temperature,
                                             self.banned)
            scored, _ = self.sequences(inputs, response, mask, close=True)
            scores = last_token(self.reward_model(**scored), scored["attention_mask"])
        maskf = mask.float()
        values = values.float() * maskf
        out = advantages_and_returns(
            penalize_missing_eos(scores, has_eos, cfg.missing_eos_penalty), logprobs, ref_logprobs, values, maskf,
            kl_coef=cfg.kl_coef, gamma=cfg.gamma, lam=cfg.lam, whiten_advantages=cfg.whiten_advantages,
            reduce=lambda t: accelerator.reduce(t, "sum"))
        return {"batch": batch, "positions": positions, "response": response, "mask": maskf,
                "logprobs": logprobs * maskf, "values": values, "advantages": out["advantages"],
                "returns": out["returns"], "scores": scores, "kl": out["kl"].sum(1), "length": maskf.sum(1),
                "has_eos": has_eos.float()}

    def _reference_logits(self, batch, positions):
        if self.reference is None:
            with self.policy.disable_adapter():
                logits, start = policy_logits(self.policy, **batch, positions=positions)
        else:
            logits, start = policy_logits(self.reference, **batch, positions=positions)
        return at_positions(logits, positions, start)

    def loss(self, rollout: dict, idx: torch.Tensor):
        """The PPO loss of rollout rows ``idx`` and its statistics (policy loss, value loss, clipfrac, entropy,
        approximate KL between the rollout's and the current policy)."""
        cfg = self.cfg
        logits, values = self.model(**select_rows(rollout["batch"], idx), positions=rollout["positions"][idx])
        logprobs, entropy = token_logprobs(logits, rollout["response"][idx], cfg.temperature, self.banned)
        mask, old = rollout["mask"][idx], rollout["logprobs"][idx]
        pg, clipfrac = policy_loss(logprobs, old, rollout["advantages"][idx], mask, cfg.cliprange)
        vl = value_loss(values.float(), rollout["values"][idx], rollout["returns"][idx], mask, cfg.cliprange_value)
        with torch.no_grad():
            approx_kl = 0.5 * (((logprobs - old) * mask) ** 2).sum() / mask.sum().clamp(min=1)
            stats = torch.stack([pg, vl, clipfrac, (entropy * mask).sum() / mask.sum().clamp(min=1), approx_kl])
        return pg + cfg.vf_coef * vl, stats.detach()

    def update(self, rollout: dict) -> dict:
        """``ppo_epochs`` passes over this process's rollout rows in shuffled mini-batches; one optimizer step
        per mini-batch (its forwards accumulated, gradients synchronised on the last)."""
        cfg, accelerator, plan = self.cfg, self.accelerator, self.plan
        rows, stats = rollout["response"].shape[0], []
        self.model.train()
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(rows, generator=self.generator).to(rollout["response"].device)
            for mini in order.split(plan["mini"]):
                chunks = mini.split(plan["forward"])
                for k, idx in enumerate(chunks):
                    sync = k == len(chunks) - 1
                    with nullcontext() if sync else accelerator.no_sync(self.model):
                        loss, step_stats = self.loss(rollout, idx)
                        accelerator.backward(loss / len(chunks))
                    stats.append(step_stats)
                if cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
                self.scheduler.step()
        means = accelerator.reduce(torch.stack(stats).mean(0), "mean").tolist()
        return dict(zip(("policy_loss", "value_loss", "clipfrac", "entropy", "approx_kl"), means))

    def train(self) -> TrainResult:
        """``max_steps`` iterations of rollout + update, logged; then the policy is saved."""
        started, cfg, accelerator = time.time(), self.cfg, self.accelerator
        self.say(f"ppo: {self.iterations} iterations of {cfg.rollout_batch_size} prompts ({self.plan['rollout']} on "
                 f"each of {accelerator.num_processes} processes), {cfg.ppo_epochs} epoch(s) each, an optimizer step "
                 f"per {cfg.mini_batch_size} sequences ({self.plan['forward']} per forward x "
                 f"{self.plan['accumulation']} accumulation x {accelerator.num_processes} processes)")
        metrics, samples = {}, 0
        log_every, save_every = (step_count(getattr(cfg, name), self.iterations)
                                 for name in ("logging_steps", "save_steps"))
        for iteration in range(1, self.iterations + 1):
            rollout = self.rollout(self.next_prompts())
            stats = self.update(rollout)
            figures = torch.stack([rollout[k].mean() for k in ("scores", "kl", "length", "has_eos")])
            reward, kl, length, eos_rate = accelerator.reduce(figures, "mean").tolist()
            metrics = {"reward": reward, "kl": kl, **stats, "response_length": length, "eos_rate": eos_rate,
                       "lr": self.scheduler.get_last_lr()[0]}
            samples += cfg.rollout_batch_size
            if iteration % log_every == 0 or iteration in (1, self.iterations):
                self.say(f"ppo iteration {iteration}/{self.iterations}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in metrics.items()))
            accelerator.log({f"ppo/{k}": v for k, v in metrics.items()}, step=iteration)
            if save_every and iteration < self.iterations and iteration % save_every == 0:
                save_run(accelerator, cfg, self._write, folder=f"{cfg.output_dir}/checkpoint-{iteration}")
        result = TrainResult(kind="ppo", output_dir=str(cfg.output_dir), steps=self.iterations, samples=samples,
                             seconds=time.time() - started, dropped=self.dropped,
                             metrics={k: metrics[k] for k in ("reward", "kl", "policy_loss", "value_loss") if k in metrics})
        save_run(accelerator, cfg, self._write, result, pairs=len(self.prompts))
        accelerator.end_training()
        return result

    def _write(self, folder) -> None:
        """The policy (a LoRA adapter, or the full model) and the processor."""
        self.policy.save_pretrained(folder)
        self.processor.save_pretrained(folder)


def train_ppo(cfg, *, log=None) -> TrainResult:
    """Train the policy of ``cfg`` with PPO against ``cfg.reward_model`` (see ``PPOTrainer``)."""
    return PPOTrainer(cfg, log=log).train()
