"""A folder's review: its sample, the pairs' texts and images, its verdicts; and the report made from them.

Everything lives in ``<root>/review/`` (``sample.json``, ``verdicts.jsonl`` and the report's files),
for a dataset folder as for a run directory, so the verdicts travel with the folder::

    session = open_review("out/spa_vl", n=500, seed=0)   # draws the sample on first use
    session.progress("ann")                                # (tokens in order, reviewed or not)
    result = make_report("out/spa_vl")                     # review/report.json, ... and the card's section
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from builder.errors import DataError
from builder.format.layout import REVIEW_DIR
from builder.review.pairs import PairText, describe, open_source
from builder.review.report import DEFAULT_RESAMPLES, compute_report
from builder.review.render import write_report_files
from builder.review.sample import SAMPLE_FILE, Sample, SampledPair, open_sample
from builder.review.stats import MIN_RESAMPLES
from builder.review.store import Verdict, VerdictStore, check_reviewer


@dataclass
class ReviewSession:
    """What the server holds: the sample (its secret), the sampled pairs' texts, images and the verdicts."""

    root: Path
    source: object  # FolderSource | RunSource
    sample: Sample
    texts: dict[str, PairText]
    store: VerdictStore
    new_sample: bool = False
    saved: int = 0  # verdicts saved by this session
    pairs: list[SampledPair] = field(init=False)

    def __post_init__(self):
        self.pairs = [p for p in self.sample.pairs if p.id in self.texts]  # pairs gone from a rebuilt folder are not shown
        self.position = {p.token: i for i, p in enumerate(self.pairs)}

    @property
    def missing(self) -> int:
        return len(self.sample.pairs) - len(self.pairs)

    def progress(self, reviewer: str) -> tuple[list[str], list[bool]]:
        reviewer = check_reviewer(reviewer)
        seen = {pid for who, pid in self.store.latest() if who == reviewer}
        return [p.token for p in self.pairs], [p.id in seen for p in self.pairs]

    def pair(self, token: str) -> SampledPair:
        if token not in self.position:
            raise KeyError(token)
        return self.pairs[self.position[token]]

    def give(self, reviewer: str, token: str, pick: str, unsafe_a: bool, unsafe_b: bool, note: str) -> Verdict:
        pair = self.pair(token)
        verdict = Verdict(reviewer, pair.id, pick, pair.a_is, unsafe_a, unsafe_b, note)
        self.store.add(verdict)
        self.saved += 1
        return verdict

    def close(self) -> None:
        self.source.close()


def review_dir(root: str | Path) -> Path:
    return Path(root) / REVIEW_DIR


def open_review(root: str | Path, *, n: int | None = None, seed: int | None = None,
                config: str | None = None) -> ReviewSession:
    """Open a folder's (or run directory's) review, drawing and saving the sample on first use."""
    if n is not None and (not isinstance(n, int) or n < 1):
        raise DataError("the sample size must be a whole number of at least 1", field="n")
    if seed is not None and not isinstance(seed, int):
        raise DataError("the seed must be a whole number", field="seed")
    source = open_source(root)
    try:
        sample, new = open_sample(review_dir(root), source, n=n, seed=seed, config=config)
        texts = source.texts([p.id for p in sample.pairs])
    except BaseException:
        source.close()
        raise
    session = ReviewSession(Path(root), source, sample, texts, VerdictStore(review_dir(root)), new_sample=new)
    if session.missing:
        print(f"review: {session.missing:,} sampled pairs are no longer in {root} (rebuilt?); their verdicts stay "
              "in the report, the page shows the other pairs", file=sys.stderr)
    return session


@dataclass
class ReportResult:
    report: dict
    changed: list[str]  # files (relative to the root) whose bytes changed, the card's included
    card_rendered: bool


def make_report(root: str | Path, *, resamples: int = DEFAULT_RESAMPLES) -> ReportResult:
    """Compute the report from the folder's sample and verdicts, write its files, and re-render a folder's card."""
    if not isinstance(resamples, int) or resamples < MIN_RESAMPLES:
        raise DataError(f"resamples must be a whole number of at least {MIN_RESAMPLES}", field="resamples")
    root = Path(root)
    source = open_source(root)  # checks what the root is
    try:
        path = review_dir(root) / SAMPLE_FILE
        if not path.is_file():
            raise DataError("no review here yet: run `spa-vl review DIR` first to draw a sample and give verdicts",
                            file=str(path))
        sample = Sample.load(path)
        store = VerdictStore(review_dir(root))
        report = compute_report(sample, store.latest(), resamples=resamples, source=describe(source))
        report["verdicts"]["sha256"] = store.sha256()
    finally:
        source.close()
    changed = [f"{REVIEW_DIR}/{name}" for name in write_report_files(review_dir(root), report)]
    rendered = source.kind == "folder"
    if rendered:
        from dataset_card.card import render_folder_card

        changed += render_folder_card(source.folder).changed  # the card's "Human validation" section
    return ReportResult(report, changed, rendered)
