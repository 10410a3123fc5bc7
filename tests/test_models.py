"""training.models on a second VLM family: a tiny random-weight Qwen2.5-VL built from a config (CPU, offline).

Qwen2.5-VL keeps its projector (``visual.merger``) inside the vision tower, and its images arrive as one
flat tensor of patches with ``image_grid_thw``, so the paper's setup (vision frozen, projector trained,
LoRA on the language model only) needs the family-specific handling these tests exercise on hand-made
batches. DPO, the reward model, PPO and evaluate run end to end on the tiny Qwen2.5-VL of
``builder.dev.tiny_vlm`` (real processor, real template) in test_chat.py, test_dpo.py and test_rm_ppo.py.
"""

from __future__ import annotations

import pytest
import torch

from training.config import LoraSettings, TrainSettings

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

IMAGE, VISION_START, VISION_END, EOS, PAD = 5, 3, 4, 2, 0
GRID = (1, 4, 4)  # one 56x56 image: 4x4 patches of 14 px, merged 2x2 into 4 image tokens


def tiny_qwen(seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    hidden = 64
    config = Qwen2_5_VLConfig(
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                       "out_hidden_size": hidden, "fullatt_block_indexes": [1]},
        text_config={"vocab_size": 64, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                     "bos_token_id": None, "eos_token_id": EOS, "pad_token_id": PAD},
        image_token_id=IMAGE, video_token_id=6, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_batch(answers: list[list[int]]) -> dict:
    """One image per row, right-padded: <vision_start> 4×<image> <vision_end> question answer <eos>."""
    rows = [[1, VISION_START, *[IMAGE] * 4, VISION_END, 10, 11, 12, *a, EOS] for a in answers]
    width = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    patches = GRID[0] * GRID[1] * GRID[2]
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(len(rows) * patches, 3 * 2 * 14 * 14, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
            "image_grid_thw": torch.tensor([GRID] * len(rows))}


def _snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict, module) -> set[str]:
    return {k for k, v in module.state_dict().items() if k in before and not torch.equal(before[k], v)}


def _train_step(model, batch, lr=1e-2):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    out.loss.backward()
    optimizer.step()
    return float(out.loss)


def test_vlm_parts_finds_qwen_vision_merger_and_language_model():
    from training.models import lora_target_modules, vlm_parts

    model = tiny_qwen()
    parts = vlm_parts(model)
    assert (parts.vision_name, parts.projector_name, parts.language_model_name) == \
        ("model.visual", "model.visual.merger", "model.language_model")
    targets = lora_target_modules(model)
    assert targets and all(t.startswith("model.language_model.") for t in targets)
    # every linear layer of the LM (7 per decoder layer), none of the vision tower, merger or LM head
    assert len(targets) == 2 * 7 and not any("visual" in t or "lm_head" in t for t in targets)


def test_qwen_full_mode_trains_merger_and_lm_not_the_vision_tower():
    from training.models import apply_training_mode, vlm_parts

    model = apply_training_mode(tiny_qwen(), TrainSettings(lora=None))
    parts = vlm_parts(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".merger." in n for n in trainable)
    assert not any(n.startswith("model.visual.") and ".merger." not in n for n in trainable)
    assert all(p.requires_grad for p in parts.language_model.parameters())

    vision, merger, lm = _snapshot(parts.vision), _snapshot(parts.projector), _snapshot(parts.language_model)
    loss = _train_step(model, qwen_batch([[20, 21], [22]]))
    assert torch.isfinite(torch.tensor(loss))
    changed = _changed(vision, parts.vision)
    assert changed and all(k.startswith("merger.") for k in changed)  # inside `visual`, only the merger moved
    assert _changed(merger, parts.projector) and _changed(lm, parts.language_model)


def test_qwen_lora_adapters_on_the_lm_merger_trained_in_full_vision_frozen():
    from training.models import apply_training_mode, vlm_parts

    model = apply_training_mode(tiny_qwen(), TrainSettings(lora=LoraSettings(r=4, alpha=8, dropout=0.0)))
    parts = vlm_parts(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or ".merger.modules_to_save." in n for n in trainable)
    assert any("language_model" in n and "lora_B" in n for n in trainable)
    assert any(".merger.modules_to_save." in n for n in trainable)

    base = model.get_base_model()
    vision = {k: v for k, v in _snapshot(base.model.visual).items() if "merger" not in k}
    lm_base = {k: v for k, v in _snapshot(base.model.language_model).items() if "lora_" not in k}
    merger = _snapshot(parts.projector)
    _train_step(model, qwen_batch([[20, 21], [22]]))
    assert not _changed(vision, base.model.visual)  # vision tower weights unchanged
    assert not _changed(lm_base, base.model.language_model)  # the LM's own weights unchanged: only adapters move
    assert _changed(merger, parts.projector)  # the trained merger copy moved
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # adapters left their zero init


def test_reward_model_scores_qwen_rows_and_learns():
    from training.reward import VLMRewardModel

    rm = VLMRewardModel(tiny_qwen())
    batch = qwen_batch([[20, 21, 22], [23]])
    scores = rm.score(**batch)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    # the score is the value at each row's last real token, wherever padding starts
    values = rm(**batch)
    last = batch["attention_mask"].sum(1) - 1
    assert torch.equal(scores, values[torch.arange(2), last])
    head = _snapshot(rm.value_head)
    optimizer = torch.optim.SGD(rm.value_head.parameters(), lr=0.1)
    loss = -torch.nn.functional.logsigmoid(scores[0] - scores[1])
    loss.backward()
    optimizer.step()
    assert _changed(head, rm.value_head)
    assert rm.score(**batch)[0] - rm.score(**batch)[1] > scores[0] - scores[1]  # one step widened the margin


def test_ppo_forward_on_selected_qwen_rows_matches_the_whole_batch():
    """PPO's update scores mini-batches cut from the rollout batch: for Qwen the flat patch tensor is
    split per image, so a row scores the same alone as within its batch."""
    from training.ppo import PolicyAndValue, select_rows
    from training.reward import VLMRewardModel

    model = PolicyAndValue(tiny_qwen(0), VLMRewardModel(tiny_qwen(1))).eval()
    batch = qwen_batch([[20, 21], [22, 23], [24, 25]])
    batch["pixel_values"][16:32] += 1.0  # row 1's image differs from the others
    width = batch["input_ids"].shape[1]
    positions = torch.arange(width - 4, width - 1).repeat(3, 1)  # the states before the last three tokens
    with torch.no_grad():
        logits, values = model(**batch, positions=positions)
        assert logits.shape[:2] == values.shape == (3, 3)
        for rows in ([1], [2, 0]):
            idx = torch.tensor(rows)
            part_logits, part_values = model(**select_rows(batch, idx), positions=positions[idx])
            torch.testing.assert_close(part_logits, logits[idx], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(part_values, values[idx], rtol=1e-4, atol=1e-5)


def test_load_vlm_errors_name_the_folder_and_field(tmp_path):
    from builder.errors import DataError
    from builder.vlm.loading import load_vlm

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(DataError, match="does not name its base model") as e:
        load_vlm(str(adapter))
    assert "adapter_config.json" in str(e.value) and "base_model_name_or_path" in str(e.value)
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_vlm(str(adapter))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="cannot load the model") as e:
        load_vlm(str(empty), field="reference")
    assert str(empty) in str(e.value) and "reference" in str(e.value)
