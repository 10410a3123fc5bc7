"""The arithmetic of PPO (``training.ppo_core``) on hand-computed numbers.

These pin the algorithm against one-line slips that still train: the KL penalty dropped or its sign
flipped, the clipped objective taking the min where it needs the max, the value clip inverted,
advantages whitened over padding, the score put on the wrong token, the missing-EOS penalty skipped.
"""

from __future__ import annotations

import pytest
import torch

from training.ppo import batch_plan, prompt_share
from training.ppo_core import (
    advantages_and_returns,
    at_positions,
    gae,
    kl_rewards,
    penalize_missing_eos,
    policy_loss,
    response_mask,
    token_logprobs,
    value_loss,
    whiten,
)
from training.reward import last_token

MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])  # two responses: 3 and 2 tokens


def test_kl_rewards_penalise_every_token_and_add_the_score_on_the_last():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-1.0, -1.0, -7.0, -7.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-2.0, -0.5, 0.0, 0.0]])
    rewards, kl = kl_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, MASK, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [1.0, -0.5, 0.0, 0.0]]))
    # −0.1·KL per token; the score on each row's last response token (index 2, then 1); nothing on padding
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0, 0.0], [-0.1, 0.05 - 1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("kl_coef", [0.0, 0.1, 0.5])
def test_the_return_at_the_first_token_is_the_score_minus_the_kl_penalty(kl_coef):
    """With γ = λ = 1 and no whitening the first token's return is score − kl_coef·Σ KL, whatever the values."""
    scores = torch.tensor([2.0, -1.0])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-1.0, -1.0, -7.0, -7.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.7, 0.0], [-2.0, -0.5, 0.0, 0.0]])
    values = torch.tensor([[0.3, -0.2, 0.9, 5.0], [1.0, 2.0, 3.0, 4.0]])
    out = advantages_and_returns(scores, logprobs, ref, values, MASK, kl_coef=kl_coef, whiten_advantages=False)
    kl_sum = torch.tensor([0.5 - 1.0 + 0.2, 1.0 - 0.5])
    torch.testing.assert_close(out["returns"][:, 0], scores - kl_coef * kl_sum)
    torch.testing.assert_close(out["advantages"][:, 0], scores - kl_coef * kl_sum - values[:, 0])
    if kl_coef == 0:
        torch.testing.assert_close(out["returns"][:, 0], scores)
    assert torch.equal(out["returns"] * (1 - MASK), torch.zeros_like(MASK))


def test_advantages_are_whitened_over_response_tokens_only():
    scores = torch.tensor([3.0, -1.0])
    logprobs = torch.zeros(2, 4)
    values = torch.tensor([[0.0, 0.0, 0.0, 40.0], [1.0, 0.0, 30.0, -20.0]])  # large values on the padding
    out = advantages_and_returns(scores, logprobs, logprobs, values, MASK, kl_coef=0.1)
    raw = advantages_and_returns(scores, logprobs, logprobs, values, MASK, kl_coef=0.1, whiten_advantages=False)
    kept = out["advantages"][MASK.bool()]
    assert kept.mean().abs() < 1e-6 and kept.std().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(kept, (raw["advantages"][MASK.bool()] - raw["advantages"][MASK.bool()].mean())
                               / raw["advantages"][MASK.bool()].std())
    assert torch.equal(out["advantages"][~MASK.bool()], torch.zeros(3))


def test_whiten_over_all_processes_uses_their_sums():
    """``reduce`` sums over processes: here a fake second process holding the other half of the batch."""
    x = torch.tensor([[1.0, 2.0, 3.0, 50.0], [4.0, 5.0, -7.0, -9.0]])
    other_x, other_mask = torch.tensor([[10.0, 0.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    other = {}

    def reduce(t):  # what accelerator.reduce(t, "sum") returns on this process
        mine_total = torch.stack([(other_x * other_mask).sum(), other_mask.sum()])
        if t.dim() == 1:
            return t + mine_total
        return t + ((other_x - other["mean"]) ** 2 * other_mask).sum()

    both = torch.cat([x[MASK.bool()], other_x[other_mask.bool()]])
    other["mean"] = both.mean()
    w = whiten(x, MASK, reduce=reduce)
    torch.testing.assert_close(w[MASK.bool()], (x[MASK.bool()] - both.mean()) / both.std())


def test_policy_loss_takes_the_pessimistic_max_of_clipped_and_unclipped():
    mask = torch.ones(1, 4)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5]])  # beyond the 0.2 clip range on both sides
    old = torch.zeros(1, 4)
    loss, clipfrac = policy_loss(ratio.log(), old, advantages, mask, cliprange=0.2)
    # per token max(−A·ρ, −A·clip(ρ, 0.8, 1.2)): A>0,ρ=1.5 → −1.2; A>0,ρ=0.5 → −0.5; A<0,ρ=0.5 → 0.8; A<0,ρ=1.5 → 1.5
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert clipfrac.item() == pytest.approx(0.5)  # the clip was the larger term on two tokens
    inside, _ = policy_loss(torch.tensor([[1.1, 0.9]]).log(), torch.zeros(1, 2), torch.tensor([[2.0, -3.0]]),
                            torch.ones(1, 2), cliprange=0.2)
    assert inside.item() == pytest.approx((-2.2 + 2.7) / 2)  # inside the range: the plain surrogate


def test_policy_loss_ignores_padding_even_when_it_is_inf():
    logprobs = torch.tensor([[-1.0, float("-inf")]])
    loss, _ = policy_loss(logprobs, torch.tensor([[-1.0, 0.0]]), torch.tensor([[2.0, 5.0]]), torch.tensor([[1.0, 0.0]]),
                          cliprange=0.2)
    assert loss.item() == pytest.approx(-2.0)


def test_value_loss_takes_the_max_of_clipped_and_unclipped_errors():
    mask = torch.ones(1, 3)
    old = torch.tensor([[0.0, 0.0, 0.0]])
    values = torch.tensor([[1.0, 1.0, 0.1]])
    returns = torch.tensor([[2.0, 0.0, 0.0]])
    # token 0: V=1 → (1−2)²=1, clipped V=0.2 → (0.2−2)²=3.24 → 3.24; token 1: 1 vs (0.2)²=0.04 → 1;
    # token 2: inside the clip: 0.01
    assert value_loss(values, old, returns, mask, 0.2).item() == pytest.approx(0.5 * (3.24 + 1 + 0.01) / 3)


def test_missing_eos_penalty_hits_only_answers_without_eos():
    scores = torch.tensor([1.0, 1.0, -2.0])
    has_eos = torch.tensor([True, False, False])
    torch.testing.assert_close(penalize_missing_eos(scores, has_eos, 1.5), torch.tensor([1.0, -0.5, -3.5]))
    torch.testing.assert_close(penalize_missing_eos(scores, has_eos, None), scores)


def test_token_logprobs_leave_out_banned_tokens():
    logits = torch.tensor([[[0.0, 0.0, 5.0, 0.0]]])
    logp, entropy = token_logprobs(logits, torch.tensor([[0]]), temperature=1.0, banned=[2])
    assert logp.item() == pytest.approx(torch.tensor(1 / 3).log().item())  # three allowed tokens, equal logits
    assert entropy.item() == pytest.approx(torch.tensor(3.0).log().item())
    hot, _ = token_logprobs(logits, torch.tensor([[0]]), temperature=2.0)
    assert hot.item() == pytest.approx(torch.log_softmax(logits / 2, -1)[0, 0, 0].item())


def test_at_positions_reads_each_rows_own_positions():
    x = torch.arange(10.0).reshape(2, 5)
    positions = torch.tensor([[1, 2], [3, 4]])
    assert at_positions(x, positions).tolist() == [[1.0, 2.0], [8.0, 9.0]]
    assert at_positions(x[:, 2:], positions, start=2).tolist() == [[2.0, 2.0], [8.0, 9.0]]  # clamped below start


def test_prompt_shares_are_disjoint_and_cover_the_batch():
    order = list(range(100, 108))
    shares = [prompt_share(order, rank, 4) for rank in range(4)]
    assert sum(shares, []) == order and all(len(s) == 2 for s in shares)


@pytest.mark.parametrize("processes,accumulation", [(1, 8), (2, 4), (8, 1)])
def test_the_batch_does_not_grow_with_the_number_of_processes(processes, accumulation):
    from training.config import load_config

    cfg = load_config("llava-1.5-7b-ppo-lora", "ppo")
    plan = batch_plan(cfg, processes)
    assert plan["rollout"] * processes == cfg.rollout_batch_size == 8
    assert plan["forward"] * plan["accumulation"] * processes == cfg.mini_batch_size
    assert plan["accumulation"] == accumulation
    with pytest.raises(Exception, match="multiples of the number of processes"):
        batch_plan(cfg, 3)


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    # δ = (1 + 1.0 − 0.5, 2 + 1.5 − 1.0, 3 + 0 − 1.5) = (1.5, 2.5, 1.5); A = suffix sums of δ
    torch.testing.assert_close(advantages, torch.tensor([[5.5, 4.0, 1.5]]))
    torch.testing.assert_close(returns, torch.tensor([[6.0, 5.0, 3.0]]))  # the rewards to go


def test_gae_discounts_and_ignores_padding():
    rewards = torch.tensor([[1.0, 2.0, 99.0], [0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 1.0, 77.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0: δ1 = 2 + 0.9·0 − 1 = 1.0 → A1 = 1.0; δ0 = 1 + 0.9·1 − 0.5 = 1.4 → A0 = 1.4 + 0.45·1.0 = 1.85
    # row 1: δ = (0, 0, 1) → A2 = 1, A1 = 0.45, A0 = 0.2025
    torch.testing.assert_close(advantages, torch.tensor([[1.85, 1.0, 0.0], [0.2025, 0.45, 1.0]]))
    torch.testing.assert_close(returns, torch.tensor([[2.35, 2.0, 0.0], [0.2025, 0.45, 1.0]]))


def test_whiten_uses_only_unmasked_entries():
    x = torch.tensor([[1.0, 2.0, 3.0, 50.0], [4.0, 5.0, -7.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    w = whiten(x, mask)
    kept = w[mask.bool()]
    torch.testing.assert_close(kept, (x[mask.bool()] - 3.0) / torch.tensor([1.0, 2, 3, 4, 5]).std())
    assert kept.mean().abs() < 1e-6 and kept.std().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(w[~mask.bool()], torch.zeros(3))
    assert whiten(x, mask, shift_mean=False)[mask.bool()].mean().item() == pytest.approx(3.0, abs=1e-5)


def test_response_mask_and_last_token():
    response = torch.tensor([[5, 2, 3, 3], [5, 6, 7, 8], [2, 3, 3, 3]])
    mask = response_mask(response, eos_token_id=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert response_mask(response, eos_token_id=[2, 8]).tolist()[1] == [1, 1, 1, 1]
    values = torch.arange(12.0).reshape(3, 4)
    attention = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 0]])  # left and right padding
    assert last_token(values, attention).tolist() == [2.0, 7.0, 10.0]


