"""The arithmetic of PPO, as plain functions of tensors (``training.ppo`` runs them; the tests pin them).

All tensors are ``[batch, response tokens]`` with a 0/1 ``mask`` over each response (its tokens up to and
including its EOS). In the paper's setup (after LLaVA-RLHF and "The N implementation details of RLHF
with PPO"):

- per-token reward r_t = −kl_coef · (log π(a_t) − log π_ref(a_t)), plus the reward model's score on the
  last response token (``kl_rewards``);
- GAE: δ_t = r_t + γ·V_{t+1} − V_t, A_t = δ_t + γλ·A_{t+1}, returns = A + V (``gae``); with γ = λ = 1 the
  return at the first token is score − kl_coef · Σ KL;
- advantages whitened over the response tokens of the whole batch, all processes together (``whiten``);
- clipped surrogate max(−A·ρ, −A·clip(ρ, 1 ± ε)) (``policy_loss``) and clipped value loss
  ½·max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²) (``value_loss``), each a mean over response tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce=None) -> torch.Tensor:
    """``x`` scaled to unit variance over its unmasked entries (unbiased), and to zero mean with ``shift_mean``.

    ``reduce`` sums a tensor over all processes (``lambda t: accelerator.reduce(t, "sum")``), so that the
    mean and variance are those of every process's entries together; None: this process only."""
    reduce = reduce or (lambda t: t)
    total, n = reduce(torch.stack([(x * mask).sum(), mask.sum()]).float()).unbind()
    mean = total / n.clamp(min=1)
    var = reduce(((x - mean) ** 2 * mask).sum().float()) / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 1.0):
    """Generalised advantage estimation over each response, backwards from its last token; V and r are zero
    after the response ends. Returns (advantages, returns), both zero on padding."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def kl_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
               kl_coef: float):
    """(per-token rewards, per-token KL): −kl_coef·KL on every response token, the score added on the last."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1) - 1).long().clamp(min=0)
    rewards[torch.arange(len(rewards), device=rewards.device), last] += scores
    return rewards * mask, kl


def penalize_missing_eos(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """The scores, less ``penalty`` for each answer that was cut before its EOS (trl's ``missing_eos_penalty``)."""
    if not penalty:
        return scores
    return scores - penalty * (~has_eos.bool()).to(scores.dtype)


def advantages_and_returns(scores, logprobs, ref_logprobs, values, mask, *, kl_coef: float, gamma: float = 1.0,
                           lam: float = 1.0, whiten_advantages: bool = True, reduce=None) -> dict:
    """Everything the update needs from a rollout: rewards, KL, advantages (whitened over all processes'
    response tokens when asked) and returns."""
    rewards, kl = kl_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    advantages, returns = gae(rewards, values * mask, mask, gamma, lam)
    if whiten_advantages:
        advantages = whiten(advantages, mask, reduce=reduce)
    return {"rewards": rewards, "kl": kl, "advantages": advantages, "returns": returns}


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange: float):
    """(clipped surrogate loss, fraction of tokens where the clip was active), both over response tokens.

    The loss is pessimistic: per token the larger of −A·ρ and −A·clip(ρ), so a step can never gain from
    moving the ratio past the clip range."""
    ratio = torch.exp(torch.where(mask.bool(), logprobs - old_logprobs, 0.0))  # 1 past the end, even for -inf
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def value_loss(values, old_values, returns, mask, cliprange_value: float) -> torch.Tensor:
    """½ · mean over response tokens of max((V − R)², (V_clipped − R)²), V_clipped = V_old ± cliprange_value."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def response_mask(response: torch.Tensor, eos_token_id) -> torch.Tensor:
    """1 for the response's tokens up to and including its first end-of-sequence token, 0 after (padding)."""
    eos = torch.isin(response, torch.as_tensor(eos_token_id, device=response.device).flatten())
    after_eos = (eos.cumsum(1) - eos.long()) > 0
    return (~after_eos).long()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, banned=None):
    """Log-probabilities of ``tokens`` under the sampling distribution: ``logits / temperature`` with the
    ``banned`` ids (never sampled) removed; and each position's entropy (a statistic: no gradient)."""
    scaled = logits.float() / temperature
    if banned is not None and len(banned):
        scaled = scaled.index_fill(-1, torch.as_tensor(banned, device=scaled.device), torch.finfo(scaled.dtype).min)
    logp = F.log_softmax(scaled, -1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1), entropy


def at_positions(x: torch.Tensor, positions: torch.Tensor, start: int = 0) -> torch.Tensor:
    """``x[i, positions[i, t] - start]`` for every row i and step t (``[B, T]`` or ``[B, T, V]``): each row's own
    positions in a flush-left batch. ``start``: the sequence position of ``x[:, 0]`` (``logits_to_keep``)."""
    index = (positions - start).clamp(0, x.shape[1] - 1)
    if x.dim() == 2:
        return x.gather(1, index)
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
