"""An in-process text-only safety classifier (MD-Judge v0.1): a causal LM read by its first reply token.

MD-Judge-v0.1 (Mistral-7B) answers ``safe`` or ``unsafe`` on its first line, so one forward pass over
the prompt gives the verdict: P(unsafe) is the next-token probability of the tokens that begin
"unsafe" (``▁unsafe``, ``▁un``, ``un``...), renormalised against those that begin "safe". The prompt is
rendered as the model card does: the tokenizer's chat template when it has one, else Mistral's
``[INST] ... [/INST]`` after the BOS (MD-Judge-v0.1's tokenizer has no chat template)::

    judge = load_text_judge("OpenSafetyLab/MD-Judge-v0.1")
    judge.choice_probabilities(prompt_text, ["safe", "unsafe"])   # e.g. [0.93, 0.07]
"""

from __future__ import annotations

import threading
from pathlib import Path


class TextJudge:
    """A causal LM (``AutoModelForCausalLM`` + ``AutoTokenizer`` folder or Hub id) scored by its first token."""

    def __init__(self, path: str, *, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from builder.vlm.loading import default_device, resolve_dtype

        self.torch = torch
        self.device = device or default_device()
        dtype = resolve_dtype("auto", device=self.device, training=False)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=self.device).eval()
        self._first_tokens: dict[tuple[str, ...], list[list[int]]] = {}
        self._lock = threading.Lock()  # one model, several asyncio.to_thread callers

    def render(self, text: str) -> list[int]:
        """The prompt's token ids, ready for the reply's first token."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=False)
            add_bos = not (tok.bos_token and rendered.startswith(tok.bos_token))
        else:  # MD-Judge-v0.1's model card: "[INST] ... [/INST]", the tokenizer adds the BOS
            rendered, add_bos = f"[INST] {text.strip()} [/INST]", True
        return tok(rendered, add_special_tokens=add_bos)["input_ids"]

    def first_tokens(self, choices: tuple[str, ...]) -> list[list[int]]:
        """For each choice, the ids of the tokens a reply that spells it can start with: the token's text
        (without the word-start marker) is a non-empty prefix of this choice and of no other."""
        if choices not in self._first_tokens:
            words = [c.strip().lower() for c in choices]
            sets: list[list[int]] = [[] for _ in words]
            for token, i in self.tokenizer.get_vocab().items():
                piece = token.replace("▁", " ").replace("Ġ", " ").strip().lower()
                owners = [k for k, w in enumerate(words) if piece and w.startswith(piece)]
                if len(owners) == 1:
                    sets[owners[0]].append(i)
            for choice, ids in zip(choices, sets):
                if not ids:
                    raise ValueError(f"no token of the vocabulary starts {choice!r}")
            self._first_tokens[choices] = sets
        return self._first_tokens[choices]

    def choice_probabilities(self, text: str, choices: list[str]) -> tuple[list[float], int]:
        """(P(choice) renormalised over the choices, the prompt's token count)."""
        torch = self.torch
        ids = self.render(text)
        sets = self.first_tokens(tuple(choices))
        with self._lock, torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids], device=self.model.device)).logits[0, -1].float()
        probs = logits.softmax(-1)
        mass = torch.stack([probs[torch.tensor(s, device=probs.device)].sum() for s in sets])
        return (mass / mass.sum()).tolist(), len(ids)


_CACHE: dict[str, TextJudge] = {}
_CACHE_LOCK = threading.Lock()


def load_text_judge(path: str) -> TextJudge:
    """One shared TextJudge per folder or Hub id (loaded once, on first use)."""
    key = str(Path(path).resolve()) if Path(path).exists() else str(path)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = TextJudge(path)
        return _CACHE[key]
