"""The harm taxonomy: the shipped data file, its loader, and user taxonomy files."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from builder.errors import DataError
from builder.taxonomy import DEFAULT_TAXONOMY, Taxonomy

# --- the expected taxonomy, transcribed from reference/spa_vl_facts.md §2 --------------------------

DOMAINS = {  # config slug (ARCHITECTURE.md) -> class1 exactly as upstream writes it
    "representation_toxicity": "Representation & ToxicityHarms",
    "misinformation": "Misinformation Harms",
    "information_safety": "Information & Safety Harms",
    "malicious_use": "Malicious Use",
    "human_autonomy_integrity": "Human Autonomy & IntegrityHarms",
    "socioeconomic": "Socioeconomic Harms",
}
CATEGORIES = {  # two class2 strings are lower case in the data: "false beliefs", "dangerous information"
    "Representation & ToxicityHarms": ["Toxic", "Unfair"],
    "Misinformation Harms": ["Erosion of trust in public information", "false beliefs"],
    "Information & Safety Harms": ["dangerous information", "Privacy"],
    "Malicious Use": [
        "Security threats",
        "Defamation",
        "Fraud or deceptive action",
        "Influence operations",
        "Illegal activities",
    ],
    "Human Autonomy & IntegrityHarms": ["Persuasion and manipulation", "Violation of personal property"],
    "Socioeconomic Harms": ["Risky financial practices", "Trade and compliance"],
}
# All 53 class3 strings, verified on the upstream test/harm split (facts §2), typos kept.
SUBCATEGORIES = {
    "Toxic": ["bully", "harass", "hate", "insult", "terrorism", "threaten", "violent"],
    "Unfair": ["ageism", "disablity discrimination", "geographical discrimination", "racial", "religion", "sexism"],
    "Erosion of trust in public information": ["illegal drugs", "medical"],
    "false beliefs": ["fake science", "historical revisionism", "radicalization"],
    "dangerous information": ["financial data", "government secret"],
    "Privacy": ["personal privacy"],
    "Security threats": ["biological and chemical harms", "cyber", "malware", "weapon"],
    "Defamation": ["defamation"],
    "Fraud or deceptive action": ["academic dishonesty", "disinformation", "fake news", "financial fraud",
                                  "pseudo-pharmaceuticals", "rumors", "scamns", "spam information"],
    "Influence operations": ["campaign materials", "illegitimate surveillance", "manipulation of public opinion"],
    "Illegal activities": ["drug-related crimes", "environmental crimes", "financial crimes", "illegal law advice",
                           "theft", "traffic and driving offenses"],
    "Persuasion and manipulation": ["physical harm", "psychological manipulation"],
    "Violation of personal property": ["copyright infringement", "forge identity", "plagiarism"],
    "Risky financial practices": ["gamble", "multi-level marketing", "paypal lending"],
    "Trade and compliance": ["labor issues", "trade affairs"],
}
# Guesses of an earlier version that the data proved wrong: none may come back.
WRONG_GUESSES = ["law advice", "medical advice", "government secrets", "financial data leaks", "science denialism",
                 "leaking private information", "group defamation", "defamation someone"]


@pytest.fixture(scope="module")
def tax() -> Taxonomy:
    return Taxonomy.load()


def _write(tmp_path: Path, text: str, name: str = "tax.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


MINIMAL = """\
name: mini
domains:
  - slug: alpha
    label: "Alpha Harms"
    categories:
      - label: First
        subcategories:
          - {label: one, provenance: upstream}
          - {label: two, provenance: provisional}
  - slug: beta
    label: "BetaHarms"
    categories:
      - label: Second
        subcategories:
          - {label: three, provenance: upstream}
"""


# --- the shipped file ---------------------------------------------------------------------------

def test_shipped_counts(tax):
    assert tax.counts() == {"domains": 6, "categories": 15, "subcategories": 53, "provisional": 0}
    # counts agree with the structure, not just with themselves
    assert len(tax.domains) == 6
    assert len({(d.label, c.label) for d in tax.domains for c in d.categories}) == 15
    assert len(set(tax.paths())) == 53 == len(tax.paths())


def test_shipped_domain_labels_and_slugs_exact(tax):
    assert {d.slug: d.label for d in tax.domains} == DOMAINS
    assert tax.slugs == list(DOMAINS)  # the order of ARCHITECTURE.md's config table
    # the two quirky labels, byte for byte: no space before "Harms"
    labels = [d.label for d in tax.domains]
    assert "Representation & ToxicityHarms" in labels
    assert "Human Autonomy & IntegrityHarms" in labels
    assert "Representation & Toxicity Harms" not in labels
    assert "Human Autonomy & Integrity Harms" not in labels
    assert tax.domain("human_autonomy_integrity").label.encode() == b"Human Autonomy & IntegrityHarms"


def test_shipped_categories_exact(tax):
    assert {d.label: [c.label for c in d.categories] for d in tax.domains} == CATEGORIES
    assert not tax.contains("Misinformation Harms", "False beliefs")  # the paper's case, not the data's
    assert not tax.contains("Information & Safety Harms", "Dangerous information")


def test_shipped_subcategories_exact_and_all_verified(tax):
    got = {c.label: [s.label for s in c.subcategories] for d in tax.domains for c in d.categories}
    assert got == SUBCATEGORIES
    assert sum(map(len, SUBCATEGORIES.values())) == 53
    assert {s.provenance for d in tax.domains for _, s in d.subcategories} == {"upstream"}  # none provisional
    # the typos are kept
    assert tax.contains("Representation & ToxicityHarms", "Unfair", "disablity discrimination")
    assert tax.contains("Malicious Use", "Fraud or deceptive action", "scamns")
    assert not tax.contains("Representation & ToxicityHarms", "Unfair", "disability discrimination")
    assert not tax.contains("Malicious Use", "Fraud or deceptive action", "scams")
    every_class3 = {p[2] for p in tax.paths()}
    assert not every_class3 & set(WRONG_GUESSES)


def test_every_shipped_entry_names_where_it_was_verified(tax):
    assert set(tax.sources) == {"harm_split", "paper_table1"}
    assert "tpy001/Safety-Reminder" in tax.sources["harm_split"] and "SPA_VL.json" in tax.sources["harm_split"]
    assert "Table 1" in tax.sources["paper_table1"]
    for d in tax.domains:
        assert set(d.sources) == {"harm_split", "paper_table1"}, d.label
        for c in d.categories:
            assert set(c.sources) == {"harm_split", "paper_table1"}, c.label
            for s in c.subcategories:
                assert s.sources == ("harm_split",), s.label  # class3 strings: the data, not the paper


def test_every_category_has_subcategories(tax):
    for d in tax.domains:
        for c in d.categories:
            assert c.subcategories, (d.label, c.label)


def test_contains_prefixes(tax):
    assert tax.contains("Malicious Use")
    assert tax.contains("Malicious Use", "Security threats")
    assert tax.contains("Malicious Use", "Security threats", "weapon")
    assert not tax.contains("Malicious use")  # case matters
    assert not tax.contains("Malicious Use ")  # so does whitespace
    assert not tax.contains("Malicious Use", "Toxic")  # a category of another domain
    assert not tax.contains("Malicious Use", "Security threats", "bully")  # a subcategory of another category
    assert not tax.contains("Representation & Toxicity Harms")
    for path in tax.paths():
        assert tax.contains(*path)
        assert tax.contains(*path[:2])
        assert tax.contains(path[0])


def test_slug_for_and_domain(tax):
    for slug, label in DOMAINS.items():
        assert tax.slug_for(label) == slug
        assert tax.domain(slug).label == label
    assert tax.slug_for("Malicious use") is None
    assert tax.slug_for(None) is None
    assert tax.slug_for("Toxic") is None  # a category is not a domain
    with pytest.raises(KeyError, match="unknown domain"):
        tax.domain("nope")


def test_tree_text_has_counts(tax):
    text = tax.tree()
    head = text.splitlines()[0]
    for token in ("6 domains", "15 categories", "53 subcategories", "0 provisional"):
        assert token in head
    for d in tax.domains:
        assert d.label in text and f"[{d.slug}]" in text
    assert "*" not in text.split("\nsources:")[0].split("\n", 1)[1]  # nothing provisional to mark
    assert "  harm_split: the upstream test/harm split" in text  # the sources are listed at the end


def test_tree_marks_provisional_entries(tmp_path):
    text = Taxonomy.load(_write(tmp_path, MINIMAL)).tree()
    assert "First (2): one, two*" in text and "three*" not in text


def test_to_dict_round_trips(tax, tmp_path):
    d = tax.to_dict()
    assert d["counts"] == tax.counts()
    # counts recomputed from the dict's own structure
    subs = [s for dom in d["domains"] for c in dom["categories"] for s in c["subcategories"]]
    assert d["counts"] == {
        "domains": len(d["domains"]),
        "categories": sum(len(dom["categories"]) for dom in d["domains"]),
        "subcategories": len(subs),
        "provisional": sum(s["provenance"] == "provisional" for s in subs),
    }
    assert d["sources"] == tax.sources and all(s["sources"] == ["harm_split"] for s in subs)
    # and the dict, written back as a taxonomy file, loads to the same taxonomy
    p = tmp_path / "roundtrip.yaml"
    p.write_text(yaml.safe_dump({"name": d["name"], "sources": d["sources"], "domains": d["domains"]},
                                allow_unicode=True))
    again = Taxonomy.load(p)
    assert again.counts() == tax.counts()
    assert again.paths() == tax.paths()
    assert again.slugs == tax.slugs
    assert again.to_dict()["domains"] == d["domains"] and again.sources == tax.sources


def test_load_default_is_the_shipped_file(tax):
    assert Path(tax.source) == DEFAULT_TAXONOMY.resolve()
    assert len(tax.sha256) == 64
    assert tax.name == "spa-vl"


# --- user taxonomy files --------------------------------------------------------------------------

def test_user_taxonomy_changes_behaviour(tmp_path, tax):
    p = _write(tmp_path, MINIMAL)
    mine = Taxonomy.load(p)
    assert mine.name == "mini"
    assert mine.counts() == {"domains": 2, "categories": 2, "subcategories": 3, "provisional": 1}
    assert mine.slugs == ["alpha", "beta"]
    assert mine.slug_for("BetaHarms") == "beta"
    assert mine.contains("Alpha Harms", "First", "two")
    assert not mine.contains("Malicious Use")
    assert not tax.contains("Alpha Harms")
    assert mine.sha256 != tax.sha256
    assert Path(mine.source) == p.resolve()


def test_user_taxonomy_changes_row_check(tmp_path, tax):
    from builder.format.schema import check_row

    mine = Taxonomy.load(_write(tmp_path, MINIMAL))
    row = {"id": "x", "image_name": "a.jpg", "question": "q?", "class1": "Alpha Harms", "class2": "First",
           "class3": "one"}
    check_row(row, "eval", mine, decode=None)
    with pytest.raises(DataError) as e:
        check_row(row, "eval", tax, decode=None)
    assert e.value.field == "class1"


def test_bare_subcategory_strings_are_provisional(tmp_path):
    p = _write(tmp_path, """\
        domains:
          - slug: alpha
            label: Alpha
            categories:
              - label: First
                subcategories: [one, two]
        """)
    t = Taxonomy.load(p)
    assert [s.provenance for _, s in t.domain("alpha").subcategories] == ["provisional", "provisional"]
    assert t.name == "tax"  # the file stem when the file has no name


def _load_error(path: Path) -> DataError:
    with pytest.raises(DataError) as e:
        Taxonomy.load(path)
    err = e.value
    assert err.file is not None and Path(err.file).resolve() == path.resolve()
    assert path.name in str(err)
    return err


def test_bad_yaml(tmp_path):
    p = _write(tmp_path, "domains:\n  - {slug: alpha, label: [unclosed\n")
    err = _load_error(p)
    assert "YAML" in err.message


def test_missing_file(tmp_path):
    _load_error(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "domains: []\n", "name: x\n"])
def test_no_domains(tmp_path, text):
    err = _load_error(_write(tmp_path, text))
    assert err.field == "domains"


def test_duplicate_slug(tmp_path):
    p = _write(tmp_path, MINIMAL.replace("slug: beta", "slug: alpha"))
    err = _load_error(p)
    assert err.field == "domains[1]"
    assert "duplicate" in err.message


def test_duplicate_domain_label(tmp_path):
    p = _write(tmp_path, MINIMAL.replace('"BetaHarms"', '"Alpha Harms"'))
    err = _load_error(p)
    assert err.field == "domains[1]"


@pytest.mark.parametrize("slug", ["test", "default", "unattributed"])
def test_reserved_slug(tmp_path, slug):
    p = _write(tmp_path, MINIMAL.replace("slug: beta", f"slug: {slug}"))
    err = _load_error(p)
    assert err.field == "domains[1].slug"
    assert slug in err.message


@pytest.mark.parametrize("slug", ["Alpha", "1abc", "a-b", "a b", "''"])
def test_malformed_slug(tmp_path, slug):
    p = _write(tmp_path, MINIMAL.replace("slug: alpha", f"slug: {slug}"))
    err = _load_error(p)
    assert err.field == "domains[0].slug"


def test_slug_with_trailing_newline_rejected(tmp_path):
    p = _write(tmp_path, MINIMAL.replace("slug: alpha", 'slug: "alpha\\n"'))
    err = _load_error(p)
    assert err.field == "domains[0].slug"


def test_empty_category(tmp_path):
    p = _write(tmp_path, MINIMAL.replace(
        "      - label: Second\n        subcategories:\n          - {label: three, provenance: upstream}\n",
        "      - label: Second\n        subcategories: []\n"))
    err = _load_error(p)
    assert err.field == "domains[1].categories[0]"
    assert "no subcategories" in err.message


def test_domain_without_categories(tmp_path):
    p = _write(tmp_path, MINIMAL + "  - slug: gamma\n    label: Gamma\n    categories: []\n")
    err = _load_error(p)
    assert err.field == "domains[2]"


def test_category_without_label(tmp_path):
    p = _write(tmp_path, MINIMAL.replace("- label: Second", "- label: ''"))
    err = _load_error(p)
    assert err.field == "domains[1].categories[0]"


def test_bad_provenance(tmp_path):
    p = _write(tmp_path, MINIMAL.replace("{label: two, provenance: provisional}", "{label: two, provenance: guessed}"))
    err = _load_error(p)
    assert err.field == "domains[0].categories[0].subcategories[1]"
    assert "guessed" in err.message


def test_subcategory_without_label(tmp_path):
    p = _write(tmp_path, MINIMAL.replace("{label: two, provenance: provisional}", "{provenance: provisional}"))
    err = _load_error(p)
    assert err.field == "domains[0].categories[0].subcategories[1]"


def test_domain_label_missing(tmp_path):
    p = _write(tmp_path, MINIMAL.replace('label: "BetaHarms"', "label: ''"))
    err = _load_error(p)
    assert err.field == "domains[1].label"


def test_fixed_file_loads_after_an_error(tmp_path):
    p = _write(tmp_path, MINIMAL.replace("slug: beta", "slug: test"))
    _load_error(p)
    p.write_text(MINIMAL)
    assert Taxonomy.load(p).slugs == ["alpha", "beta"]


def test_subcategories_must_be_a_list(tmp_path):
    p = _write(tmp_path, MINIMAL.replace(
        "subcategories:\n          - {label: three, provenance: upstream}", "subcategories: three"))
    err = _load_error(p)
    assert err.field.startswith("domains[1].categories[0]")


def test_duplicate_category_or_subcategory_rejected(tmp_path):
    dup_sub = _write(tmp_path, MINIMAL.replace("{label: two, provenance: provisional}",
                                                "{label: one, provenance: provisional}"), "dup_sub.yaml")
    _load_error(dup_sub)
    dup_cat = _write(tmp_path, MINIMAL.replace("- label: Second", "- label: First").replace(
        "slug: beta\n    label: \"BetaHarms\"\n    categories:\n",
        "slug: beta\n    label: \"BetaHarms\"\n    categories:\n      - label: First\n"
        "        subcategories: [x]\n"), "dup_cat.yaml")
    _load_error(dup_cat)


def test_edited_file_is_reloaded(tmp_path):
    p = _write(tmp_path, MINIMAL)
    assert Taxonomy.load(p).counts()["domains"] == 2
    p.write_text(MINIMAL + "  - slug: gamma\n    label: Gamma\n    categories:\n"
                 "      - label: Third\n        subcategories: [four]\n")
    # sanity: the new file really has three domains
    assert len(yaml.safe_load(p.read_text())["domains"]) == 3
    assert Taxonomy.load(p).counts()["domains"] == 3


@pytest.mark.parametrize("where, bad", [
    ("domains[0].sources", MINIMAL.replace('label: "Alpha Harms"', 'label: "Alpha Harms"\n    sources: [""]')),
    ("domains[0].categories[0].subcategories[0].sources",
     MINIMAL.replace("{label: one, provenance: upstream}", "{label: one, provenance: upstream, sources: [3]}")),
    ("sources", "sources: [a, b]\n" + MINIMAL),
])
def test_bad_sources_are_located(tmp_path, where, bad):
    err = _load_error(_write(tmp_path, bad))
    assert err.field == where


def test_sources_may_be_keys_or_free_text(tmp_path):
    text = "sources:\n  paper: the paper\n" + MINIMAL.replace(
        "{label: one, provenance: upstream}", "{label: one, provenance: upstream, sources: [paper, my notes p. 3]}")
    t = Taxonomy.load(_write(tmp_path, text))
    assert t.sources == {"paper": "the paper"}
    assert t.domain("alpha").categories[0].subcategories[0].sources == ("paper", "my notes p. 3")
    assert t.domain("beta").sources == ()  # no sources named: allowed in a user file
