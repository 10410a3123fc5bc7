"""One prompt format for every model call: chat messages → token ids, the same for DPO, the reward model,
PPO, evaluate's answers and the pipeline's local backend.

    processor = load_processor("llava-hf/llava-1.5-7b-hf")       # Qwen2.5-VL: without its video half
    chat = ChatFormat(processor)
    inputs = chat.prompt_inputs([messages], [[image]])            # what generate() gets
    batch = chat.pair_batch(rows)                                 # DPO and RM: chosen rows, then rejected rows
    scored = chat.sequences(inputs, [answer_ids])                 # PPO: prompt + sampled answer

The rules, in one place:

- **Prompt**: the processor's chat template with the generation prompt. The tokenizer's own special
  tokens are added (llava-hf: the BOS ``<s>``, which its template leaves out; Qwen: none) unless the
  template already wrote the BOS. That is how the checkpoints were trained and how their model cards
  prompt them (LLaVA's training prompts start with ``<s>``).
- **Answer**: the text the template puts after the prompt for an assistant turn, cut after the answer's
  last character, tokenized in context, then **the tokenizer's EOS token**: ``</s>`` for LLaVA (the
  authors' v1 template ends every answer with it; llava-hf's template writes a space instead),
  ``<|im_end|>`` for Qwen2.5-VL-Instruct (its template's end of turn; the ``\\n`` after it is not part of
  the answer). A model stops generating there, the reward model is trained to read its score there, and
  PPO reads it there (appended when an answer was cut at the length limit).
- **Batches** of whole sequences are flush left: every row starts at position 0 and is padded on the
  right, so plain positions match the ones generate() uses; per-token inputs other than ids and mask
  (Qwen's ``mm_token_type_ids``, Gemma's ``token_type_ids``) grow with zeros over the answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from builder.errors import DataError

PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


# --- loading -----------------------------------------------------------------------------------------
def load_processor(path: str, *, field: str = "model"):
    """``AutoProcessor.from_pretrained(path)``; when that fails only because of the video half (it wants
    torchvision: Qwen2-VL, Qwen2.5-VL, ... in transformers 5; or the folder was saved without one), the same
    processor class without its video processor."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except (ImportError, OSError) as e:  # no torchvision; or a folder saved from an image-only processor
        if "torchvision" not in str(e).lower() and "video" not in str(e).lower():
            raise
    return image_only_processor(path, field=field)


def image_only_processor(path: str, *, field: str = "model"):
    """The checkpoint's own processor class with the image processor, tokenizer and chat template only.

    The class keeps the original name, so a processor saved from it (``save_pretrained``) is still the
    checkpoint's processor to anyone who has torchvision."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    name = _processor_class_name(Path(path))
    base = getattr(transformers, name or "", None)
    if base is None:
        raise DataError(f"cannot tell which processor class this folder needs (found {name!r})", file=str(path),
                        field=field)
    attributes = [a for a in base.get_attributes() if a != "video_processor"]
    cls = type(base.__name__, (base,), {"get_attributes": classmethod(lambda c: list(attributes)),
                                        "__module__": __name__})
    tokenizer = AutoTokenizer.from_pretrained(path)
    parts = {"image_processor": AutoImageProcessor.from_pretrained(path), "tokenizer": tokenizer}
    return cls(**{a: parts[a] for a in attributes}, chat_template=_chat_template(Path(path), tokenizer))


def _processor_class_name(folder: Path) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        f = folder / name
        if f.is_file():
            found = json.loads(f.read_text()).get("processor_class")
            if found:
                return found
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    return PROCESSOR_MAPPING_NAMES.get(AutoConfig.from_pretrained(str(folder)).model_type)


def _chat_template(folder: Path, tokenizer) -> str | None:
    for name in TEMPLATE_FILES:
        f = folder / name
        if f.is_file():
            return f.read_text() if name.endswith(".jinja") else json.loads(f.read_text())["chat_template"]
    return getattr(tokenizer, "chat_template", None)


# --- messages ----------------------------------------------------------------------------------------
def prompt_messages(question: str) -> list[dict]:
    """The user turn of a SPA-VL row: its image, then its question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def answer_messages(answer: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def answer_text(messages: list[dict]) -> str:
    """The text of an assistant turn (a string, or the text parts of a part list)."""
    content = messages[-1]["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content
                                                            if p.get("type") == "text")


def normalize_messages(messages: list[dict]) -> list[dict]:
    """String contents as one text part: llava-hf's template renders part lists only (a string would vanish)."""
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
            for m in messages]


# --- the format ------------------------------------------------------------------------------------
class ChatFormat:
    """Messages → token ids for one processor (see the module docstring for the rules)."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", None)
        if self.tokenizer is None or not getattr(processor, "chat_template", None):
            raise DataError("the model's processor needs a tokenizer and a chat template", field="model")
        if self.tokenizer.eos_token_id is None:
            raise DataError("the model's tokenizer has no EOS token to end answers with", field="model")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        probe = self.tokenizer("a")["input_ids"]
        bos = self.tokenizer.bos_token_id
        self.adds_bos = bos is not None and len(probe) > 1 and probe[0] == bos

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def render(self, messages: list[dict], *, generation_prompt: bool = True) -> str:
        return self.processor.apply_chat_template(normalize_messages(messages), tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def add_special_tokens(self, text: str) -> bool:
        """Whether the tokenizer adds its BOS to ``text``: yes, unless the template wrote it already."""
        bos = self.tokenizer.bos_token
        return self.adds_bos and not (bos and text.startswith(bos))

    def prompt_inputs(self, conversations: list[list[dict]], images: list[list], *, padding_side: str = "left"):
        """Model inputs of each conversation with the generation prompt (one list of PIL images per conversation;
        RGB-converted here): ``input_ids``, ``attention_mask`` and the processor's image tensors."""
        texts = [self.render(c) for c in conversations]
        flat = [im.convert("RGB") for ims in images for im in ims]
        return self.processor(text=texts, images=flat or None, padding=True, padding_side=padding_side,
                              add_special_tokens=self.add_special_tokens(texts[0]), return_tensors="pt")

    def completion_ids(self, conversation: list[dict], answer: str) -> list[int]:
        """The answer's tokens as they follow the prompt, then EOS."""
        prompt = self.render(conversation)
        full = self.render(conversation + answer_messages(answer), generation_prompt=False)
        suffix = full[len(prompt):] if full.startswith(prompt) else answer
        at = suffix.find(answer)
        suffix = suffix[:at + len(answer)] if at >= 0 else answer
        tok = self.tokenizer
        head = tok(prompt, add_special_tokens=False)["input_ids"]
        both = tok(prompt + suffix, add_special_tokens=False)["input_ids"]
        ids = both[len(head):] if both[:len(head)] == head else tok(suffix, add_special_tokens=False)["input_ids"]
        return list(ids) + [self.eos_token_id]

    def sequences(self, prompts, completions: list[list[int]]) -> dict:
        """Prompt inputs (any padding) + one completion per row → a flush-left batch padded on the right, with
        ``completion_mask`` (1 on completion tokens) and the prompt inputs' image tensors unchanged."""
        mask = prompts["attention_mask"].bool()
        keys = [k for k in PER_TOKEN if k in prompts]
        rows = []
        for i, completion in enumerate(completions):
            row = {k: prompts[k][i][mask[i]].tolist() for k in keys}
            fill = {"input_ids": list(completion), "attention_mask": [1] * len(completion)}
            rows.append({k: row[k] + fill.get(k, [0] * len(completion)) for k in keys}
                        | {"completion_mask": [0] * int(mask[i].sum()) + [1] * len(completion)})
        width = max(len(r["input_ids"]) for r in rows)
        out = {}
        for k in keys + ["completion_mask"]:
            pad = self.pad_token_id if k == "input_ids" else 0
            out[k] = torch.tensor([r[k] + [pad] * (width - len(r[k])) for r in rows],
                                  dtype=prompts["input_ids"].dtype)
        return {**{k: v for k, v in prompts.items() if k not in PER_TOKEN}, **out}

    def pair_batch(self, rows: list[dict]) -> dict:
        """A batch of conversational preference rows (``prompt``, ``chosen``, ``rejected``, ``images``): the
        chosen sequences first, then the rejected ones, each prompt + answer + EOS (2B rows)."""
        conversations = [r["prompt"] for r in rows] * 2
        prompts = self.prompt_inputs(conversations, [r["images"] for r in rows] * 2)
        completions = [self.completion_ids(r["prompt"], answer_text(r[side]))
                       for side in ("chosen", "rejected") for r in rows]
        return self.sequences(prompts, completions)

    def unsampleable_ids(self, vocab_size: int) -> list[int]:
        """Ids an answer never contains: special tokens (image placeholders, padding, BOS, turn markers) other
        than EOS, and the ids past the tokenizer that a padded embedding matrix has (LLaVA: 32002..32063)."""
        tok, banned = self.tokenizer, set(self.tokenizer.all_special_ids)
        banned |= {i for i, t in tok.added_tokens_decoder.items() if getattr(t, "special", False)}
        for name in ("image_token_id", "video_token_id", "audio_token_id"):
            value = getattr(self.processor, name, None)
            if isinstance(value, int):
                banned.add(value)
        banned |= set(range(len(tok), vocab_size))
        banned.discard(self.eos_token_id)
        return sorted(i for i in banned if 0 <= i < vocab_size)


class PreferenceCollator:
    """trl's data collator for DPO over our prompt format (``DPOTrainer(data_collator=...)``): what trl's
    vision collator returns (ids, mask, ``completion_mask``, image tensors), chosen rows first."""

    def __init__(self, chat: ChatFormat):
        self.chat = chat

    def __call__(self, rows: list[dict]) -> dict:
        return self.chat.pair_batch(rows)
