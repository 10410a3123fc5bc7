"""The review sample: N pairs drawn with a seed, evenly over ``class3``, each shown in a random A/B order.

Even: every subcategory gets the same number of pairs, a subcategory with fewer pairs gives all it
has and the rest is shared among the others (water-filling); the remainder of N goes to subcategories
picked by the seed. The same pairs and seed give the same sample, order and A/B sides.

The sample lives in ``<root>/review/sample.json`` and is the server's secret: it knows which side is
the judge's pick, while the page only ever sees each pair's opaque random ``token``::

    sample = open_sample(review_dir, source, n=500, seed=0, config=None)
    sample.pairs[0].token, sample.pairs[0].judge_side      # "kq3...", "B"
"""

from __future__ import annotations

import json
import random
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

from builder.errors import DataError
from builder.review.pairs import PairLabels, check_config, describe

SAMPLE_FILE = "sample.json"
FORMAT = "spa-vl-review-sample/1"
DEFAULT_N = 500
UNLABELLED = "(no class3)"  # the stratum of rows without harm labels (upstream train rows that were not attributed)


@dataclass(frozen=True, kw_only=True)
class SampledPair(PairLabels):
    """A pair of the sample: its labels, the token the page knows it by, and the side its chosen answer is on."""

    token: str  # what the page sees: random, says nothing about the pair
    a_is: str  # "chosen" or "rejected": which answer the page shows as A

    @property
    def judge_side(self) -> str:
        """The side (A or B) of the answer the judge chose."""
        return "A" if self.a_is == "chosen" else "B"

    def unsafe_label(self, side: str) -> bool | None:
        """The safety label of the answer shown on ``side``, where the data has one."""
        shown = self.a_is if side == "A" else ("rejected" if self.a_is == "chosen" else "chosen")
        return self.chosen_unsafe if shown == "chosen" else self.rejected_unsafe


@dataclass
class Sample:
    n: int
    seed: int
    config: str | None
    source: dict
    strata: int
    pairs: list[SampledPair] = field(default_factory=list)

    def __post_init__(self):
        self.by_token = {p.token: p for p in self.pairs}
        self.by_id = {p.id: p for p in self.pairs}

    def to_json(self) -> str:
        body = {"format": FORMAT, "n": self.n, "seed": self.seed, "config": self.config, "source": self.source,
                "strata": self.strata, "pairs": [asdict(p) for p in self.pairs]}
        return json.dumps(body, indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def load(cls, path: Path) -> "Sample":
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            if body.get("format") != FORMAT:
                raise DataError(f"format {body.get('format')!r} is not {FORMAT!r}", file=str(path), field="format")
            pairs = [SampledPair(**p) for p in body["pairs"]]
            return cls(body["n"], body["seed"], body["config"], body["source"], body["strata"], pairs)
        except (ValueError, KeyError, TypeError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"not a review sample: {e}", file=str(path)) from None


def allocate(sizes: dict[str, int], n: int, rng: random.Random) -> dict[str, int]:
    """Pairs per stratum: equal shares, capped by what a stratum holds; leftovers to strata picked by ``rng``."""
    quota = {s: 0 for s in sizes}
    order = sorted(sizes)
    rng.shuffle(order)  # who gets the remainder
    remaining = min(n, sum(sizes.values()))
    while remaining:
        open_strata = [s for s in order if quota[s] < sizes[s]]
        share = remaining // len(open_strata)
        if share == 0:
            for s in open_strata[:remaining]:
                quota[s] += 1
            break
        for s in open_strata:
            take = min(share, sizes[s] - quota[s])
            quota[s] += take
            remaining -= take
    return quota


def draw_sample(labels: list[PairLabels], *, n: int, seed: int, config: str | None, source: dict) -> Sample:
    """``n`` pairs evenly over ``class3`` (or all when fewer), in a seeded order, each with a seeded A/B side."""
    strata: dict[str, list[PairLabels]] = {}
    for pair in sorted(labels, key=lambda p: p.id):
        strata.setdefault(pair.class3 or UNLABELLED, []).append(pair)
    quota = allocate({s: len(v) for s, v in strata.items()}, n, random.Random(f"{seed}/strata"))
    picked = []
    for stratum, pairs in sorted(strata.items()):
        # one generator per stratum: adding rows to one subcategory leaves the others' picks alone
        picked += random.Random(f"{seed}/{stratum}").sample(pairs, quota[stratum])
    random.Random(f"{seed}/order").shuffle(picked)  # reviewing the first k of the sample is still spread out
    pairs = []
    for p in picked:
        a_is = "chosen" if random.Random(f"{seed}/side/{p.id}").random() < 0.5 else "rejected"
        pairs.append(SampledPair(**vars(p), token=secrets.token_urlsafe(12), a_is=a_is))
    return Sample(n, seed, config, source, len(strata), pairs)


def open_sample(review_dir: Path, source, *, n: int | None, seed: int | None, config: str | None) -> tuple[Sample, bool]:
    """The folder's sample (checked against what was asked), or a new one drawn and saved; True when new.

    ``n``, ``seed``, ``config`` left None mean "as the existing sample" (or 500, 0, every domain for a new one).
    """
    config = check_config(config, source.taxonomy)
    path = review_dir / SAMPLE_FILE
    if path.is_file():
        sample = Sample.load(path)
        asked = {"n": n, "seed": seed, "config": config}
        for key, value in asked.items():
            if value is not None and value != getattr(sample, key):
                raise DataError(f"the review's sample was drawn with {key}={getattr(sample, key)!r}, not {value!r}; "
                                f"leave --{key} out to continue it, or move {review_dir} aside to draw another",
                                file=str(path), field=key)
        return sample, False
    labels = source.labels(config)
    if not labels:
        raise DataError("no preference pairs to review" + (f" in config {config}" if config else ""), file=str(source.root))
    sample = draw_sample(labels, n=DEFAULT_N if n is None else n, seed=0 if seed is None else seed,
                         config=config, source=describe(source))
    from dataset_card.card import write_if_changed  # atomic write

    write_if_changed(path, sample.to_json().encode("utf-8"))
    return sample, True
