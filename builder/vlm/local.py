"""The in-process VLM: a local model that answers chats (one at a time, or greedily in batches) and scores choices.

Any folder or Hub id that ``builder.vlm.loading.load_vlm`` loads works (LLaVA-1.5, Qwen2.5-VL, a LoRA
adapter folder, the tiny demo models of ``builder.dev.tiny_vlm``); prompts are encoded by
``builder.vlm.chat``, as in training. The pipeline's local backend and evaluate's answers both run here.
Messages are OpenAI-style chats whose i-th ``{"type": "image"}`` part is ``images[i]``::

    vlm = load_local_vlm("/models/llava-1.5-7b-hf")                   # shared per folder (the pipeline)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is this safe?"}]}]
    vlm.generate(messages, [image], max_new_tokens=64).text        # greedy (temperature > 0: sampled, seeded)
    vlm.choice_probabilities(messages, [image], ["A", "B"])          # e.g. [0.71, 0.29]
    vlm.generate_batch([messages, other], [[image], [image2]], max_new_tokens=256)   # greedy, left-padded
"""

from __future__ import annotations

import contextlib
import gc
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from builder.errors import DataError

_RNG_LOCK = threading.Lock()  # torch's global RNG is one per process, shared by every model
GREEDY = {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int


class LocalVLM:
    """A local VLM in eval mode on one device (a LoRA adapter is merged into its base for speed).

    ``dtype`` None: bf16 on a GPU that supports it, float16 on an older one, float32 on CPU. ``role`` names
    the model in errors (``model``, ``reference``)."""

    def __init__(self, path: str, *, device: str | None = None, dtype: str | None = None, role: str = "model"):
        from builder.vlm.chat import ChatFormat
        from builder.vlm.loading import default_device, load_vlm, resolve_dtype

        self.path = Path(path)
        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, device=self.device, training=False)
        # device_map loads the weights straight onto the device (no full copy in CPU memory first)
        model, self.processor = load_vlm(path, dtype=self.dtype, device_map=self.device, field=role)
        if hasattr(model, "merge_and_unload"):  # a LoRA adapter: merged for faster generation
            model = model.merge_and_unload()
        self.model = model.eval()
        try:
            self.chat = ChatFormat(self.processor)  # the prompt format of training, token for token
        except DataError as e:
            raise DataError(e.message, file=str(path), field=role) from None
        self.tokenizer = self.chat.tokenizer
        self._lock = threading.Lock()  # one model, several asyncio.to_thread callers

    @property
    def name(self) -> str:
        return self.path.name

    def generate(self, messages: list[dict], images: list[Image.Image], *, max_new_tokens: int = 128,
                 temperature: float = 0.0, seed: int = 0, min_new_tokens: int = 1) -> Generation:
        """The assistant's reply: greedy at temperature 0, else sampled (the same seed gives the same text)."""
        inputs = self.encode([messages], [images])
        n_prompt = inputs["input_ids"].shape[1]
        options = {"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens}
        if temperature > 0:
            # top_k=0/top_p=1: a checkpoint's own top_k/top_p (some ship top_k=1) would otherwise cancel the sampling
            options |= {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        else:
            options |= GREEDY
        # A sampled reply seeds torch's one global RNG: hold the process-wide lock, so that no other model's
        # call reseeds or draws from it mid-sample (greedy calls draw nothing and seed nothing: they run beside).
        with _RNG_LOCK if temperature > 0 else contextlib.nullcontext():
            new = self._new_tokens(inputs, options, seed=seed if temperature > 0 else None)[0].tolist()
        text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        if not text:
            # Callers treat "" as a failed call; a model that emits only special tokens still answered something.
            text = "".join(self.tokenizer.convert_ids_to_tokens(new))
        return Generation(text=text, prompt_tokens=n_prompt, completion_tokens=len(new))

    def generate_batch(self, conversations: list[list[dict]], images: list[list[Image.Image]], *,
                       max_new_tokens: int = 256) -> list[str]:
        """Greedy replies to several chats at once, left-padded in one batch (``images[i]``: chat i's images);
        a reply of special tokens only is ``""``."""
        inputs = self.encode(conversations, images)
        new = self._new_tokens(inputs, {"max_new_tokens": max_new_tokens, **GREEDY})
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def choice_probabilities(self, messages: list[dict], images: list[Image.Image], choices: list[str]) -> list[float]:
        """P(choice | prompt) for each choice as the start of the reply, renormalised over the choices."""
        inputs = self.encode([messages], [images])
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

    def encode(self, conversations: list[list[dict]], images: list[list[Image.Image]]) -> dict:
        """The chats with the generation prompt as model inputs on the model's device, left-padded
        (``builder.vlm.chat.ChatFormat``: the BOS once)."""
        for messages, given in zip(conversations, images, strict=True):
            n_parts = sum(1 for m in messages if not isinstance(m["content"], str)
                          for part in m["content"] if part.get("type") == "image")
            if n_parts != len(given):
                raise ValueError(f"messages have {n_parts} image parts but {len(given)} images were given")
        inputs = self.chat.prompt_inputs(conversations, [list(given) for given in images])
        return {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in inputs.items()}

    def _new_tokens(self, inputs: dict, options: dict, *, seed: int | None = None) -> torch.Tensor:
        """The generated ids after each row's prompt (``[batch, new]``), one caller of the model at a time;
        ``seed``: torch's global RNG is seeded first (sampling; the caller holds the RNG lock)."""
        with self._lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(**inputs, **options, pad_token_id=self.chat.pad_token_id)
        return out[:, inputs["input_ids"].shape[1]:]

    def close(self) -> None:
        """Free the model's memory (evaluate loads the model, then a reference model, one after the other)."""
        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


_CACHE: dict[tuple, LocalVLM] = {}
_CACHE_LOCK = threading.Lock()


def load_local_vlm(path: str, **kwargs) -> LocalVLM:
    """One shared LocalVLM per (folder, options): model-bag entries naming one folder load it once."""
    key = (str(Path(path).resolve()), tuple(sorted(kwargs.items())))
    with _CACHE_LOCK:  # held while loading, so two threads asking at once still load it once
        if key not in _CACHE:
            _CACHE[key] = LocalVLM(path, **kwargs)
        return _CACHE[key]
