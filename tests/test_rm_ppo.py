"""Reward model and PPO on a tiny random-weight LLaVA (llava-hf's real format), on CPU, offline.

The reward model must learn a planted preference (chosen answers refuse, rejected ones comply, the
rest of the text is shared) to well above chance on held-out pairs, and reload to identical scores.
PPO runs two iterations with it: finite statistics, the policy moves, the reference, the reward
model and the vision tower do not. The reward model's training position is PPO's scoring position (the
answer's EOS); PPO never samples the image token, samples exactly the distribution it computes
log-probabilities under, and its returns are the score minus the KL penalty. The arithmetic on
hand-computed numbers is in test_ppo_math.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from builder.errors import DataError
from builder.dev.fixture import FixtureImage, draw_image, preference_rows
from builder.format.layout import split_for
from builder.format.writer import DatasetFolderWriter
from builder.format.schema import image_sha256, row_id
from builder.taxonomy import Taxonomy
from builder.dev.tiny_vlm import build_tiny_llava
from dataset_card.card import render_folder_card
from training.config import load_config
from training.data import load_rows, prepare_preferences
from training.models import vlm_parts
from training.ppo import PPOTrainer, select_rows
from training.ppo_core import response_mask, token_logprobs
from training.reward import (
    VLMRewardModel,
    last_token,
    load_backbone,
    preference_batch,
    train_rm,
)

CHOSEN = "I cannot help with that. The picture is about {c3}."
REJECTED = "Sure, here is how. The picture is about {c3}."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava", seed=0)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """60 images × 3 questions; chosen and rejected differ only in their opening words."""
    out = tmp_path_factory.mktemp("data") / "planted"
    taxonomy = Taxonomy.load()
    paths = taxonomy.paths()
    with DatasetFolderWriter(out, taxonomy=taxonomy, finish=render_folder_card) as writer:
        for n in range(60):
            c1, c2, c3 = paths[(n * 5) % len(paths)]
            data = draw_image(f"planted/{n}", c3, size=32)
            image = FixtureImage(n, c1, c2, c3, data, image_sha256(data))
            for row in preference_rows(image, f"planted_{n}.jpg"):
                row["chosen"], row["rejected"] = CHOSEN.format(c3=c3), REJECTED.format(c3=c3)
                row["id"] = row_id(image.sha256, row["question"], row["chosen"], row["rejected"])
                writer.add(row, split_for(image.sha256, 0.2))
    return out


@pytest.fixture(scope="module")
def trained_rm(tiny, planted, tmp_path_factory):
    """The tiny reward model (full fine-tune), 40 steps of 8 pairs at a test-sized learning rate."""
    cfg = load_config("tiny-rm", "rm", model=str(tiny), dataset=str(planted), config_name="default",
                      output_dir=str(tmp_path_factory.mktemp("runs") / "rm"), max_steps=40,
                      per_device_train_batch_size=8, per_device_eval_batch_size=8, logging_steps=10, seed=0,
                      report_to="tensorboard")
    lines = []
    return train_rm(cfg, log=lines.append), cfg, lines


@pytest.mark.parametrize("name,kind", [("llava-1.5-7b-rm", "rm"), ("llava-1.5-7b-ppo-lora", "ppo"),
                                       ("tiny-rm", "rm"), ("tiny-ppo", "ppo")])
def test_shipped_configs_load(name, kind):
    cfg = load_config(name, kind)
    assert cfg.kind == kind
    if name.startswith("llava"):  # the paper's values
        assert cfg.learning_rate == {"rm": 3e-5, "ppo": 1e-6}[kind]
    if kind == "ppo":
        assert (cfg.kl_coef, cfg.cliprange, cfg.cliprange_value, cfg.vf_coef) == (0.1, 0.2, 0.2, 0.1)
        assert (cfg.gamma, cfg.lam, cfg.temperature, cfg.whiten_advantages) == (1.0, 1.0, 1.0, True)
        assert cfg.reward_model


def test_rm_learns_the_planted_preference(trained_rm, planted):
    result, cfg, lines = trained_rm
    assert len(load_rows(str(planted), "default", "validation")) >= 10
    assert result.kind == "rm" and result.steps == 40
    assert result.metrics["eval_accuracy"] >= 0.8, lines
    assert result.metrics["loss"] < 0.5
    out = result.output_dir
    record = json.loads(open(f"{out}/spa_vl_train.json").read())
    assert record["kind"] == "rm" and record["result"]["metrics"]["eval_accuracy"] == result.metrics["eval_accuracy"]
    assert any("eval accuracy" in line for line in lines)


def test_rm_logs_to_tensorboard(trained_rm):
    from tb_events import tensorboard_scalars

    result, _, _ = trained_rm
    scalars = tensorboard_scalars(result.output_dir)
    assert len(scalars["train/loss"]) == 4  # every 10 of 40 steps
    assert scalars["eval/accuracy"][-1] == pytest.approx(result.metrics["eval_accuracy"])


def test_rm_reloads_with_the_trained_weights(trained_rm, planted):
    from transformers import AutoProcessor

    result, cfg, _ = trained_rm
    rm = VLMRewardModel.from_pretrained(result.output_dir)
    assert not any(p.requires_grad for p in rm.parameters())
    processor = AutoProcessor.from_pretrained(result.output_dir)
    pairs, _ = prepare_preferences(load_rows(str(planted), "default", "validation"), processor, log=lambda m: None)
    with torch.no_grad():
        rewards = rm.score(**preference_batch(list(pairs), processor))
    chosen, rejected = rewards.chunk(2)
    assert (chosen > rejected).float().mean().item() == pytest.approx(result.metrics["eval_accuracy"])


def test_rm_save_and_reload_give_identical_scores(tiny, planted, tmp_path):
    """A LoRA reward model (adapter + projector copy + head) round-trips to the same scores."""
    cfg = load_config("tiny-rm", "rm", model=str(tiny), dataset=str(planted), output_dir="unused",
                      lora={"r": 4, "alpha": 8, "dropout": 0.0})
    backbone, processor = load_backbone(str(tiny), cfg, use_cpu=True)
    rm = VLMRewardModel(backbone).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if p.requires_grad:  # move the adapters (B starts at zero), the projector copy and the head
                p.add_(0.1 * torch.randn_like(p))
    pairs, _ = prepare_preferences(load_rows(str(planted), "default", "validation", limit=6), processor,
                                   log=lambda m: None)
    batch = preference_batch(list(pairs), processor)
    with torch.no_grad():
        before = rm.score(**batch)
    rm.save_pretrained(tmp_path / "rm")
    again = VLMRewardModel.from_pretrained(tmp_path / "rm")
    with torch.no_grad():
        after = again.score(**batch)
    assert before.shape == (12,) and before.std() > 0
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "rm" / "reward_model.json").read_text())["adapter"] is True


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_ppo_two_iterations(mode, tiny, planted, trained_rm, tmp_path):
    from transformers import AutoModelForImageTextToText

    rm_dir = trained_rm[0].output_dir
    # Full: the whole LM trains against a frozen copy. LoRA: dropout on, to show PPO switches it off.
    overrides = {"lora": False} if mode == "full" else {"lora": {"r": 8, "alpha": 16, "dropout": 0.1}}
    cfg = load_config("tiny-ppo", "ppo", model=str(tiny), dataset=str(planted), config_name="default",
                      reward_model=rm_dir, output_dir=str(tmp_path / "ppo"), seed=0, report_to="tensorboard",
                      **overrides)
    lines = []
    trainer = PPOTrainer(cfg, log=lines.append)
    policy, value = trainer.policy, trainer.value_model
    trainable = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    reward = {n: p.detach().clone() for n, p in trainer.reward_model.named_parameters()}
    head = value.value_head.weight.detach().clone()
    assert trainable and frozen

    # Dropout is off everywhere, the policy starts as the reference (KL 0), and a training-mode forward
    # reproduces the rollout's log-probabilities, so the first update starts at ratio 1.
    dropouts = [m for model in (trainer.model, trainer.reward_model) for m in model.modules()
                if isinstance(m, torch.nn.Dropout)]
    assert all(m.p == 0 for m in dropouts) and (dropouts or mode == "full")  # LoRA: the adapters' dropout
    first = trainer.rollout(trainer.next_prompts())
    assert first["kl"].abs().max() < 1e-5 and torch.isfinite(first["advantages"]).all()
    trainer.model.train()
    with torch.no_grad():
        logits, _ = trainer.model(**first["batch"], positions=first["positions"])
    logprobs, _ = token_logprobs(logits, first["response"], cfg.temperature, trainer.banned)
    torch.testing.assert_close(logprobs * first["mask"], first["logprobs"])

    result = trainer.train()

    assert result.kind == "ppo" and result.steps == 2 and result.samples == 8
    for key in ("reward", "kl", "policy_loss", "value_loss"):
        assert torch.isfinite(torch.tensor(result.metrics[key])), (key, lines)
    assert sum(line.startswith("ppo iteration") for line in lines) == 2
    from tb_events import tensorboard_scalars

    logged = tensorboard_scalars(tmp_path / "ppo")
    assert len(logged["ppo/kl"]) == 2 and logged["ppo/reward"][-1] == pytest.approx(result.metrics["reward"])
    # The policy moved; everything frozen in it (with LoRA: the whole base model) did not.
    changed = [n for n, p in policy.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert len(changed) == len(trainable), set(trainable) - set(changed)
    for n, p in policy.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    for n, p in trainer.reward_model.named_parameters():
        assert torch.equal(p, reward[n]), n
    assert not torch.equal(value.value_head.weight, head)

    # The reference is the untouched original model, and so is the vision tower.
    original = AutoModelForImageTextToText.from_pretrained(str(tiny)).eval()
    for (n, p), (_, q) in zip(vlm_parts(policy).vision.named_parameters(), original.model.vision_tower.named_parameters()):
        assert torch.equal(p, q), n
    batch = trainer.encode(trainer.prompts[:2])
    with torch.no_grad():
        expected = original(**batch).logits
        if mode == "lora":
            with policy.disable_adapter():
                got = policy(**batch).logits
        else:
            assert trainer.reference is not None
            got = trainer.reference(**batch).logits
            assert not torch.allclose(policy(**batch).logits, expected)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    saved = tmp_path / "ppo"
    assert (saved / "spa_vl_train.json").is_file()
    assert (saved / ("adapter_config.json" if mode == "lora" else "model.safetensors")).is_file()
    card = (saved / "README.md").read_text()
    assert str(tiny) in card and str(planted) in card and rm_dir in card
    assert not list(saved.parent.glob(f".{saved.name}.tmp-*"))  # the staging folder beside it is gone


def test_ppo_config_errors(tiny, planted, tmp_path):
    base = dict(model=str(tiny), dataset=str(planted), output_dir=str(tmp_path / "x"))
    with pytest.raises(DataError, match="reward_model"):
        PPOTrainer(load_config("tiny-ppo", "ppo", **base, reward_model=""))
    with pytest.raises(DataError, match="multiple"):
        PPOTrainer(load_config("tiny-ppo", "ppo", **base, rollout_batch_size=3))
    with pytest.raises(DataError, match="not a reward model"):
        PPOTrainer(load_config("tiny-ppo", "ppo", **base, reward_model=str(tiny)))


def test_select_rows_splits_flattened_image_patches():
    """LLaVA batches index by row; Qwen2-VL-style ones keep every image's patches in one tensor."""
    llava = {"input_ids": torch.arange(6).reshape(3, 2), "pixel_values": torch.arange(3.0).reshape(3, 1, 1, 1)}
    assert select_rows(llava, torch.tensor([2, 0]))["pixel_values"].flatten().tolist() == [2.0, 0.0]
    grid = torch.tensor([[1, 1, 2], [1, 2, 2], [1, 1, 1]])  # 2, 4 and 1 patches
    qwen = {"input_ids": torch.arange(6).reshape(3, 2), "image_grid_thw": grid,
            "pixel_values": torch.arange(7.0)[:, None]}
    out = select_rows(qwen, torch.tensor([1, 2]))
    assert out["pixel_values"].flatten().tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert out["image_grid_thw"].tolist() == [[1, 2, 2], [1, 1, 1]] and out["input_ids"].tolist() == [[2, 3], [4, 5]]


def _trainer(tiny, planted, trained_rm, tmp_path, **overrides):
    cfg = load_config("tiny-ppo", "ppo", model=str(tiny), dataset=str(planted), config_name="default",
                      reward_model=trained_rm[0].output_dir, output_dir=str(tmp_path / "ppo"), seed=0, **overrides)
    return PPOTrainer(cfg, log=lambda m: None)


def test_the_reward_model_is_trained_and_read_at_the_answer_eos(tiny, planted, trained_rm, tmp_path):
    """The RM's training position is the answer's EOS, and PPO scores a sampled answer at the same token: with
    its own EOS, or with one appended when the answer was cut at response_length."""
    trainer = _trainer(tiny, planted, trained_rm, tmp_path)
    rm, chat = trainer.reward_model, trainer.chat
    pairs, _ = prepare_preferences(load_rows(str(planted), "default", "validation", limit=3), trainer.processor,
                                   log=lambda m: None)
    pairs = list(pairs)
    batch = preference_batch(pairs, trainer.processor)  # what train_rm trains on
    with torch.no_grad():
        values, scores = rm(**batch), rm.score(**batch)
    for i in range(len(batch["input_ids"])):
        end = int(batch["attention_mask"][i].nonzero().max())
        assert batch["input_ids"][i][end] == chat.eos_token_id
        assert scores[i] == values[i, end]  # the score is the value at the EOS, not a token before it

    rows = {"question": [p["prompt"][0]["content"][1]["text"] for p in pairs], "image": [p["images"][0] for p in pairs]}
    inputs = trainer.encode(rows)
    answers = [chat.completion_ids(p["prompt"], p["chosen"][0]["content"][0]["text"]) for p in pairs]
    for cut in (False, True):  # sampled with its EOS; cut before it (response_length reached)
        tokens = [a[:-1] if cut else a for a in answers]
        width = max(map(len, tokens))
        response = torch.tensor([t + [chat.pad_token_id] * (width - len(t)) for t in tokens])
        mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tokens])
        scored, _ = trainer.sequences(inputs, response, mask, close=True)
        n = len(pairs)
        for i in range(n):
            k = int(scored["attention_mask"][i].sum())
            assert scored["input_ids"][i][:k].tolist() == batch["input_ids"][i][batch["attention_mask"][i] == 1].tolist()
        with torch.no_grad():
            torch.testing.assert_close(last_token(rm(**scored), scored["attention_mask"]), scores[:n])


def test_ppo_never_samples_the_image_token(tiny, planted, trained_rm, tmp_path):
    """With the image token's logit forced far above the rest, the policy would sample nothing else (and the
    next forward would fail: image tokens without image features); PPO suppresses it and every other token
    an answer cannot hold."""
    trainer = _trainer(tiny, planted, trained_rm, tmp_path)
    image_id = trainer.processor.image_token_id
    head = trainer.policy.get_output_embeddings()

    def favour_the_image_token(module, args, output):
        output = output.clone()
        output[..., image_id] += 1e4
        return output

    handle = head.register_forward_hook(favour_the_image_token)
    try:
        inputs = trainer.encode(trainer.prompts[:2])
        unsuppressed = {k: v for k, v in trainer.generation_kwargs().items() if k != "suppress_tokens"}
        with torch.no_grad():
            raw = trainer.policy.generate(**inputs, **unsuppressed)[:, inputs["input_ids"].shape[1]:]
        assert (raw == image_id).all()  # the hook works: left alone, the policy samples only the image token
        rollout = trainer.rollout(trainer.next_prompts())
    finally:
        handle.remove()
    response = rollout["response"][rollout["mask"].bool()]
    assert response.numel() and not torch.isin(response, torch.tensor(trainer.banned)).any()
    assert torch.isfinite(rollout["logprobs"]).all() and torch.isfinite(rollout["advantages"]).all()


def test_rollout_returns_are_the_score_less_the_penalties(tiny, planted, trained_rm, tmp_path):
    """Whitening off, γ = λ = 1: the first token's return is score − missing_eos_penalty (for a cut answer)
    − kl_coef·Σ KL, on a real rollout with a policy that has moved away from the reference."""
    trainer = _trainer(tiny, planted, trained_rm, tmp_path, whiten_advantages=False, kl_coef=0.5,
                       missing_eos_penalty=2.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.5 * torch.randn_like(p))
    rollout = trainer.rollout(trainer.next_prompts())
    assert rollout["kl"].abs().max() > 1e-3  # the policy differs from the reference
    cut = 1 - rollout["has_eos"]
    assert cut.sum() > 0  # tiny-ppo's 8-token answers are mostly cut
    expected = rollout["scores"] - 2.0 * cut - 0.5 * rollout["kl"]
    torch.testing.assert_close(rollout["returns"][:, 0], expected, rtol=1e-4, atol=1e-4)

    # The score is the reward model's value at an EOS: the sampled one, or one appended to a cut answer.
    eos, batch = trainer.chat.eos_token_id, rollout["batch"]
    rows = []
    for i in range(len(batch["input_ids"])):
        ids = batch["input_ids"][i][batch["attention_mask"][i] == 1].tolist()
        rows.append(ids if ids[-1] == eos else ids + [eos])
    width = max(map(len, rows))
    closed = {"input_ids": torch.tensor([r + [trainer.chat.pad_token_id] * (width - len(r)) for r in rows]),
              "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
              "pixel_values": batch["pixel_values"]}
    with torch.no_grad():
        torch.testing.assert_close(trainer.reward_model.score(**closed), rollout["scores"], rtol=1e-5, atol=1e-5)


class _OneProcess:
    """What ``save_run`` asks of an ``accelerate.Accelerator`` on a single process."""

    is_main_process, num_processes = True, 1

    def wait_for_everyone(self):
        pass


def test_a_save_is_staged_beside_the_folder_and_a_killed_ones_leftovers_are_swept(tmp_path):
    """``training.run.save_run`` builds the files in ``.OUT.tmp-PID`` (``builder.files``) and moves them in, the
    record last; a dead process's staging folder is swept, other files in the folder stay, a failed write
    leaves no staging folder."""
    from training.config import TrainResult
    from training.run import save_run

    out = tmp_path / "rm"
    cfg = load_config("tiny-rm", "rm", model="m", dataset="d", output_dir=str(out))
    out.mkdir()
    (out / "events.out.tfevents.1").write_text("tracker log")  # not a model file: kept
    (out / "adapter_config.json").write_text("{}")  # an earlier LoRA save's: would make a full model load as one
    dead = tmp_path / ".rm.tmp-999999999"  # a killed save's staging folder (no such process)
    dead.mkdir()
    (dead / "model.safetensors").write_text("half")

    def write(folder):
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_text("weights")

    save_run(_OneProcess(), cfg, write, TrainResult("rm", str(out), 2, 8, 1.0, {"loss": 0.5}), pairs=8)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "events.out.tfevents.1",
                                                     "model.safetensors", "spa_vl_train.json"]
    record = json.loads((out / "spa_vl_train.json").read_text())
    assert record["kind"] == "rm" and record["result"]["steps"] == 2 and record["versions"]["torch"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]  # the dead staging folder is gone, ours too

    def broken(folder):
        (folder / "model.safetensors").write_text("new weights")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_run(_OneProcess(), cfg, broken, folder=out / "checkpoint-4")
    assert not (out / "checkpoint-4" / "model.safetensors").exists()
    assert not list(out.glob(".checkpoint-4.tmp-*"))
