"""The test rows evaluate reads from a dataset that is not a spa-vl folder (the upstream layout)."""

from __future__ import annotations

import pyarrow.parquet as pq

from builder.dev.fixture import write_fixture
from training.evaluate import load_test_rows

# The upstream card as a user's copy may have it: configs and no dataset_info (no sizes, no counts).
BARE_CARD = """---
configs:
- config_name: test
  data_files:
  - split: harm
    path: test/harm-*
  - split: help
    path: test/help-*
---
"""


def _upstream(root, eval_rows):
    write_fixture(root, rows_per_domain=6, eval_rows=eval_rows, layout="upstream", progress=False)
    (root / "README.md").write_text(BARE_CARD)
    return root


def _questions(root, split):
    return [q for f in sorted((root / "test").glob(f"{split}-*.parquet"))
            for q in pq.read_table(f, columns=["question"]).column("question").to_pylist()]


def test_two_folders_of_one_name_each_give_their_own_rows(tmp_path):
    # `datasets` keys a local folder's cache by its card and file names: with a shared cache, the second
    # folder would be answered with the first one's rows.
    first = _upstream(tmp_path / "a" / "SPA-VL", eval_rows=4)
    second = _upstream(tmp_path / "b" / "SPA-VL", eval_rows=6)
    assert _questions(first, "harm") != _questions(second, "harm")
    for root in (first, second):
        rows = load_test_rows(str(root))
        for split in ("harm", "help"):
            assert [r["question"] for r in rows[split]] == _questions(root, split)
