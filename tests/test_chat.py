"""One prompt format, token for token, in every path that talks to a model, on both real formats.

DPO's collator, the reward model's batches, PPO's prompts, and the local VLM behind evaluate's answers and
the pipeline's local backend must encode a question and its image into the same ids: llava-hf's template
without BOS gets the tokenizer's ``<s>`` once; Qwen2.5-VL's ChatML gets none. Answers end with the EOS a model
stops at.
"""

from __future__ import annotations

import io

import pytest
import torch

from builder.vlm.chat import ChatFormat, answer_text, prompt_messages
from training.data import load_rows, prepare_preferences, to_conversational
from builder.vlm.loading import load_vlm

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module", params=["llava", "qwen"])
def family(request, tiny_llava_data, tiny_qwen_data):
    paths = {"llava": tiny_llava_data, "qwen": tiny_qwen_data}[request.param]
    model, processor = load_vlm(paths["model"], dtype="float32", use_cpu=True)
    rows = load_rows(paths["data"], "malicious_use", "train", limit=3)
    pairs, _ = prepare_preferences(rows, processor, log=lambda m: None)
    return {"name": request.param, **paths, "model_obj": model, "processor": processor, "rows": rows,
            "pairs": list(pairs), "chat": ChatFormat(processor)}


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def test_prompt_ids_are_identical_in_dpo_rm_ppo_evaluate_and_the_local_backend(family, tmp_path):
    from PIL import Image

    from builder.vlm.local import LocalVLM
    from training.config import load_config
    from training.dpo import dpo_args, make_trainer
    from training.ppo import encode_prompts
    from training.reward import preference_batch

    rows, pairs, tok = family["rows"], family["pairs"], family["chat"].tokenizer
    cfg = load_config("tiny-dpo", "dpo", model=family["model"], dataset=family["data"], output_dir=str(tmp_path))
    trainer = make_trainer(cfg, dpo_args(cfg, log=lambda m: None), family["model_obj"], family["processor"],
                           prepare_preferences(rows, family["processor"], log=lambda m: None)[0], log=lambda m: None)
    dpo = trainer.data_collator(pairs)
    rm = preference_batch(pairs, family["processor"])
    torch.testing.assert_close(rm["input_ids"], dpo["input_ids"])  # the RM trains on DPO's very sequences
    ppo = encode_prompts(family["chat"], rows[:])
    local = LocalVLM(family["model"], device="cpu")
    evaluate = local.encode([prompt_messages(q) for q in rows["question"]],  # evaluate's batches: PNG bytes decoded
                            [[Image.open(io.BytesIO(_png(im)))] for im in rows["image"]])

    for i, (question, image) in enumerate(zip(rows["question"], rows["image"])):
        prompt = dpo["input_ids"][i][(dpo["completion_mask"][i] == 0) & (dpo["attention_mask"][i] == 1)].tolist()
        assert rm["input_ids"][i][:len(prompt)].tolist() == prompt
        assert ppo["input_ids"][i][ppo["attention_mask"][i] == 1].tolist() == prompt
        assert evaluate["input_ids"][i][evaluate["attention_mask"][i] == 1].tolist() == prompt
        assert local.encode([prompt_messages(question)], [[image]])["input_ids"][0].tolist() == prompt
        if family["name"] == "llava":  # the tokenizer's BOS, once, first: llava-hf's template has none
            assert prompt[0] == tok.bos_token_id and prompt.count(tok.bos_token_id) == 1
            assert tok.decode(prompt[1:]).startswith("USER: <image>")
        else:
            assert tok.bos_token_id is None and prompt[0] == tok.convert_tokens_to_ids("<|im_start|>")
            assert tok.decode(prompt).endswith("<|im_start|>assistant\n")


def test_answers_end_with_the_eos_the_model_stops_at(family):
    """LLaVA: ``ASSISTANT: {answer}</s>`` (the authors' v1 format; llava-hf's template writes a space instead);
    Qwen: ``{answer}<|im_end|>`` without the template's trailing newline."""
    chat, pairs = family["chat"], family["pairs"]
    batch = chat.pair_batch(pairs)
    tok = chat.tokenizer
    for i, row in enumerate(pairs + pairs):
        side = "chosen" if i < len(pairs) else "rejected"
        completion = batch["input_ids"][i][batch["completion_mask"][i] == 1].tolist()
        assert completion[-1] == chat.eos_token_id and completion.count(chat.eos_token_id) == 1
        assert tok.decode(completion[:-1]).strip() == answer_text(row[side]).strip()  # chosen first, then rejected
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i][n - 1] == chat.eos_token_id  # the last real token of every row
        assert batch["attention_mask"][i][:n].all() and not batch["attention_mask"][i][n:].any()  # flush left
    expected_eos = {"llava": "</s>", "qwen": "<|im_end|>"}[family["name"]]
    assert tok.convert_ids_to_tokens(chat.eos_token_id) == expected_eos
    if family["name"] == "qwen":  # the image tokens are marked, the answer's tokens are text
        assert (batch["mm_token_type_ids"] * batch["completion_mask"]).sum() == 0
        image = tok.convert_tokens_to_ids("<|image_pad|>")
        torch.testing.assert_close(batch["mm_token_type_ids"].bool(), batch["input_ids"] == image)


def test_the_mapping_keeps_the_preferred_answer_as_chosen(family):
    row = family["rows"][0]
    mapped = to_conversational(row)
    assert answer_text(mapped["chosen"]) == row["chosen"] and answer_text(mapped["rejected"]) == row["rejected"]
    assert row["chosen"] != row["rejected"]
    for pair, original in zip(family["pairs"], family["rows"]):
        assert answer_text(pair["chosen"]) == original["chosen"] and answer_text(pair["rejected"]) == original["rejected"]


def test_unsampleable_tokens(family):
    chat = family["chat"]
    tok, vocab = chat.tokenizer, family["model_obj"].get_output_embeddings().weight.shape[0]
    banned = set(chat.unsampleable_ids(vocab))
    names = {"llava": ["<image>", "<pad>", "<s>", "<unk>"],
             "qwen": ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|im_start|>", "<|endoftext|>"]}
    assert set(tok.convert_tokens_to_ids(names[family["name"]])) <= banned
    assert chat.eos_token_id not in banned
    assert set(range(len(tok), vocab)) <= banned and vocab > len(tok)  # the padded embedding rows
    assert not banned & set(tok("the picture shows a dog", add_special_tokens=False)["input_ids"])


def test_evaluate_generates_answers_on_both_families(family, tmp_path):
    """Evaluate's answer generation (greedy, batched, resumable) runs on each family's real format."""
    import json

    from training.evaluate import generate_answers, load_test_rows

    rows = load_test_rows(family["data"], limit=2)
    answers = generate_answers(family["model"], rows, tmp_path / "answers.jsonl", batch_size=2, max_new_tokens=4,
                               device="cpu", progress=False)
    assert len(answers) == sum(len(r) for r in rows.values()) == 4
    assert all(isinstance(a, str) for a in answers.values()) and any(answers.values())
    records = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert {(r["split"], r["id"]) for r in records} == set(answers)
