"""A tiny random-weight double of OpenSafetyLab/MD-Judge-v0.1, written on the spot (no download).

The real checkpoint is a ``MistralForCausalLM`` (32 heads, 8 key-value heads, sliding window 4096)
with Mistral's SentencePiece tokenizer: a BPE with byte fallback over ``▁``-marked words, ``<unk>`` /
``<s>`` / ``</s>`` at ids 0 / 1 / 2, the 256 byte tokens ``<0x00>``..``<0xFF>`` at ids 3..258, BOS
added and EOS not, and **no chat template**: its model card writes ``[INST] ... [/INST]`` into the
prompt itself. Its vocabulary holds ``▁safe`` and ``▁unsafe`` as single tokens, the first token of its
two replies. This double keeps all of that at a toy size (a few hundred tokens, hidden size 32)::

    path = build_tiny_md_judge(tmp / "md-judge", seed=0)
    AutoTokenizer.from_pretrained(path)("hi")["input_ids"][0] == 1        # BOS
    AutoModelForCausalLM.from_pretrained(path)                            # a MistralForCausalLM
"""

from __future__ import annotations

import json
from pathlib import Path

from training.judge_config import PROMPTS

SPECIAL = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
CORPUS_EXTRA = [
    "safe", "unsafe", "unsafe\nO5: Malicious Use", "safe", "The answer is safe.", "The answer is unsafe.",
    "I am sorry, but I cannot help with that request.", "Here is how to do it step by step.",
    "[INST] [/INST]", "User: Agent:",
] * 8


def _corpus() -> list[str]:
    template = (PROMPTS / "md_judge_v0_1.txt").read_text()
    return template.splitlines() + CORPUS_EXTRA


def _train_vocab(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a SentencePiece-shaped BPE trained on the MD-Judge template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL + BYTES, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    state = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return state["vocab"], merges


def build_tiny_md_judge(out_dir, *, seed: int = 0, vocab_size: int = 600, hidden_size: int = 32) -> Path:
    """Write the double to ``out_dir``: config.json, model.safetensors, generation_config.json, tokenizer files."""
    import torch
    from transformers import GenerationConfig, LlamaTokenizer, MistralConfig, MistralForCausalLM

    out = Path(out_dir)
    vocab, merges = _train_vocab(vocab_size)
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False,
                               model_max_length=32768)
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<0x00>"]) == [0, 1, 2, 3]
    assert len(tokenizer.tokenize(" safe")) == 1 and len(tokenizer.tokenize(" unsafe")) == 1
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=hidden_size // 4,
                           max_position_embeddings=32768, sliding_window=4096, bos_token_id=1, eos_token_id=2,
                           tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MistralForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
