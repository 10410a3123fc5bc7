"""PPO for VLMs on SPA-VL prompts, with a reward model from ``spa-vl train rm``: one small, readable loop.

    spa-vl train ppo --config llava-1.5-7b-ppo-lora --dataset path/to/spa_vl --reward_model runs/rm --output_dir runs/ppo
    accelerate launch -m builder.cli train ppo --config llava-1.5-7b-ppo-lora ...     # several GPUs (DDP)

The paper's setup (SPA-VL, after LLaVA-RLHF), in the style of "The N implementation details of RLHF
with PPO" (Huang et al.), small:

- four models: the **policy** (trained; LoRA or full), a frozen **reference** (with LoRA: the same
  model with its adapters switched off), the frozen **reward model** and a **value model** that starts
  as a copy of the reward model and learns to predict returns token by token;
- per token, reward = −kl_coef · (log π − log π_ref), plus the reward model's score on the last
  response token; GAE with γ = λ = 1, whitened advantages;
- clipped policy loss (cliprange 0.2) plus vf_coef (0.1) × clipped value loss (cliprange_value 0.2).

Each iteration (``max_steps`` of them): sample ``rollout_batch_size`` prompts (image + question),
``rollout`` (generate, score, advantages; no gradients), then ``update`` (``ppo_epochs`` passes over
mini-batches of ``mini_batch_size``, an optimizer step every ``gradient_accumulation_steps`` of them).
Dropout is switched off everywhere, so the log-probabilities of the rollout and of the first update
pass agree (ratio 1). The reward model must share the policy's tokenizer: it scores the policy's tokens.
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from builder.errors import DataError
from training.config import TrainResult
from training.data import load_rows, prompt_messages
from training.models import resolve_dtype, trainable_summary
from training.reward import (
    VLMRewardModel,
    last_token,
    load_backbone,
    make_accelerator,
    save_run,
)


class PolicyAndValue(nn.Module):
    """Policy and value model as one module, so that one ``accelerator.prepare`` and one optimizer serve both."""

    def __init__(self, policy: nn.Module, value: VLMRewardModel):
        super().__init__()
        self.policy = policy
        self.value = value

    def forward(self, input_ids, attention_mask, response_length: int, **images):
        """Logits and values at the positions that predict the last ``response_length`` tokens."""
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                             logits_to_keep=response_length + 1, **images).logits[:, :-1]
        values = self.value(input_ids, attention_mask, **images)[:, -response_length - 1:-1]
        return logits, values


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``x`` scaled to unit variance over the unmasked entries (unbiased), and to zero mean with ``shift_mean``."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 1.0):
    """Generalised advantage estimation over each response, backwards from its last token.

    δ_t = r_t + γ·V_{t+1} − V_t and A_t = δ_t + γλ·A_{t+1}, with V and r zero after the response ends;
    returns = A + V (the value model's targets). All tensors ``[batch, tokens]``; returns (advantages, returns).
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def response_mask(response: torch.Tensor, eos_token_id) -> torch.Tensor:
    """1 for the response's tokens up to and including its first end-of-sequence token, 0 after (padding)."""
    eos = torch.isin(response, torch.as_tensor(eos_token_id, device=response.device).flatten())
    after_eos = (eos.cumsum(1) - eos.long()) > 0
    return (~after_eos).long()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float):
    """Log-probabilities of ``tokens`` under ``logits / temperature`` (as sampled), and each position's entropy
    (a statistic: no gradient)."""
    logp = F.log_softmax(logits.float() / temperature, -1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1), entropy


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


class PPOTrainer:
    """The models, prompts and optimizer of one PPO run. ``train()`` alternates ``rollout`` and ``update``.

        trainer = PPOTrainer(load_config("tiny-ppo", "ppo", model=..., reward_model=...))
        result = trainer.train()          # what train_ppo(cfg) returns; trainer.policy, .reference, ... stay
    """

    def __init__(self, cfg: dict, *, log=None):
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        self.cfg = cfg
        if not cfg.get("reward_model"):
            raise DataError("required: the folder written by `spa-vl train rm` (--reward_model)", field="reward_model")
        per_step = int(cfg["mini_batch_size"]) * int(cfg["gradient_accumulation_steps"])
        if int(cfg["rollout_batch_size"]) % per_step:
            raise DataError(f"rollout_batch_size must be a multiple of mini_batch_size × gradient_accumulation_steps "
                            f"({per_step})", field="rollout_batch_size")
        self.accelerator, self.say = make_accelerator(cfg, log, gradient_accumulation_steps=int(cfg["gradient_accumulation_steps"]))
        set_seed(int(cfg["seed"]))
        load = {"dtype": cfg["torch_dtype"], "use_cpu": cfg["use_cpu"], "attn_implementation": cfg["attn_implementation"]}

        # The policy, and its frozen reference (with LoRA: the policy itself with the adapters disabled).
        policy, self.processor = load_backbone(cfg["model"], cfg, **load)
        self.reference = None
        if not cfg["lora"]:
            # A copy in the dtype it was loaded in (the policy's trainable weights may have been upcast).
            self.reference = copy.deepcopy(policy).to(resolve_dtype(cfg["torch_dtype"], use_cpu=cfg["use_cpu"]))
            self.reference.requires_grad_(False).eval()
        # The frozen reward model, and the value model that starts from it (trainable as the policy is).
        self.reward_model = VLMRewardModel.from_pretrained(cfg["reward_model"], **load)
        value = VLMRewardModel.from_pretrained(cfg["reward_model"], train_cfg=cfg, **load)
        vocab = policy.get_input_embeddings().num_embeddings
        if self.reward_model.backbone.get_input_embeddings().num_embeddings != vocab:
            raise DataError("the reward model's vocabulary differs from the policy's: train the RM from the same base",
                            field="reward_model")
        for model in (policy, self.reference, self.reward_model, value):
            if model is not None:
                disable_dropout(model)
        self.say(f"policy {trainable_summary(policy)}; value model {trainable_summary(value)}")

        self.prompts, self.dropped = self._load_prompts()
        self.generator = torch.Generator().manual_seed(int(cfg["seed"]) + self.accelerator.process_index)
        self.order: list[int] = []

        model = PolicyAndValue(policy, value)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=float(cfg["learning_rate"]), weight_decay=float(cfg["weight_decay"]))
        self.iterations = int(cfg["max_steps"]) if int(cfg["max_steps"]) > 0 else int(cfg["num_train_epochs"]) * \
            math.ceil(len(self.prompts) / (int(cfg["rollout_batch_size"]) * self.accelerator.num_processes))
        updates = self.iterations * int(cfg["ppo_epochs"]) * int(cfg["rollout_batch_size"]) // per_step
        self.scheduler = get_scheduler(cfg["lr_scheduler_type"], optimizer, num_warmup_steps=int(cfg["warmup_steps"]),
                                       num_training_steps=updates)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        device = self.accelerator.device
        self.reward_model.to(device)
        if self.reference is not None:
            self.reference.to(device)

    @property
    def policy(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model).policy

    @property
    def value_model(self) -> VLMRewardModel:
        return self.accelerator.unwrap_model(self.model).value

    def _load_prompts(self):
        """Image + question of each preference row; prompts too long to leave room for a response are dropped."""
        cfg = self.cfg
        rows = load_rows(cfg["dataset"], cfg["config_name"], cfg["split"], revision=cfg["revision"],
                         filters=cfg["filters"], limit=cfg["limit"]).select_columns(["image", "question"])
        # The rendered prompt's tokens, its <image> placeholder expanded to image_seq_length (LLaVA: 576).
        processor = self.processor
        room = int(cfg["max_length"]) - int(cfg["response_length"]) - int(getattr(processor, "image_seq_length", 1) or 1) + 1

        def fits(questions):
            texts = [processor.apply_chat_template(prompt_messages(q), add_generation_prompt=True, tokenize=False)
                     for q in questions]
            return [len(ids) <= room for ids in processor.tokenizer(texts, add_special_tokens=False)["input_ids"]]

        with self.accelerator.main_process_first():  # the main process fills the datasets cache
            kept = rows.filter(fits, input_columns=["question"], batched=True, desc="prompt lengths")
        dropped = len(rows) - len(kept)
        self.say(f"ppo: {len(kept):,} prompts ({dropped:,} dropped: no room for {cfg['response_length']} response tokens "
                 f"within max_length {cfg['max_length']})")
        if not len(kept):
            raise DataError("no prompt leaves room for a response; raise max_length or lower response_length",
                            field="max_length")
        return kept, dropped

    def next_prompts(self) -> dict:
        """The next ``rollout_batch_size`` prompts of this process, shuffled, each used once per pass."""
        batch = []
        while len(batch) < int(self.cfg["rollout_batch_size"]):
            if not self.order:
                self.order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
            batch.append(self.order.pop())
        return self.prompts[batch]

    @torch.no_grad()
    def rollout(self, prompts: dict) -> dict:
        """Generate a response to each prompt and compute everything the update needs, without gradients.

        1. Left-padded prompts, sampled answers (temperature, no top-k/top-p), at most ``response_length``
           tokens; tokens after the first end-of-sequence token are masked out.
        2. Log-probabilities of the response tokens under the policy and the reference, values of the
           value model (at the positions that predict each token), the reward model's score (last token).
        3. Per-token rewards −kl_coef·KL, plus the score on the last token; GAE advantages and returns;
           advantages whitened.
        """
        cfg, accelerator, processor = self.cfg, self.accelerator, self.processor
        processor.tokenizer.padding_side = "left"
        texts = [processor.apply_chat_template(prompt_messages(q), add_generation_prompt=True, tokenize=False)
                 for q in prompts["question"]]
        images = [image.convert("RGB") for image in prompts["image"]]
        inputs = processor(text=texts, images=images, padding=True, add_special_tokens=False,
                           return_tensors="pt").to(accelerator.device)
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        eos = self.policy.generation_config.eos_token_id
        if eos is None:
            eos = processor.tokenizer.eos_token_id
        pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else eos
        self.model.eval()
        with accelerator.autocast():
            sequences = self.policy.generate(
                **inputs, do_sample=True, temperature=float(cfg["temperature"]), top_k=0, top_p=1.0,
                max_new_tokens=int(cfg["response_length"]), eos_token_id=eos, pad_token_id=pad)
            prompt_length = inputs["input_ids"].shape[1]
            response = sequences[:, prompt_length:]
            mask = response_mask(response, eos)
            response = response.masked_fill(mask == 0, pad)
            batch = {"input_ids": torch.cat([inputs["input_ids"], response], 1),
                     "attention_mask": torch.cat([inputs["attention_mask"], mask], 1), **extra}
            R = response.shape[1]
            logits, values = self.model(**batch, response_length=R)
            logprobs, _ = token_logprobs(logits, response, float(cfg["temperature"]))
            if self.reference is None:
                with self.policy.disable_adapter():
                    ref_logits = self.policy(**batch, use_cache=False, logits_to_keep=R + 1).logits[:, :-1]
            else:
                ref_logits = self.reference(**batch, use_cache=False, logits_to_keep=R + 1).logits[:, :-1]
            ref_logprobs, _ = token_logprobs(ref_logits, response, float(cfg["temperature"]))
            scores = last_token(self.reward_model(**batch), batch["attention_mask"])

        maskf = mask.float()
        kl = (logprobs - ref_logprobs) * maskf
        rewards = -float(cfg["kl_coef"]) * kl
        last = mask.sum(1) - 1  # every response has at least one token
        rewards[torch.arange(len(rewards), device=rewards.device), last] += scores
        values = values.float() * maskf
        advantages, returns = gae(rewards, values, maskf, float(cfg["gamma"]), float(cfg["lam"]))
        if cfg["whiten_advantages"]:
            advantages = whiten(advantages, maskf)
        return {"batch": batch, "response": response, "mask": maskf, "logprobs": logprobs * maskf, "values": values,
                "advantages": advantages, "returns": returns, "scores": scores, "kl": kl.sum(1),
                "length": maskf.sum(1)}

    def update(self, rollout: dict) -> dict:
        """``ppo_epochs`` passes over the rollout in shuffled mini-batches: clipped policy and value losses.

        ratio = π(a)/π_old(a); policy loss = mean(max(−A·ratio, −A·clip(ratio, 1 ± cliprange)));
        value loss = ½·mean(max((V − R)², (clip(V, V_old ± cliprange_value) − R)²)); loss = policy + vf_coef · value.
        """
        cfg, accelerator = self.cfg, self.accelerator
        B, R = rollout["response"].shape
        mb, clip, clip_v = int(cfg["mini_batch_size"]), float(cfg["cliprange"]), float(cfg["cliprange_value"])
        stats = []
        self.model.train()
        for _ in range(int(cfg["ppo_epochs"])):
            order = torch.randperm(B, generator=self.generator)
            for start in range(0, B, mb):
                idx = order[start:start + mb].to(rollout["response"].device)
                batch = select_rows(rollout["batch"], idx)
                mask, advantages, returns = rollout["mask"][idx], rollout["advantages"][idx], rollout["returns"][idx]
                old_logprobs, old_values = rollout["logprobs"][idx], rollout["values"][idx]
                with accelerator.accumulate(self.model):
                    logits, values = self.model(**batch, response_length=R)
                    logprobs, entropy = token_logprobs(logits, rollout["response"][idx], float(cfg["temperature"]))
                    ratio = torch.exp((logprobs - old_logprobs) * mask)  # 1 past the end: no inf × 0
                    pg_losses = -advantages * ratio
                    pg_losses_clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
                    policy_loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)
                    values_clipped = old_values + (values - old_values).clamp(-clip_v, clip_v)
                    value_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (values_clipped - returns) ** 2),
                                                   mask)
                    loss = policy_loss + float(cfg["vf_coef"]) * value_loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg["max_grad_norm"]:
                        accelerator.clip_grad_norm_(self.model.parameters(), float(cfg["max_grad_norm"]))
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                if accelerator.sync_gradients:
                    self.scheduler.step()
                with torch.no_grad():
                    stats.append(torch.stack([
                        policy_loss, value_loss,
                        masked_mean((pg_losses_clipped > pg_losses).float(), mask),  # clipfrac
                        masked_mean(entropy, mask),
                        0.5 * masked_mean(((logprobs - old_logprobs) * mask) ** 2, mask),  # approx KL(π_old ‖ π)
                    ]).detach())
        means = accelerator.reduce(torch.stack(stats).mean(0), "mean").tolist()
        return dict(zip(("policy_loss", "value_loss", "clipfrac", "entropy", "approx_kl"), means))

    def train(self) -> TrainResult:
        """``max_steps`` iterations of rollout + update, logged; then the policy is saved."""
        started, cfg, accelerator = time.time(), self.cfg, self.accelerator
        self.say(f"ppo: {self.iterations} iterations of {cfg['rollout_batch_size']} prompts × "
                 f"{accelerator.num_processes} processes, {cfg['ppo_epochs']} epoch(s) each")
        metrics, samples = {}, 0
        for iteration in range(1, self.iterations + 1):
            rollout = self.rollout(self.next_prompts())
            stats = self.update(rollout)
            gathered = accelerator.reduce(torch.stack([rollout["scores"].mean(), rollout["kl"].mean(),
                                                       rollout["length"].mean()]), "mean").tolist()
            metrics = {"reward": gathered[0], "kl": gathered[1], **stats, "response_length": gathered[2],
                       "lr": self.scheduler.get_last_lr()[0]}
            samples += int(cfg["rollout_batch_size"]) * accelerator.num_processes
            if iteration % max(1, int(cfg["logging_steps"])) == 0 or iteration in (1, self.iterations):
                self.say(f"ppo iteration {iteration}/{self.iterations}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in metrics.items()))
            accelerator.log({f"ppo/{k}": v for k, v in metrics.items()}, step=iteration)
            if cfg["save_steps"] and iteration < self.iterations and iteration % int(cfg["save_steps"]) == 0:
                save_run(accelerator, cfg, self._write, folder=f"{cfg['output_dir']}/checkpoint-{iteration}")
        result = TrainResult(kind="ppo", output_dir=str(cfg["output_dir"]), steps=self.iterations, samples=samples,
                             seconds=time.time() - started, dropped=self.dropped,
                             metrics={k: metrics[k] for k in ("reward", "kl", "policy_loss", "value_loss") if k in metrics})
        save_run(accelerator, cfg, self._write, result)
        accelerator.end_training()
        return result

    def _write(self, folder) -> None:
        """The policy (a LoRA adapter, or the full model) and the processor."""
        self.policy.save_pretrained(folder)
        self.processor.save_pretrained(folder)


def train_ppo(cfg: dict, *, log=None) -> TrainResult:
    """Train the policy of ``cfg`` with PPO against ``cfg["reward_model"]`` (see ``PPOTrainer``)."""
    return PPOTrainer(cfg, log=log).train()

