"""DPO, the reward model and PPO end to end on a tiny Qwen2.5-VL in Qwen's real formats (CPU, offline).

Qwen2.5-VL differs from LLaVA where the trainers could go wrong: its processor wants torchvision for
the video half (built here without it), images arrive as flat patches with ``image_grid_thw``, a
``mm_token_type_ids`` tensor must grow with every appended answer, answers end with ``<|im_end|>``, and
its generation config samples with top_k 1 and a repetition penalty that PPO must not inherit.
"""

from __future__ import annotations

import json

import pytest
import torch

from training.config import load_config

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def runs(tiny_qwen_data, tmp_path_factory):
    return {**tiny_qwen_data, "root": tmp_path_factory.mktemp("qwen-runs")}


@pytest.fixture(scope="module")
def rm_run(runs):
    from training.reward import train_rm

    cfg = load_config("tiny-rm", "rm", model=runs["model"], dataset=runs["data"], output_dir=str(runs["root"] / "rm"),
                      max_steps=2)
    return train_rm(cfg, log=lambda m: None)


def test_dpo_trains_saves_and_reloads(runs):
    from peft import PeftModel

    from training.dpo import train_dpo
    from builder.vlm.loading import load_vlm

    out = runs["root"] / "dpo"
    result = train_dpo(load_config("tiny-dpo", "dpo", model=runs["model"], dataset=runs["data"], output_dir=str(out)),
                       log=lambda m: None)
    assert result.steps == 2 and result.metrics["loss_first"] == pytest.approx(0.6931, abs=1e-3)
    assert result.metrics["loss"] != result.metrics["loss_first"] and "eval_loss" in result.metrics
    model, processor = load_vlm(str(out), dtype="float32", use_cpu=True)  # the saved processor loads without video
    assert isinstance(model, PeftModel) and type(processor).__name__ == "Qwen2_5_VLProcessor"
    saved = json.loads((out / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2_5_VLProcessor"  # loadable as Qwen's own where torchvision exists


def test_reward_model_trains_and_scores_at_im_end(runs, rm_run):
    from builder.vlm.chat import ChatFormat
    from training.data import load_rows, prepare_preferences
    from training.reward import VLMRewardModel, preference_batch

    assert rm_run.steps == 2 and 0 <= rm_run.metrics["eval_accuracy"] <= 1
    rm = VLMRewardModel.from_pretrained(rm_run.output_dir)
    from builder.vlm.chat import load_processor

    processor = load_processor(rm_run.output_dir)
    pairs, _ = prepare_preferences(load_rows(runs["data"], "malicious_use", "validation"), processor, log=lambda m: None)
    batch = preference_batch(list(pairs), processor)
    with torch.no_grad():
        scores = rm.score(**batch)
    assert torch.isfinite(scores).all()
    im_end = ChatFormat(processor).eos_token_id
    last = batch["attention_mask"].sum(1) - 1
    assert (batch["input_ids"][torch.arange(len(last)), last] == im_end).all()


@pytest.fixture(scope="module")
def ppo(runs, rm_run):
    from training.ppo import PPOTrainer

    cfg = load_config("tiny-ppo", "ppo", model=runs["model"], dataset=runs["data"], reward_model=rm_run.output_dir,
                      output_dir=str(runs["root"] / "ppo"), seed=0)
    return PPOTrainer(cfg, log=lambda m: None)


def test_ppo_samples_the_distribution_it_computes_log_probabilities_under(ppo):
    """Qwen's generation config says top_k 1 and repetition_penalty 1.05; PPO samples at temperature 1 with
    neither, so generate()'s processed scores give the log-probabilities PPO computes for the same tokens."""
    from training.ppo_core import response_mask, token_logprobs

    inputs = ppo.encode(ppo.prompts[:2])
    torch.manual_seed(0)
    with torch.no_grad():
        out = ppo.policy.generate(**inputs, **ppo.generation_kwargs(), output_scores=True,
                                  return_dict_in_generate=True)
    response = out.sequences[:, inputs["input_ids"].shape[1]:]
    mask = response_mask(response, ppo.chat.eos_token_id)
    sampled = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, response[..., None]).squeeze(-1)
    assert len(set(response[0].tolist())) > 1  # not top_k 1: the samples vary
    batch, positions = ppo.sequences(inputs, response.masked_fill(mask == 0, ppo.chat.pad_token_id), mask)
    ppo.model.eval()
    with torch.no_grad():
        logits, _ = ppo.model(**batch, positions=positions)
    ours, _ = token_logprobs(logits, response, ppo.cfg.temperature, ppo.banned)
    torch.testing.assert_close(ours * mask, sampled * mask, rtol=1e-4, atol=1e-4)
    # the answer's tokens were appended with text token types (mm_token_type_ids grew with the response)
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape


def test_ppo_two_iterations(ppo, runs):
    first = ppo.rollout(ppo.next_prompts())
    assert first["kl"].abs().max() < 1e-5 and torch.isfinite(first["advantages"]).all()
    result = ppo.train()
    assert result.steps == 2 and result.samples == 8
    assert all(torch.isfinite(torch.tensor(result.metrics[k])) for k in ("reward", "kl", "policy_loss", "value_loss"))
    out = runs["root"] / "ppo"
    assert (out / "adapter_model.safetensors").is_file() and (out / "spa_vl_train.json").is_file()
    assert runs["model"] in (out / "README.md").read_text()
