"""SPA-VL preference rows → trl's conversational vision format, subsets drawn evenly, over-long pairs dropped.

    ds = load_rows("out/spa_vl", "malicious_use", "train")            # or a Hub repo id
    ds = sample_evenly(ds, 10_000, seed=42)                            # the same number of rows per class3
    pairs, report = prepare_preferences(ds, processor, max_length=2048)
    report.dropped, report.kept                                         # said, never silent
    pairs[0]["prompt"]   # [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    pairs[0]["chosen"]   # [{"role": "assistant", "content": [{"type": "text", "text": row["chosen"]}]}]
    pairs[0]["images"]   # [PIL.Image]

A pair whose prompt plus chosen *or* rejected answer exceeds ``max_length`` tokens (image tokens
included, counted in the format of ``builder.vlm.chat``: BOS, the answer and its EOS) is dropped, not
truncated, like the authors' code (2048 − 576 for LLaVA-1.5: the 576 image tokens are part of the count here).
"""

from __future__ import annotations

import random
import sys
from collections import defaultdict
from dataclasses import dataclass

from builder.errors import DataError
from builder.vlm.chat import ChatFormat, answer_messages, prompt_messages

__all__ = ["PrepareReport", "answer_messages", "load_rows", "pair_lengths", "prepare_preferences",
           "prompt_messages", "rows_for", "sample_evenly", "to_conversational"]


@dataclass
class PrepareReport:
    rows: int
    kept: int
    dropped: int  # over max_length
    max_length: int

    def line(self) -> str:
        return (f"data: {self.kept:,} of {self.rows:,} pairs kept; {self.dropped:,} dropped for exceeding "
                f"{self.max_length:,} tokens (prompt + answer, image tokens included)")


def load_rows(dataset: str, config_name: str = "default", split: str = "train", *, revision: str | None = None,
              filters=None, limit: int | None = None):
    """One split of a spa-vl dataset (folder or Hub repo) as a ``datasets.Dataset``, filtered in the scan."""
    import spa_vl

    try:
        ds = spa_vl.load(config_name, split, source=dataset, revision=revision, filters=filters)
    except FileNotFoundError as e:  # no such folder or repo id, or a folder without this config's shards
        raise DataError(str(e), file=str(dataset), field="dataset") from None
    except ValueError as e:
        raise DataError(str(e), file=str(dataset), field="config_name/split") from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds


def sample_evenly(ds, n: int | None, *, seed: int, column: str = "class3"):
    """``n`` rows spread evenly over the values of ``column``: each category gives as many rows as it can up to
    an equal share, the rest filled from the larger ones; which rows, from ``seed``. All rows when ``n`` is
    None or not smaller. The rows keep their order in ``ds``."""
    if n is None or n >= len(ds):
        return ds
    if column not in ds.column_names:
        raise DataError(f"no {column!r} column to draw evenly over", field="max_samples")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, value in enumerate(ds[column]):
        groups[str(value)].append(i)
    rng = random.Random(seed)
    queues = []
    for key in sorted(groups):
        members = groups[key]
        rng.shuffle(members)
        queues.append(members)
    picked: list[int] = []
    while len(picked) < n:  # round-robin: one row per category per round
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop())
        queues = [q for q in queues if q]
    return ds.select(sorted(picked))


def rows_for(cfg, split: str, *, samples: int | None = None):
    """A split of ``cfg``'s dataset (revision, filters, limit), then ``samples`` rows drawn evenly over class3."""
    ds = load_rows(cfg.dataset, cfg.config_name, split, revision=cfg.revision, filters=cfg.filters, limit=cfg.limit)
    return sample_evenly(ds, samples, seed=cfg.seed)


def to_conversational(row: dict) -> dict:
    """One preference row in trl's conversational vision format (``images``, ``prompt``, ``chosen``, ``rejected``).
    The dataset's ``chosen`` answer is the preferred one: DPO raises it, the reward model scores it higher."""
    return {
        "images": [row["image"]],
        "prompt": prompt_messages(row["question"]),
        "chosen": answer_messages(row["chosen"]),
        "rejected": answer_messages(row["rejected"]),
    }


def _chat(processor_or_chat) -> ChatFormat:
    return processor_or_chat if isinstance(processor_or_chat, ChatFormat) else ChatFormat(processor_or_chat)


def pair_lengths(rows: dict, processor) -> dict:
    """Batched: tokens of prompt + chosen and prompt + rejected, in the training format (image tokens counted by
    the model's own processor)."""
    chat = _chat(processor)
    conversations = [prompt_messages(q) for q in rows["question"]]
    prompts = chat.prompt_inputs(conversations, [[image] for image in rows["image"]])
    prompt_tokens = prompts["attention_mask"].sum(1).tolist()
    out = {"len_chosen": [], "len_rejected": []}
    for n, conversation, chosen, rejected in zip(prompt_tokens, conversations, rows["chosen"], rows["rejected"]):
        out["len_chosen"].append(n + len(chat.completion_ids(conversation, chosen)))
        out["len_rejected"].append(n + len(chat.completion_ids(conversation, rejected)))
    return out


def prepare_preferences(ds, processor, *, max_length: int = 2048, num_proc: int | None = None, log=None):
    """Map rows to the conversational format, dropping pairs over ``max_length``; returns (dataset, report)."""
    missing = {"image", "question", "chosen", "rejected"} - set(ds.column_names)
    if missing:
        raise DataError(f"not preference rows: missing columns {sorted(missing)}", field=",".join(sorted(missing)))
    lengths = ds.map(pair_lengths, batched=True, batch_size=32, fn_kwargs={"processor": _chat(processor)},
                     remove_columns=ds.column_names, num_proc=num_proc, desc="count tokens")
    keep = [i for i, (a, b) in enumerate(zip(lengths["len_chosen"], lengths["len_rejected"])) if max(a, b) <= max_length]
    report = PrepareReport(rows=len(ds), kept=len(keep), dropped=len(ds) - len(keep), max_length=max_length)
    (log or (lambda m: print(m, file=sys.stderr)))(report.line())
    if not keep:
        raise DataError(f"every pair exceeds max_length={max_length} tokens; raise max_length", field="max_length")
    kept = ds.select(keep) if len(keep) < len(ds) else ds
    out = kept.map(to_conversational, remove_columns=kept.column_names, desc="to conversational")
    return out, report
