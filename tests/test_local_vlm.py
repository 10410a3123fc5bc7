"""The tiny random-weight LLaVA and Qwen2.5-VL builders (real formats) and the in-process transformers backend,
on CPU, offline."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from builder.errors import DataError
from builder.vlm.local import LocalVLM, load_local_vlm
from builder.dev.tiny_vlm import build_tiny_llava, build_tiny_qwen2_5_vl

IMAGE_CHAT = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]},
]
TEXT_CHAT = [{"role": "user", "content": "Is it safe to cross the road here?"}]


def _digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava", seed=0)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("models") / "tiny-qwen", seed=0)


@pytest.fixture(scope="module")
def vlm(tiny):
    return LocalVLM(str(tiny), device="cpu")


@pytest.fixture(scope="module")
def image():
    return Image.new("RGB", (48, 40), (180, 40, 40))


def test_build_is_deterministic_per_seed(tiny, tmp_path):
    again = build_tiny_llava(tmp_path / "again", seed=0)
    other = build_tiny_llava(tmp_path / "other", seed=1)
    assert _digests(again) == _digests(tiny)
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "README.md"} <= set(_digests(tiny))
    assert _digests(other)["model.safetensors"] != _digests(tiny)["model.safetensors"]
    assert "random" in (tiny / "README.md").read_text().lower()
    assert not list(tmp_path.glob(".*tmp*"))  # the temp folder was renamed into place


def test_build_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="overwrite"):
        build_tiny_llava(out)
    build_tiny_llava(out, overwrite=True)
    assert not (out / "keep.txt").exists()


def test_folder_loads_as_llava_with_llava_hf_s_format(tiny, image):
    """The folder carries llava-hf/llava-1.5-7b-hf's template, special tokens and processor settings."""
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        LlavaForConditionalGeneration,
    )

    model = AutoModelForImageTextToText.from_pretrained(tiny)
    processor = AutoProcessor.from_pretrained(tiny)
    assert isinstance(model, LlavaForConditionalGeneration)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000

    # llava-hf's template: no BOS, a space after each text part, no </s> after the answer
    chat = [IMAGE_CHAT[1]]
    assert processor.apply_chat_template(chat, add_generation_prompt=True) == \
        "USER: <image>\nWhat is in this image? ASSISTANT:"
    answered = chat + [{"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}]
    assert processor.apply_chat_template(answered) == "USER: <image>\nWhat is in this image? ASSISTANT: A red square. "
    # ...which renders a string content as nothing: callers pass part lists (builder.vlm.chat normalises them)
    assert processor.apply_chat_template(TEXT_CHAT, add_generation_prompt=True) == "USER: ASSISTANT:"

    tok = processor.tokenizer
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens(3) == "<0x00>" and tok.convert_ids_to_tokens(258) == "<0xFF>"
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [len(tok) - 2, len(tok) - 1]  # after the vocabulary
    assert tok.pad_token == "<pad>" and tok.padding_side == "left"
    assert model.config.text_config.vocab_size > len(tok) and model.config.text_config.vocab_size % 64 == 0
    assert tok("Hello")["input_ids"][0] == tok.bos_token_id  # add_bos_token, as llava-hf's Llama tokenizer
    sentence = "The image shows a violent threat. USER: ASSISTANT: café ☃"
    assert tok.decode(tok(sentence)["input_ids"], skip_special_tokens=True) == sentence  # byte fallback

    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(text=text, images=[image], return_tensors="pt")
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image == model.config.image_seq_length == 16  # (32 / 8)² patches: CLS added, then dropped
    assert processor.num_additional_image_tokens == 1 and processor.vision_feature_select_strategy == "default"
    with torch.inference_mode():
        model(**inputs)  # image tokens and image features agree


def test_qwen_folder_has_qwen_s_format(qwen, image):
    """The tiny Qwen2.5-VL carries Qwen2.5-VL-Instruct's template, tokens, processor outputs and sampling
    defaults; transformers' own AutoProcessor needs torchvision for the video half, ours does without."""
    from transformers import AutoProcessor

    from builder.vlm.chat import load_processor

    with pytest.raises((ImportError, OSError), match="orchvision|video"):
        AutoProcessor.from_pretrained(qwen)
    processor = load_processor(str(qwen))
    assert type(processor).__name__ == "Qwen2_5_VLProcessor" and not hasattr(processor, "video_processor")
    chat = [IMAGE_CHAT[1]]
    assert processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What is in this image?<|im_end|>\n<|im_start|>assistant\n")
    tok = processor.tokenizer
    assert tok.bos_token is None and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok("Hello")["input_ids"] == tok("Hello", add_special_tokens=False)["input_ids"]  # no BOS
    specials = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"])
    assert specials == [specials[0], specials[0] + 1, specials[0] + 2, specials[0] + 12]  # Qwen's order
    text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"} <= set(inputs)
    n_image = int((inputs["input_ids"] == specials[3]).sum())
    assert n_image == int(inputs["image_grid_thw"].prod()) // 4 and inputs["mm_token_type_ids"].sum() == n_image
    assert inputs["pixel_values"].shape[0] == int(inputs["image_grid_thw"].prod())  # flat patches
    config = json.loads((qwen / "generation_config.json").read_text())
    assert config["top_k"] == 1 and config["repetition_penalty"] == 1.05 and config["do_sample"] is True


def test_local_backend_runs_a_qwen_folder(qwen, image):
    vlm = LocalVLM(str(qwen), device="cpu")
    for messages, images in ((IMAGE_CHAT, [image]), (TEXT_CHAT, [])):
        greedy = vlm.generate(messages, images, max_new_tokens=6)
        assert greedy.text and 0 < greedy.completion_tokens <= 6
    probs = vlm.choice_probabilities(IMAGE_CHAT, [image], ["A", "B"])
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)


def test_generate_with_an_image_and_text_only(vlm, image):
    for messages, images in ((IMAGE_CHAT, [image]), (TEXT_CHAT, [])):
        greedy = vlm.generate(messages, images, max_new_tokens=8)
        assert greedy.text and greedy.prompt_tokens > 0 and 0 < greedy.completion_tokens <= 8
        assert vlm.generate(messages, images, max_new_tokens=8) == greedy
        sampled = vlm.generate(messages, images, max_new_tokens=8, temperature=1.0, seed=3)
        assert sampled.text and vlm.generate(messages, images, max_new_tokens=8, temperature=1.0, seed=3) == sampled
    with_image = vlm.generate(IMAGE_CHAT, [image], max_new_tokens=1)
    assert with_image.prompt_tokens > 16  # the image's 16 tokens are counted in the prompt


def test_sampling_depends_on_the_seed(vlm, image):
    texts = {vlm.generate(IMAGE_CHAT, [image], max_new_tokens=8, temperature=1.0, seed=s).text for s in range(4)}
    assert len(texts) > 1


def test_generate_never_returns_empty_text(vlm, monkeypatch):
    eos = vlm.tokenizer.eos_token_id

    def only_special(input_ids, **kwargs):
        return torch.cat([input_ids, torch.tensor([[eos]])], dim=1)

    monkeypatch.setattr(vlm.model, "generate", only_special)
    assert vlm.generate(TEXT_CHAT, []).text == "</s>"


def test_image_parts_must_match_images(vlm, image):
    with pytest.raises(ValueError, match="1 image parts but 0 images"):
        vlm.generate(IMAGE_CHAT, [])
    with pytest.raises(ValueError, match="0 image parts but 1 images"):
        vlm.choice_probabilities(TEXT_CHAT, [image], ["A", "B"])


def test_choice_probabilities(vlm, image):
    probs = vlm.choice_probabilities(IMAGE_CHAT, [image], ["A", "B"])
    assert len(probs) == 2 and all(0 < p < 1 for p in probs)
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert vlm.choice_probabilities(IMAGE_CHAT, [image], ["A", "B"]) == probs
    three = vlm.choice_probabilities(TEXT_CHAT, [], ["A", "B", "neither of them"])
    assert sum(three) == pytest.approx(1.0, abs=1e-5)


def test_concurrent_calls_match_sequential_ones(vlm, image):
    def call(seed):
        return vlm.generate(IMAGE_CHAT, [image], max_new_tokens=6, temperature=1.0, seed=seed).text

    sequential = [call(s) for s in range(6)]
    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(call, range(6))) == sequential


def test_load_local_vlm_shares_one_instance(tiny):
    first = load_local_vlm(str(tiny), device="cpu")
    assert load_local_vlm(str(tiny / ".." / tiny.name), device="cpu") is first
    assert load_local_vlm(str(tiny), device="cpu", dtype="float32") is not first
    assert first.name == "tiny-llava"


def test_two_models_sampling_at_once_give_what_each_gives_alone(tiny, vlm, image, tmp_path):
    """The pipeline calls several local models from several threads at once; a sampled reply depends on its
    seed alone, not on what another model draws from the RNG meanwhile (the demo's generated folder was not
    byte-identical from one run to the next)."""
    from concurrent.futures import ThreadPoolExecutor

    other = LocalVLM(str(build_tiny_llava(tmp_path / "b", seed=1)), device="cpu")
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    calls = [(model, seed) for seed in range(6) for model in (vlm, other)]

    def sample(call):
        model, seed = call
        return model.generate(chat, [image], max_new_tokens=24, min_new_tokens=24, temperature=1.0, seed=seed).text

    alone = [sample(c) for c in calls]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(sample, calls))
    assert together == alone


def test_a_greedy_reply_leaves_torchs_rng_alone(vlm, image):
    """Greedy replies draw nothing and seed nothing: a pipeline thread answering greedily never resets the RNG
    another model samples from (only sampled calls seed it, under the process-wide lock)."""
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    vlm.generate(IMAGE_CHAT, [image], max_new_tokens=4)
    vlm.generate_batch([IMAGE_CHAT, TEXT_CHAT], [[image], []], max_new_tokens=4)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_generate_batch_is_greedy_and_padded_on_the_left(vlm, image):
    """Evaluate's answers: several chats in one left-padded batch, each the greedy reply it gets alone."""
    chats = [IMAGE_CHAT, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]]
    inputs = vlm.encode(chats, [[image], [image]])
    assert inputs["attention_mask"][:, -1].all() and not inputs["attention_mask"][:, 0].all()  # left padding
    replies = vlm.generate_batch(chats, [[image], [image]], max_new_tokens=6)
    assert replies == vlm.generate_batch(chats, [[image], [image]], max_new_tokens=6)
    assert replies[0] == vlm.generate_batch([chats[0]], [[image]], max_new_tokens=6)[0]
    with pytest.raises(ValueError, match="1 image parts but 0 images"):
        vlm.generate_batch(chats, [[image], []])


def test_a_lora_adapter_folder_loads_merged(tiny, image, tmp_path):
    """One loader for training, evaluate and the pipeline: an adapter folder names its base model, loads on top
    of it, and is merged for generation."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from builder.vlm.loading import adapter_base, load_vlm

    peft = get_peft_model(AutoModelForImageTextToText.from_pretrained(tiny),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")  # random B: the adapter changes the model
    assert adapter_base(str(tmp_path / "adapter")) == str(tiny) and adapter_base(str(tiny)) is None
    vlm = LocalVLM(str(tmp_path / "adapter"), device="cpu")
    assert not hasattr(vlm.model, "peft_config") and vlm.tokenizer.eos_token == "</s>"
    reference, _ = load_vlm(str(tmp_path / "adapter"), dtype="float32")
    plain = AutoModelForImageTextToText.from_pretrained(tiny).eval()
    inputs = vlm.encode([IMAGE_CHAT], [[image]])
    with torch.inference_mode():
        merged = vlm.model(**inputs).logits
        torch.testing.assert_close(merged, reference.eval()(**inputs).logits, rtol=1e-4, atol=1e-5)
        assert (merged - plain(**inputs).logits).abs().max() > 1e-3


def test_auto_dtype_per_device_and_purpose(monkeypatch):
    from builder.errors import DataError
    from builder.vlm.loading import resolve_dtype

    assert resolve_dtype("auto", device="cpu") is torch.float32 and resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16, device="cpu") is torch.float16
    with pytest.raises(DataError, match="unknown torch dtype 'nn'"):
        resolve_dtype("nn")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for bf16, training, expected in ((True, True, torch.bfloat16), (True, False, torch.bfloat16),
                                     (False, True, torch.float32), (False, False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, bf16=bf16, **k: bf16)
        assert resolve_dtype(None, device="cuda:0", training=training) is expected
        assert resolve_dtype("auto", device="cpu", training=training) is torch.float32
