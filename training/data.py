"""SPA-VL preference rows → trl's conversational vision format, with over-long pairs dropped.

    ds = load_rows("out/spa_vl", "malicious_use", "train")            # or a Hub repo id
    pairs, report = prepare_preferences(ds, processor, max_length=2048)
    report.dropped, report.kept                                         # said, never silent
    pairs[0]["prompt"]   # [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    pairs[0]["images"]   # [PIL.Image]

A pair whose prompt plus chosen *or* rejected answer exceeds ``max_length`` tokens (image tokens
included, as the model's processor counts them) is dropped, not truncated, like the authors' code
(2048 − 576 for LLaVA-1.5: the 576 image tokens are part of the count here).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from builder.errors import DataError


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
        ds = ds.select(range(min(int(limit), len(ds))))
    return ds


def prompt_messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def answer_messages(answer: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def to_conversational(row: dict) -> dict:
    """One preference row in trl's conversational vision format (``images``, ``prompt``, ``chosen``, ``rejected``)."""
    return {
        "images": [row["image"]],
        "prompt": prompt_messages(row["question"]),
        "chosen": answer_messages(row["chosen"]),
        "rejected": answer_messages(row["rejected"]),
    }


def pair_lengths(rows: dict, processor) -> dict:
    """Batched: tokens of prompt + chosen and prompt + rejected, counted by the model's own processor."""
    out = {"len_chosen": [], "len_rejected": []}
    for image, question, chosen, rejected in zip(rows["image"], rows["question"], rows["chosen"], rows["rejected"]):
        image = image.convert("RGB")
        for key, answer in (("len_chosen", chosen), ("len_rejected", rejected)):
            text = processor.apply_chat_template(prompt_messages(question) + answer_messages(answer), tokenize=False)
            ids = processor(text=[text], images=[image], add_special_tokens=False)["input_ids"][0]
            out[key].append(len(ids))
    return out


def prepare_preferences(ds, processor, *, max_length: int = 2048, num_proc: int | None = None, log=None):
    """Map rows to the conversational format, dropping pairs over ``max_length``; returns (dataset, report)."""
    missing = {"image", "question", "chosen", "rejected"} - set(ds.column_names)
    if missing:
        raise DataError(f"not preference rows: missing columns {sorted(missing)}", field=",".join(sorted(missing)))
    lengths = ds.map(pair_lengths, batched=True, batch_size=64, fn_kwargs={"processor": processor},
                     remove_columns=ds.column_names, num_proc=num_proc, desc="count tokens")
    keep = [i for i, (a, b) in enumerate(zip(lengths["len_chosen"], lengths["len_rejected"])) if max(a, b) <= max_length]
    report = PrepareReport(rows=len(ds), kept=len(keep), dropped=len(ds) - len(keep), max_length=max_length)
    (log or (lambda m: print(m, file=sys.stderr)))(report.line())
    if not keep:
        raise DataError(f"every pair exceeds max_length={max_length} tokens; raise max_length", field="max_length")
    kept = ds.select(keep) if len(keep) < len(ds) else ds
    out = kept.map(to_conversational, remove_columns=kept.column_names, desc="to conversational")
    return out, report
