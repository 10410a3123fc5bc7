"""A user's own taxonomy (two domains of invented labels) and a fixture folder built with it.

The folder carries the file as ``taxonomy.yaml``; the file the folder was built from is removed, so a
test shows that nothing outside the folder is needed to read its labels.
"""

from __future__ import annotations

from pathlib import Path

CUSTOM_TAXONOMY = """name: custom
domains:
- slug: heists
  label: Heist Harms
  categories:
  - label: Planning
    subcategories: [{label: vault entry, provenance: upstream}, {label: getaway, provenance: upstream}]
- slug: forgery
  label: Forgery Harms
  categories:
  - label: Documents
    subcategories: [{label: passports, provenance: upstream}]
"""


def custom_folder(root: Path, *, rows_per_domain: int = 6, eval_rows: int = 2) -> Path:
    """A spa-vl fixture folder at ``root`` built with ``CUSTOM_TAXONOMY``."""
    from builder.dev.fixture import write_fixture
    from builder.taxonomy import Taxonomy

    source = root.parent / f"{root.name}-taxonomy.yaml"
    source.write_text(CUSTOM_TAXONOMY)
    write_fixture(root, rows_per_domain=rows_per_domain, eval_rows=eval_rows, taxonomy=Taxonomy.load(source),
                  progress=False)
    source.unlink()
    return root
