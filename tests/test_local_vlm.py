"""The tiny random-weight LLaVA builder and the in-process transformers backend, on CPU, offline."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from builder.errors import DataError
from builder.local_vlm import LocalVLM, load_local_vlm
from builder.tiny_vlm import build_tiny_llava

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


def test_folder_loads_as_llava(tiny, image):
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        LlavaForConditionalGeneration,
    )

    model = AutoModelForImageTextToText.from_pretrained(tiny)
    processor = AutoProcessor.from_pretrained(tiny)
    assert isinstance(model, LlavaForConditionalGeneration)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000

    text = processor.apply_chat_template(IMAGE_CHAT, add_generation_prompt=True)
    assert text == "<s>You are a careful assistant. USER: <image>\nWhat is in this image? ASSISTANT:"
    inputs = processor(text=text, images=[image], return_tensors="pt", add_special_tokens=False)
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image == model.config.image_seq_length == 16  # (32 / 8)² patches: CLS added, then dropped
    with torch.inference_mode():
        model(**inputs)  # image tokens and image features agree

    tok = processor.tokenizer
    sentence = "The image shows a violent threat. USER: ASSISTANT:"
    assert tok.decode(tok(sentence)["input_ids"]) == sentence  # byte-level BPE round-trips readable words
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.unk_token == "<unk>"


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
