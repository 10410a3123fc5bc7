"""A tiny random-weight LLaVA written from configs on the spot, for offline demos and tests.

No download: a CLIP vision tower and a Llama language model are built from small configs, and a
byte-level BPE tokenizer is trained on a built-in English corpus plus the taxonomy's words. The
folder loads like any LLaVA-1.5 checkpoint; the model writes gibberish::

    from transformers import AutoModelForImageTextToText, AutoProcessor
    path = build_tiny_llava("/tmp/tiny-llava", seed=0)
    model = AutoModelForImageTextToText.from_pretrained(path)   # a LlavaForConditionalGeneration
    processor = AutoProcessor.from_pretrained(path)             # USER: <image>\\n... ASSISTANT:
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from builder.errors import DataError
from builder.folder import swap_into_place
from builder.taxonomy import Taxonomy

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]  # ids 0..4 in this order
PATCH_SIZE = 8

# LLaVA-1.5's prompt format ("USER: <image>\n... ASSISTANT:") for string or OpenAI-style part-list
# content. The BOS is in the template (not added by the tokenizer) so that template and tokenization
# compose: trl tokenizes rendered chats with add_special_tokens=False.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- else -%}{{- ' ' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
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

README = """# Tiny random-weight LLaVA (demo model)

Written by `builder.tiny_vlm.build_tiny_llava` (seed {seed}). **Random weights: the model writes
gibberish.** It exists so that generation, judging and DPO code can run offline, on CPU, in seconds.

- `LlavaForConditionalGeneration`: CLIP vision tower ({image_size}x{image_size} images, patch {patch},
  {n_image} image tokens) + Llama language model (hidden {hidden}, {layers} layers), {params:,} parameters
- byte-level BPE tokenizer ({vocab} tokens) trained on a small English corpus and the SPA-VL taxonomy words
- LLaVA-1.5 chat template: `USER: <image>\\n... ASSISTANT:`

Load it with `AutoModelForImageTextToText.from_pretrained(path)` and `AutoProcessor.from_pretrained(path)`.
"""


def default_corpus() -> list[str]:
    """The built-in English lines plus template lines naming every taxonomy label."""
    lines = BASE_CORPUS.splitlines()
    for c1, c2, c3 in Taxonomy.load().paths():
        lines += [t.format(c1=c1, c2=c2, c3=c3) for t in TEMPLATES]
    return lines


def build_tiny_llava(out_dir, *, seed: int = 0, corpus: list[str] | None = None, vocab_size: int = 512,
                     hidden_size: int = 64, layers: int = 2, image_size: int = 32, overwrite: bool = False) -> Path:
    """Write a tiny random-weight LLaVA (CLIP vision tower + Llama language model) with a byte-level BPE
    tokenizer trained on `corpus` (default: a built-in few hundred lines of English plus the words of the
    shipped SPA-VL taxonomy, `builder.taxonomy.Taxonomy.load()`), an image processor (CLIPImageProcessorPil),
    a chat template, and a generation config. For offline demos and tests only: the model writes gibberish.
    Deterministic: same seed → identical weights (safetensors) and files. Written to a temp folder then renamed."""
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

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError("output folder exists and is not empty; pass overwrite=True to replace it", file=str(out))
    if image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a multiple of {PATCH_SIZE}, got {image_size}")
    tokenizer = _train_tokenizer(corpus if corpus is not None else default_corpus(), vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    n_image = (image_size // PATCH_SIZE) ** 2  # CLS is dropped by vision_feature_select_strategy="default"
    heads = max(1, hidden_size // 16)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
            num_attention_heads=heads, image_size=image_size, patch_size=PATCH_SIZE, projection_dim=hidden_size,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=2048, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
            pad_token_id=ids["<pad>"],
        ),
        image_token_index=ids["<image>"], image_seq_length=n_image, vision_feature_select_strategy="default",
        vision_feature_layer=-1, pad_token_id=ids["<pad>"],  # -1: LLaVA-1.5's -2 would leave the last vision layer idle
    )
    with torch.random.fork_rng(devices=[]):  # seeds the init without moving the caller's RNG
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"], do_sample=False,
    )
    side = {"height": image_size, "width": image_size}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=side),
        tokenizer=tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLIP tower's CLS token; "default" strategy then drops it again
        chat_template=CHAT_TEMPLATE,
    )

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        params = sum(p.numel() for p in model.parameters())
        (tmp / "README.md").write_text(README.format(
            seed=seed, image_size=image_size, patch=PATCH_SIZE, n_image=n_image, hidden=hidden_size,
            layers=layers, params=params, vocab=len(tokenizer),
        ))
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _train_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style: every byte is a token, so any text encodes and decodes back)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, model_max_length=2048,
    )
