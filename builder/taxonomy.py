"""The harm taxonomy: domains (class1) → categories (class2) → subcategories (class3).

The taxonomy is data (``builder/taxonomy.yaml``); this module is its one loader. A user points the
toolkit at their own file with ``--taxonomy FILE`` or ``Taxonomy.load(path)``::

    tax = Taxonomy.load()
    tax.domain("malicious_use").label            # 'Malicious Use'
    tax.slug_for("Malicious Use")                 # 'malicious_use'
    tax.contains("Malicious Use", "Security threats", "weapon")   # True
    tax.domain("malicious_use").sources           # ('harm_split', 'paper_table1'): where it was verified
    tax.sources["harm_split"]                     # what that source is

Every entry (domain, category, subcategory) may name its ``sources``: keys of the file's top-level
``sources`` map, or free text. The shipped file names one for every entry.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from builder.errors import DataError

DEFAULT_TAXONOMY = Path(__file__).with_name("taxonomy.yaml")
PROVENANCES = ("upstream", "provisional")
_SLUG = re.compile(r"^[a-z][a-z0-9_]*$")
# Config names the dataset folder already uses; a domain slug may not take them.
RESERVED_SLUGS = ("default", "test", "unattributed")


@dataclass(frozen=True)
class Subcategory:
    label: str
    provenance: str
    sources: tuple[str, ...] = ()  # where the label string was verified


@dataclass(frozen=True)
class Category:
    label: str
    subcategories: tuple[Subcategory, ...]
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class Domain:
    slug: str
    label: str
    categories: tuple[Category, ...]
    sources: tuple[str, ...] = ()

    @property
    def subcategories(self) -> list[tuple[str, Subcategory]]:
        """(class2, subcategory) pairs in file order."""
        return [(c.label, s) for c in self.categories for s in c.subcategories]


@dataclass(frozen=True)
class Taxonomy:
    name: str
    domains: tuple[Domain, ...]
    source: str  # the file it was read from
    sha256: str
    sources: dict[str, str] = field(default_factory=dict)  # source key -> what it is (the file's `sources` map)

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Taxonomy":
        """Read and check a taxonomy YAML file (the shipped one when ``path`` is None)."""
        p = Path(path or DEFAULT_TAXONOMY).resolve()
        try:
            st = p.stat()
        except FileNotFoundError:
            raise DataError("taxonomy file not found", file=str(p)) from None
        return _load_cached(str(p), st.st_mtime_ns, st.st_size)  # an edited file is read again

    # --- lookups -------------------------------------------------------------------------
    def domain(self, slug: str) -> Domain:
        for d in self.domains:
            if d.slug == slug:
                return d
        raise KeyError(f"unknown domain config {slug!r}; known: {', '.join(self.slugs)}")

    @property
    def slugs(self) -> list[str]:
        return [d.slug for d in self.domains]

    def slug_for(self, class1: str | None) -> str | None:
        """The config slug of a ``class1`` label, or None when the label is not a domain."""
        return self._slug_by_label.get(class1)  # type: ignore[arg-type]

    def contains(self, class1: str, class2: str | None = None, class3: str | None = None) -> bool:
        """Whether the label path exists (a prefix of the path is enough)."""
        if class3 is not None:
            return (class1, class2, class3) in self._paths
        if class2 is not None:
            return (class1, class2) in self._categories
        return class1 in self._slug_by_label

    def paths(self) -> list[tuple[str, str, str]]:
        """Every (class1, class2, class3) in file order."""
        return [(d.label, c, s.label) for d in self.domains for c, s in d.subcategories]

    def counts(self) -> dict[str, int]:
        subs = [s for d in self.domains for _, s in d.subcategories]
        return {
            "domains": len(self.domains),
            "categories": sum(len(d.categories) for d in self.domains),
            "subcategories": len(subs),
            "provisional": sum(s.provenance == "provisional" for s in subs),
        }

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "sha256": self.sha256,
            "counts": self.counts(),
            "sources": dict(self.sources),
            "domains": [
                {
                    "slug": d.slug,
                    "label": d.label,
                    "sources": list(d.sources),
                    "categories": [
                        {
                            "label": c.label,
                            "sources": list(c.sources),
                            "subcategories": [
                                {"label": s.label, "provenance": s.provenance, "sources": list(s.sources)}
                                for s in c.subcategories
                            ],
                        }
                        for c in d.categories
                    ],
                }
                for d in self.domains
            ],
        }

    def tree(self) -> str:
        """A printable tree with counts; provisional subcategories are marked with '*'."""
        c = self.counts()
        lines = [
            f"{self.name}: {c['domains']} domains, {c['categories']} categories, "
            f"{c['subcategories']} subcategories ({c['provisional']} provisional, marked *)"
        ]
        for d in self.domains:
            n_sub = len(d.subcategories)
            lines.append(f"{d.label}  [{d.slug}]  ({len(d.categories)} categories, {n_sub} subcategories)")
            for cat in d.categories:
                subs = ", ".join(s.label + ("*" if s.provenance == "provisional" else "") for s in cat.subcategories)
                lines.append(f"  {cat.label} ({len(cat.subcategories)}): {subs}")
        if self.sources:
            lines.append("sources:")
            lines += [f"  {key}: {text}" for key, text in self.sources.items()]
        return "\n".join(lines)

    # --- derived indexes, built once per instance ------------------------------------------
    def __post_init__(self):
        object.__setattr__(self, "_slug_by_label", {d.label: d.slug for d in self.domains})
        object.__setattr__(self, "_categories", {(d.label, c.label) for d in self.domains for c in d.categories})
        object.__setattr__(self, "_paths", set(self.paths()))


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int, size: int) -> Taxonomy:
    p = Path(path)
    try:
        raw_bytes = p.read_bytes()
        raw = yaml.safe_load(raw_bytes)
    except yaml.YAMLError as e:
        raise DataError(f"not valid YAML: {e}", file=path) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("domains"), list) or not raw["domains"]:
        raise DataError("expected a mapping with a non-empty 'domains' list", file=path, field="domains")
    sources = raw.get("sources") or {}
    if not isinstance(sources, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                                for k, v in sources.items()):
        raise DataError("sources must map a key to a non-empty description", file=path, field="sources")

    domains, seen_slugs, seen_labels = [], set(), set()
    for i, d in enumerate(raw["domains"]):
        domain = _domain(d, path, f"domains[{i}]")
        if domain.slug in seen_slugs or domain.label in seen_labels:
            raise DataError(f"duplicate domain {domain.slug!r} / {domain.label!r}", file=path, field=f"domains[{i}]")
        seen_slugs.add(domain.slug)
        seen_labels.add(domain.label)
        domains.append(domain)
    return Taxonomy(
        name=str(raw.get("name", p.stem)),
        domains=tuple(domains),
        source=str(p),
        sha256=hashlib.sha256(raw_bytes).hexdigest(),
        sources={k: " ".join(v.split()) for k, v in sources.items()},
    )


def _domain(d, path: str, where: str) -> Domain:
    if not isinstance(d, dict):
        raise DataError("expected a mapping", file=path, field=where)
    slug, label = d.get("slug"), d.get("label")
    if not isinstance(slug, str) or not _SLUG.fullmatch(slug) or slug in RESERVED_SLUGS:
        raise DataError(
            f"slug must match {_SLUG.pattern} and not be one of {RESERVED_SLUGS}, got {slug!r}",
            file=path, field=f"{where}.slug",
        )
    if not isinstance(label, str) or not label:
        raise DataError("label must be a non-empty string", file=path, field=f"{where}.label")
    cats: list[Category] = []
    for j, c in enumerate(_list(d, "categories", path, where)):
        cwhere = f"{where}.categories[{j}]"
        if not isinstance(c, dict) or not isinstance(c.get("label"), str) or not c["label"]:
            raise DataError("category needs a non-empty 'label'", file=path, field=cwhere)
        if c["label"] in {x.label for x in cats}:
            raise DataError(f"duplicate category {c['label']!r}", file=path, field=cwhere)
        subs: list[Subcategory] = []
        for k, s in enumerate(_list(c, "subcategories", path, cwhere)):
            sub = _subcategory(s, path, f"{cwhere}.subcategories[{k}]")
            if sub.label in {x.label for x in subs}:
                raise DataError(f"duplicate subcategory {sub.label!r}", file=path, field=f"{cwhere}.subcategories[{k}]")
            subs.append(sub)
        if not subs:
            raise DataError("category has no subcategories", file=path, field=cwhere)
        cats.append(Category(c["label"], tuple(subs), _sources(c, path, cwhere)))
    if not cats:
        raise DataError("domain has no categories", file=path, field=where)
    return Domain(slug, label, tuple(cats), _sources(d, path, where))


def _subcategory(s, path: str, where: str) -> Subcategory:
    if isinstance(s, str):  # bare label: treat as provisional
        s = {"label": s, "provenance": "provisional"}
    if not isinstance(s, dict) or not isinstance(s.get("label"), str) or not s["label"]:
        raise DataError("subcategory needs a non-empty 'label'", file=path, field=where)
    prov = s.get("provenance", "provisional")
    if prov not in PROVENANCES:
        raise DataError(f"provenance must be one of {PROVENANCES}, got {prov!r}", file=path, field=where)
    return Subcategory(s["label"], prov, _sources(s, path, where))


def _sources(entry: dict, path: str, where: str) -> tuple[str, ...]:
    value = entry.get("sources", [])
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise DataError("sources must be a list of non-empty strings", file=path, field=f"{where}.sources")
    return tuple(value)


def _list(mapping: dict, key: str, path: str, where: str) -> list:
    value = mapping.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise DataError(f"{key} must be a list, got {type(value).__name__}", file=path, field=f"{where}.{key}")
    return value
