"""The in-process transformers backend: a local VLM folder that generates answers and scores choices.

Any folder that `AutoModelForImageTextToText` and `AutoProcessor` load works (LLaVA-1.5, Qwen2.5-VL, or
the tiny demo models from `builder.dev.tiny_vlm`); prompts are encoded by `builder.vlm.chat`, as in training. Messages are OpenAI-style chats whose i-th `{"type": "image"}`
part is `images[i]`::

    vlm = load_local_vlm("/models/llava-1.5-7b-hf")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is this safe?"}]}]
    vlm.generate(messages, [image], max_new_tokens=64).text        # greedy
    vlm.choice_probabilities(messages, [image], ["A", "B"])          # e.g. [0.71, 0.29]
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image


_RNG_LOCK = threading.Lock()  # torch's global RNG is one per process, shared by every model


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int


class LocalVLM:
    """A local VLM (any AutoModelForImageTextToText + AutoProcessor folder, e.g. LLaVA-1.5 or Qwen2.5-VL)."""

    def __init__(self, path: str, *, device: str | None = None, dtype: str | None = None):
        from transformers import AutoModelForImageTextToText

        from builder.vlm.chat import ChatFormat, load_processor

        self.path = Path(path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            on_cuda = self.device.startswith("cuda")
            dtype = "bfloat16" if on_cuda and torch.cuda.is_bf16_supported() else "float32"
        self.dtype = getattr(torch, dtype)
        self.processor = load_processor(path)  # Qwen2.5-VL: without the video half that wants torchvision
        self.chat = ChatFormat(self.processor)  # the prompt format of training and evaluate, token for token
        self.tokenizer = self.processor.tokenizer
        # device_map loads the weights straight onto the device (no full copy in CPU memory first)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=self.dtype, device_map=self.device).eval()
        self._lock = threading.Lock()  # one model, several asyncio.to_thread callers

    @property
    def name(self) -> str:
        return self.path.name

    def generate(self, messages: list[dict], images: list[Image.Image], *, max_new_tokens: int = 128,
                 temperature: float = 0.0, seed: int = 0, min_new_tokens: int = 1) -> Generation:
        """The assistant's reply: greedy at temperature 0, else sampled (the same seed gives the same text)."""
        inputs = self._encode(messages, images)
        n_prompt = inputs["input_ids"].shape[1]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        options = {"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens, "pad_token_id": pad_id}
        if temperature > 0:
            # top_k=0/top_p=1: a checkpoint's own top_k/top_p (some ship top_k=1) would otherwise cancel the sampling
            options |= {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        else:
            options |= {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        # A sampled reply seeds torch's one global RNG: hold the process-wide lock, so that no other model's
        # call reseeds or draws from it mid-sample (greedy calls of different models may run side by side).
        rng = _RNG_LOCK if temperature > 0 else contextlib.nullcontext()
        with rng, self._lock, torch.inference_mode():
            torch.manual_seed(seed)
            new = self.model.generate(**inputs, **options)[0, n_prompt:].tolist()
        text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        if not text:
            # Callers treat "" as a failed call; a model that emits only special tokens still answered something.
            text = "".join(self.tokenizer.convert_ids_to_tokens(new))
        return Generation(text=text, prompt_tokens=n_prompt, completion_tokens=len(new))

    def choice_probabilities(self, messages: list[dict], images: list[Image.Image], choices: list[str]) -> list[float]:
        """P(choice | prompt) for each choice as the start of the reply, renormalised over the choices."""
        inputs = self._encode(messages, images)
        n_prompt = inputs["input_ids"].shape[1]
        scores = []
        for choice in choices:
            ids = self.tokenizer(choice, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"choice {choice!r} has no tokens")
            target = torch.tensor([ids], device=self.device)
            batch = dict(inputs)
            for key, value in inputs.items():  # every per-token tensor (ids, mask, token types) grows by the choice
                if value.shape == (1, n_prompt) and not value.is_floating_point():
                    fill = {"input_ids": target, "attention_mask": torch.ones_like(target)}.get(key, torch.zeros_like(target))
                    batch[key] = torch.cat([value, fill], dim=1)
            with self._lock, torch.inference_mode():
                logits = self.model(**batch).logits[0, n_prompt - 1:-1].float()
            scores.append(logits.log_softmax(-1).gather(-1, target[0].unsqueeze(-1)).sum())
        return torch.stack(scores).softmax(0).tolist()

    def _encode(self, messages: list[dict], images: list[Image.Image]):
        """The chat with the generation prompt, as model inputs (``builder.vlm.chat.ChatFormat``: the BOS once)."""
        n_parts = sum(1 for m in messages if not isinstance(m["content"], str)
                      for part in m["content"] if part.get("type") == "image")
        if n_parts != len(images):
            raise ValueError(f"messages have {n_parts} image parts but {len(images)} images were given")
        inputs = self.chat.prompt_inputs([messages], [list(images)])
        return {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in inputs.items()}


_CACHE: dict[tuple, LocalVLM] = {}
_CACHE_LOCK = threading.Lock()


def load_local_vlm(path: str, **kwargs) -> LocalVLM:
    """One shared LocalVLM per (folder, options): model-bag entries naming one folder load it once."""
    key = (str(Path(path).resolve()), tuple(sorted(kwargs.items())))
    with _CACHE_LOCK:  # held while loading, so two threads asking at once still load it once
        if key not in _CACHE:
            _CACHE[key] = LocalVLM(path, **kwargs)
        return _CACHE[key]
