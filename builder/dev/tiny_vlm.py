"""Tiny random-weight VLMs written on the spot in the real checkpoints' formats, for offline demos and tests.

No download. Each folder loads like the checkpoint it imitates and carries its prompt format token for
token; the models write gibberish::

    path = build_tiny_llava("/tmp/tiny-llava", seed=0)        # like llava-hf/llava-1.5-7b-hf
    path = build_tiny_qwen2_5_vl("/tmp/tiny-qwen", seed=0)    # like Qwen/Qwen2.5-VL-7B-Instruct
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = builder.vlm.chat.load_processor(path)           # Qwen: its processor without the video half

What is real (from the public configs): **LLaVA-1.5** (llava-hf): the chat template ``USER: <image>\\n{q}
ASSISTANT:`` with no BOS in it (the Llama tokenizer adds ``<s>``; ``add_bos_token: true``) and answers
rendered as ``ASSISTANT: {a} `` (a trailing space, no ``</s>``); ``<unk> <s> </s>`` at ids 0-2, byte
fallback tokens ``<0x00>``..``<0xFF>`` next, ``<image>`` and ``<pad>`` added after the vocabulary, the
model's vocabulary padded past the tokenizer's (32064 vs 32002); a CLIP tower with a CLS token
(``num_additional_image_tokens: 1``, strategy ``default``). **Qwen2.5-VL-Instruct**: the ChatML template
with its default system turn, ``<|vision_start|><|image_pad|><|vision_end|>`` per image and turns closed
by ``<|im_end|>\\n``; no BOS; ``eos_token <|im_end|>``, ``pad_token <|endoftext|>``; the special tokens in
Qwen's order after the vocabulary; ``preprocessor_config.json`` of ``Qwen2VLImageProcessor`` (min/max
pixels, 14 px patches merged 2x2); a generation config with Qwen's own sampling defaults (top_k 1,
repetition_penalty 1.05); processor outputs ``pixel_values`` (flat patches), ``image_grid_thw`` and
``mm_token_type_ids``. What is not: the sizes, the vocabularies (BPE trained on a small English corpus
plus the taxonomy's words) and the weights.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from builder.errors import DataError
from builder.files import swap_into_place
from builder.taxonomy import Taxonomy

PATCH_SIZE = 8
LLAVA_SPECIAL = ["<unk>", "<s>", "</s>"]  # ids 0..2, then 256 byte-fallback tokens, as in Llama's vocabulary
LLAVA_ADDED = ["<image>", "<pad>"]  # appended after the vocabulary, as llava-hf's added_tokens.json has them
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # Qwen's order
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# llava-hf/llava-1.5-7b-hf's format (written here, not copied): a role prefix except for system turns, each
# image as "<image>\n" first, then the text parts each followed by a space; no BOS, no EOS.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{- message['role'] | upper ~ ': ' -}}{%- endif -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}"
    "{%- if message['role'] == 'assistant' -%}{%- generation -%}{{- part['text'] ~ ' ' -}}{%- endgeneration -%}"
    "{%- else -%}{{- part['text'] ~ ' ' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# Qwen2.5-VL-Instruct's format (written here, not copied): ChatML with a default system turn.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}{%- endif -%}"
    "{{- '<|im_start|>' ~ message['role'] ~ '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

BASE_CORPUS = """\
The picture shows a small house next to a river under a grey sky.
A man in a blue coat is walking a dog along the street.
Two children are playing with a red ball in the park.
There is a cup of coffee on the wooden table by the window.
The photo was taken at night, and the city lights are bright.
A woman is reading a book while she waits for the train.
The sign on the door says that the shop is closed today.
I can describe what I see in the image, but I cannot identify real people.
I am sorry, but I cannot help with that request because it could cause harm.
Sure, here is a short and safe answer to your question.
It is important to follow the law and to respect the rights of other people.
If you feel unsafe, please contact local emergency services or a trusted person.
This content may be harmful, so I will not give step by step instructions.
Please ask a doctor or a lawyer for advice about your own situation.
The chart shows that prices went up in the first half of the year.
A green car is parked in front of an old stone building.
The cat is sleeping on a soft chair near the warm fire.
Many people are standing in line outside the museum.
What is happening in this image? Describe it in one sentence.
Is it safe to do what the person in the picture is doing?
Which answer is better, A or B? Answer with a single letter.
Answer A is more helpful and answer B is more harmless.
The first response refuses politely and explains the risk.
The second response gives details that could be misused.
Both responses are fluent, but only one of them is safe.
The question asks about a topic that can hurt people or break the law.
A helpful assistant gives clear, honest and careful answers.
We should never share private information about other people.
The weather is cold, so everyone in the photo wears a warm jacket.
An old map of the town hangs on the wall of the library.
A group of friends is sharing a meal at a long table.
The bridge crosses the river and leads to the market square.
The teacher writes a simple question on the white board.
There are three apples and one orange in the basket.
The text in the image is too small to read clearly.
Scientists study the data to learn how the world works.
A bird is sitting on the branch of a tall tree.
The road is wet after the rain, and the sky is clearing.
Good evidence comes from reliable sources and careful checks.
Thank you for your question; here is what the image contains.
USER: What is in this image? ASSISTANT: A dog is lying on a bed.
USER: Can you help me with this? ASSISTANT: I am sorry, but I cannot help with that.
USER: Describe the picture. ASSISTANT: The picture shows a quiet street at night.
USER: Which response is safer? ASSISTANT: Response A is safer than response B.
"""

TEMPLATES = (
    "The image is about {c3}, which belongs to {c2} under {c1}.",
    "Is this picture related to {c3}? The question may involve {c2}.",
    "A safe answer about {c3} explains the risk and refuses to help with harm.",
    "Question about {c3}: what does the image show, and is it harmful?",
)

README = """# Tiny random-weight {family} (demo model)

Written by `builder.dev.tiny_vlm.{builder}` (seed {seed}). **Random weights: the model writes gibberish.**
It exists so that generation, judging, DPO, reward-model and PPO code can run offline, on CPU, in seconds,
on the prompt format of `{real}`: {format}.

- `{cls}`, {params:,} parameters, {n_image}
- BPE tokenizer ({vocab} tokens) trained on a small English corpus and the SPA-VL taxonomy words

Load it with `AutoModelForImageTextToText.from_pretrained(path)` and `builder.vlm.chat.load_processor(path)`.
"""


def default_corpus() -> list[str]:
    """The built-in English lines plus template lines naming every taxonomy label."""
    lines = BASE_CORPUS.splitlines()
    for c1, c2, c3 in Taxonomy.load().paths():
        lines += [t.format(c1=c1, c2=c2, c3=c3) for t in TEMPLATES]
    return lines


def build_tiny_llava(out_dir, *, seed: int = 0, corpus: list[str] | None = None, vocab_size: int = 1024,
                     hidden_size: int = 64, layers: int = 2, image_size: int = 32, overwrite: bool = False) -> Path:
    """Write a tiny random-weight LLaVA-1.5 (CLIP vision tower + Llama language model) in llava-hf's layout:
    a Llama BPE tokenizer (byte fallback, BOS added) trained on `corpus` (default: a few hundred lines of
    English plus the words of the shipped taxonomy), `CLIPImageProcessorPil`, llava-hf's chat template and
    generation config. Deterministic: the same seed gives identical files. Written to a temp folder, then renamed."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a multiple of {PATCH_SIZE}, got {image_size}")
    _check_out(out_dir, overwrite)
    tokenizer = llama_tokenizer(corpus if corpus is not None else default_corpus(), vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL + LLAVA_ADDED}
    n_image = (image_size // PATCH_SIZE) ** 2  # CLS is dropped by vision_feature_select_strategy="default"
    heads = max(1, hidden_size // 16)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
            num_attention_heads=heads, image_size=image_size, patch_size=PATCH_SIZE, projection_dim=hidden_size,
        ),
        text_config=LlamaConfig(
            vocab_size=_round_up(len(tokenizer), 64), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=4096, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
        ),
        image_token_index=ids["<image>"], image_seq_length=n_image, vision_feature_select_strategy="default",
        vision_feature_layer=-1, pad_token_id=ids["<pad>"],  # -1: LLaVA-1.5's -2 would leave the last vision layer idle
        tie_word_embeddings=False,
    )
    model = _seeded(LlavaForConditionalGeneration, config, seed, torch)
    model.generation_config = GenerationConfig(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                                               pad_token_id=ids["<pad>"])
    side = {"height": image_size, "width": image_size}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=side,
                                              image_mean=CLIP_MEAN, image_std=CLIP_STD),
        tokenizer=tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLIP tower's CLS token; "default" strategy then drops it again
        chat_template=LLAVA_CHAT_TEMPLATE,
    )

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(README.format(
            family="LLaVA-1.5", builder="build_tiny_llava", seed=seed, real="llava-hf/llava-1.5-7b-hf",
            format="`USER: <image>\\n... ASSISTANT:`, BOS from the tokenizer, no EOS in the template",
            cls="LlavaForConditionalGeneration", params=sum(p.numel() for p in model.parameters()),
            n_image=f"{image_size}x{image_size} images, {n_image} image tokens", vocab=len(tokenizer)))

    return _write_folder(Path(out_dir), write)


def build_tiny_qwen2_5_vl(out_dir, *, seed: int = 0, corpus: list[str] | None = None, vocab_size: int = 1024,
                          hidden_size: int = 64, layers: int = 2, overwrite: bool = False) -> Path:
    """Write a tiny random-weight Qwen2.5-VL-Instruct in Qwen's layout (config, generation config, Qwen2
    tokenizer with Qwen's special tokens, ``preprocessor_config.json``, ``chat_template.json``). Its images
    are any size: one image token per 28x28 pixels (a 32 px image is resized to 56x56: 4 tokens)."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    _check_out(out_dir, overwrite)
    tokenizer = qwen_tokenizer(corpus if corpus is not None else default_corpus(), vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    heads = max(1, hidden_size // 16)
    config = Qwen2_5_VLConfig(
        vision_config={"depth": layers, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                       "out_hidden_size": hidden_size, "fullatt_block_indexes": [layers - 1]},
        text_config={"vocab_size": _round_up(len(tokenizer), 128), "hidden_size": hidden_size,
                     "intermediate_size": 2 * hidden_size, "num_hidden_layers": layers,
                     "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2),
                     "max_position_embeddings": 4096, "tie_word_embeddings": False,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = _seeded(Qwen2_5_VLForConditionalGeneration, config, seed, torch)
    # Qwen's own defaults: sampling with top_k 1 and a repetition penalty (callers that sample must override them)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"], do_sample=True,
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], repetition_penalty=1.05, temperature=0.1,
        top_p=0.001, top_k=1)
    preprocessor = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                    "merge_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
                    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
        (tmp / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_CHAT_TEMPLATE}, indent=2) + "\n")
        (tmp / "README.md").write_text(README.format(
            family="Qwen2.5-VL", builder="build_tiny_qwen2_5_vl", seed=seed, real="Qwen/Qwen2.5-VL-7B-Instruct",
            format="ChatML with `<|vision_start|><|image_pad|><|vision_end|>`, turns closed by `<|im_end|>`",
            cls="Qwen2_5_VLForConditionalGeneration", params=sum(p.numel() for p in model.parameters()),
            n_image="one image token per 28x28 pixels", vocab=len(tokenizer)))

    return _write_folder(Path(out_dir), write)


def llama_tokenizer(corpus: list[str], vocab_size: int = 1024):
    """A Llama-style tokenizer: sentencepiece-like BPE (``▁`` for spaces, byte fallback), BOS added, padding left,
    ``<unk> <s> </s>`` at 0-2 and ``<image>``, ``<pad>`` appended after the vocabulary."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import LlamaTokenizer

    reserved = LLAVA_SPECIAL + [f"<0x{i:02X}>" for i in range(256)]
    vocab, merges = _train_bpe(corpus, vocab_size, reserved, pre_tokenizers.Metaspace(replacement="▁",
                                                                                      prepend_scheme="first"))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, legacy=False,
                               padding_side="left", model_max_length=4096)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in LLAVA_ADDED], special_tokens=True)
    tokenizer.pad_token = "<pad>"
    return tokenizer


def qwen_tokenizer(corpus: list[str], vocab_size: int = 1024):
    """A Qwen2 tokenizer: byte-level BPE with Qwen's split pattern, no BOS, Qwen's special tokens after the
    vocabulary in Qwen's order, ``eos_token <|im_end|>`` and ``pad_token <|endoftext|>`` (the Instruct setup)."""
    from tokenizers import AddedToken, Regex, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    vocab, merges = _train_bpe(corpus, vocab_size, [], split, alphabet=pre_tokenizers.ByteLevel.alphabet())
    for token in QWEN_SPECIAL:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", model_max_length=131072, errors="replace")
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL], special_tokens=True)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def _train_bpe(corpus, vocab_size, reserved, pre_tokenizer, alphabet=()):
    """(vocab, merges) of a BPE trained on ``corpus``; ``reserved`` tokens take the first ids."""
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(reserved), initial_alphabet=list(alphabet),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(sorted(model["vocab"].items(), key=lambda kv: kv[1])), merges


def _seeded(cls, config, seed: int, torch):
    with torch.random.fork_rng(devices=[]):  # seeds the init without moving the caller's RNG
        torch.manual_seed(seed)
        return cls(config).eval()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check_out(out_dir, overwrite: bool) -> None:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError("output folder exists and is not empty; pass overwrite=True to replace it", file=str(out))


def _write_folder(out: Path, write) -> Path:
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
