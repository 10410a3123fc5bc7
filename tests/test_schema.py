"""Row schemas and the one row check (builder.format.schema)."""

from __future__ import annotations

import io

import pyarrow as pa
import pytest
from datasets import Image, Value
from PIL import Image as PILImage

import builder.format.schema as schema
from builder.errors import DataError
from builder.format.schema import (
    EVAL_FEATURES,
    PREFERENCE_FEATURES,
    check_image,
    check_row,
    check_table_schema,
    image_sha256,
    row_id,
)
from builder.taxonomy import Taxonomy

# Column lists as ARCHITECTURE.md states them ("Preference rows: ..." and "Eval rows: ...").
PREFERENCE_COLUMNS = [
    "id", "image", "image_name", "question", "question_type", "chosen", "rejected", "class1", "class2", "class3",
    "chosen_model", "rejected_model", "judge_rationale", "question_unsafe", "chosen_unsafe", "rejected_unsafe",
]
EVAL_COLUMNS = ["id", "image", "image_name", "question", "class1", "class2", "class3"]
# Upstream sqrti/SPA-VL columns (reference/spa_vl_facts.md §1) and their `datasets` types.
UPSTREAM_TYPES = {
    "image": Image(), "question": Value("string"), "chosen": Value("string"), "rejected": Value("string"),
    "image_name": Value("string"), "class1": Value("string"), "class2": Value("string"), "class3": Value("string"),
}


@pytest.fixture(scope="module")
def tax() -> Taxonomy:
    return Taxonomy.load()


def _jpeg(w=48, h=40, *, noise=False) -> bytes:
    img = PILImage.new("RGB", (w, h), (200, 30, 90))
    if noise:
        img = PILImage.effect_noise((w, h), 60).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


JPEG = _jpeg()
TAX = Taxonomy.load()
PATH = next(p for p in TAX.paths() if p[0] == TAX.domain("malicious_use").label)  # a valid class path


def pref_row(**over) -> dict:
    row = {
        "id": row_id(image_sha256(JPEG), "What is this?", "No.", "Yes."),
        "image": {"bytes": JPEG, "path": "0.jpg"},
        "image_name": "0.jpg",
        "question": "What is this?",
        "question_type": "easy",
        "chosen": "No.",
        "rejected": "Yes.",
        "class1": PATH[0],
        "class2": PATH[1],
        "class3": PATH[2],
        "chosen_model": None,
        "rejected_model": None,
        "judge_rationale": None,
        "question_unsafe": None,
        "chosen_unsafe": None,
        "rejected_unsafe": None,
    }
    row.update(over)
    return row


def eval_row(**over) -> dict:
    row = {k: v for k, v in pref_row().items() if k in EVAL_COLUMNS}
    row.update(over)
    return row


def _err(row, kind, tax, **kw) -> DataError:
    with pytest.raises(DataError) as e:
        check_row(row, kind, tax, **kw)
    return e.value


# --- features ------------------------------------------------------------------------------------

def test_preference_columns_exact():
    assert list(PREFERENCE_FEATURES) == PREFERENCE_COLUMNS
    assert isinstance(PREFERENCE_FEATURES["image"], Image)
    for name in ("id", "image_name", "question", "question_type", "chosen", "rejected", "class1", "class2",
                 "class3", "chosen_model", "rejected_model", "judge_rationale"):
        assert PREFERENCE_FEATURES[name] == Value("string"), name
    for name in ("question_unsafe", "chosen_unsafe", "rejected_unsafe"):
        assert PREFERENCE_FEATURES[name] == Value("bool"), name


def test_eval_columns_exact():
    assert list(EVAL_FEATURES) == EVAL_COLUMNS
    assert isinstance(EVAL_FEATURES["image"], Image)
    for name in EVAL_COLUMNS:
        if name != "image":
            assert EVAL_FEATURES[name] == Value("string"), name


def test_upstream_names_and_types_kept():
    for features, upstream_cols in (
        (PREFERENCE_FEATURES, ["image", "question", "chosen", "rejected", "image_name", "class1", "class2", "class3"]),
        (EVAL_FEATURES, ["image", "question", "class1", "class2", "class3"]),
    ):
        for col in upstream_cols:
            assert features[col] == UPSTREAM_TYPES[col], col
    # images embed bytes: struct<bytes: binary, path: string>, as upstream parquet stores them
    image_type = PREFERENCE_FEATURES.arrow_schema.field("image").type
    assert image_type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])


# --- row_id --------------------------------------------------------------------------------------

def test_row_id_stable_and_content_sensitive():
    sha = image_sha256(JPEG)
    base = row_id(sha, "q", "c", "r")
    assert base == row_id(sha, "q", "c", "r")
    assert isinstance(base, str) and base and all(ch in "0123456789abcdef" for ch in base)
    variants = [
        row_id(image_sha256(JPEG + b"\0"), "q", "c", "r"),
        row_id(sha, "q2", "c", "r"),
        row_id(sha, "q", "c2", "r"),
        row_id(sha, "q", "c", "r2"),
        row_id(sha, "q", "r", "c"),  # swapping chosen and rejected is a different row
        row_id(sha, "q"),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_row_id_field_boundaries():
    sha = image_sha256(JPEG)
    assert row_id(sha, "ab", "c", "") != row_id(sha, "a", "bc", "")
    assert row_id(sha, "q", "c", None) == row_id(sha, "q", "c", "")  # None and missing text are the same


def test_row_id_no_separator_collision():
    sha = image_sha256(JPEG)
    assert row_id(sha, "a\x1fb", "c", "r") != row_id(sha, "a", "b\x1fc", "r")


def test_image_sha256():
    assert image_sha256(JPEG) == image_sha256(bytes(JPEG))
    assert image_sha256(JPEG) != image_sha256(_jpeg(49, 40))
    assert len(image_sha256(JPEG)) == 64


# --- check_row: accepted rows --------------------------------------------------------------------

def test_valid_rows_pass(tax):
    check_row(pref_row(), "preference", tax)
    check_row(pref_row(question_type=None), "preference", tax)
    for qt in ("easy", "hardq", "hards"):
        check_row(pref_row(question_type=qt), "preference", tax)
    check_row(pref_row(question_unsafe=True, chosen_unsafe=False, chosen_model="m"), "preference", tax)
    check_row(eval_row(), "eval", tax)
    check_row(eval_row(), "eval", tax, decode="full")
    # every path of the taxonomy is accepted
    for c1, c2, c3 in tax.paths():
        check_row(eval_row(class1=c1, class2=c2, class3=c3), "eval", tax, decode=None)


# --- check_row: text ---------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["id", "image_name", "question", "chosen", "rejected"])
@pytest.mark.parametrize("value", ["", "   ", "\n\t "])
def test_empty_text_rejected(tax, field, value):
    err = _err(pref_row(**{field: value}), "preference", tax)
    assert err.field == field
    assert err.file is None and err.row is None


@pytest.mark.parametrize("field", ["id", "image_name", "question", "chosen", "rejected"])
def test_missing_text_rejected(tax, field):
    row = pref_row()
    del row[field]
    err = _err(row, "preference", tax)
    assert err.field == field
    assert "missing" in err.message
    err = _err(pref_row(**{field: None}), "preference", tax)
    assert err.field == field


@pytest.mark.parametrize("value", [3, b"bytes", ["q"], 1.5])
def test_non_str_text_rejected(tax, value):
    err = _err(pref_row(question=value), "preference", tax)
    assert err.field == "question"
    assert type(value).__name__ in err.message


@pytest.mark.parametrize("field", ["id", "image_name", "question"])
def test_eval_required_text(tax, field):
    err = _err(eval_row(**{field: " "}), "eval", tax)
    assert err.field == field


def test_eval_rows_need_no_chosen_rejected(tax):
    check_row(eval_row(), "eval", tax)  # no chosen / rejected keys at all
    assert "chosen" not in eval_row()


@pytest.mark.parametrize("qt", ["hard", "EASY", "", "hardd", 1])
def test_bad_question_type(tax, qt):
    err = _err(pref_row(question_type=qt), "preference", tax)
    assert err.field == "question_type"


# --- check_row: labels -------------------------------------------------------------------------

def _near_misses() -> list[tuple[tuple[str, str, str], str]]:
    """Label paths one small step off the taxonomy's (case, a space, another branch, a fixed typo)."""
    c1, c2, c3 = PATH
    spaced = next(p for p in TAX.paths() if "yHarms" in p[0])  # "...ToxicityHarms": upstream has no space
    other = next(p for p in TAX.paths() if p[0] != c1)
    sibling = next(p for p in TAX.paths() if p[0] == c1 and p[1] != c2)
    typo = next(p for p in TAX.paths() if "disablity" in p[2])
    return [
        ((c1.lower(), c2, c3), "class1"),
        ((spaced[0].replace("Harms", " Harms"), spaced[1], spaced[2]), "class1"),
        ((c1, other[1], other[2]), "class2"),
        ((c1, c2.swapcase(), c3), "class2"),
        ((c1, c2, sibling[2]), "class3"),
        ((typo[0], typo[1], typo[2].replace("disablity", "disability")), "class3"),
    ]


@pytest.mark.parametrize("labels, field", _near_misses())
@pytest.mark.parametrize("kind", ["preference", "eval"])
def test_label_outside_taxonomy(tax, labels, field, kind):
    c1, c2, c3 = labels
    row = (pref_row if kind == "preference" else eval_row)(class1=c1, class2=c2, class3=c3)
    err = _err(row, kind, tax)
    assert err.field == field
    assert "taxonomy" in err.message


@pytest.mark.parametrize("missing", ["class1", "class2", "class3"])
def test_partial_labels_rejected(tax, missing):
    err = _err(pref_row(**{missing: None}), "preference", tax)
    assert err.field == missing
    # even where unattributed rows are allowed: only all three null counts as unattributed
    err = _err(pref_row(**{missing: None}), "preference", tax, allow_unattributed=True)
    assert err.field == missing


def test_unattributed_only_when_allowed(tax):
    row = pref_row(class1=None, class2=None, class3=None)
    err = _err(row, "preference", tax)
    assert err.field == "class1"
    check_row(row, "preference", tax, allow_unattributed=True)
    # eval rows are never unattributed
    err = _err(eval_row(class1=None, class2=None, class3=None), "eval", tax, allow_unattributed=True)
    assert err.field == "class1"


def test_empty_string_label_rejected(tax):
    err = _err(pref_row(class3=""), "preference", tax)
    assert err.field == "class3"


# --- check_row: images --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "image",
    [None, {}, {"bytes": None, "path": "0.jpg"}, {"bytes": b"", "path": "0.jpg"}, JPEG, "0.jpg"],
    ids=["none", "empty-dict", "null-bytes", "empty-bytes", "raw-bytes-not-a-cell", "path-only"],
)
def test_missing_image(tax, image):
    err = _err(pref_row(image=image), "preference", tax)
    assert err.field == "image"


def test_image_key_absent(tax):
    row = pref_row()
    del row["image"]
    assert _err(row, "preference", tax).field == "image"


def test_undecodable_image(tax):
    err = _err(pref_row(image={"bytes": b"this is not an image", "path": "x.jpg"}), "preference", tax)
    assert err.field == "image"
    assert "decode" in err.message


def _encoded(fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    PILImage.effect_noise((96, 80), 60).convert("RGB").save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, marker", [("JPEG", "FFD9"), ("PNG", "IEND"), ("GIF", "GIF trailer")])
@pytest.mark.parametrize("decode", ["header", "full"])
def test_an_image_whose_tail_was_cut_fails_in_both_modes(tax, fmt, marker, decode):
    data = _encoded(fmt)
    cut = data[: len(data) * 2 // 3]  # the header, format and size are intact
    with PILImage.open(io.BytesIO(cut)) as im:
        assert im.size == (96, 80)  # what the old header-only check looked at
    err = _err(pref_row(image={"bytes": cut, "path": "t.jpg"}), "preference", tax, decode=decode)
    assert err.field == "image" and "does not decode" in err.message
    if decode == "header":
        assert f"cut short ({schema._END_MARKERS[fmt]} missing)" in err.message and marker in err.message
    check_row(pref_row(image={"bytes": data, "path": "t.jpg"}), "preference", tax, decode=decode)


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "WEBP"])
def test_formats_without_a_checked_marker_are_decoded_when_cut(fmt):
    data = _encoded(fmt)
    assert check_image({"bytes": data}) == (96, 80)
    with pytest.raises(DataError, match="does not decode"):
        check_image({"bytes": data[: len(data) * 2 // 3]})


def test_bytes_after_the_end_marker_are_accepted_after_a_full_decode(monkeypatch):
    data = _jpeg(noise=True)
    assert schema.image_ends_complete(data, "JPEG") is True
    padded, junk = data + b"\x00\x00\n", data + b"trailing junk from a camera"
    assert schema.image_ends_complete(padded, "JPEG") is True  # padding after FFD9 is not a cut
    assert schema.image_ends_complete(junk, "JPEG") is False
    loads = []
    real_load = PILImage.Image.load
    monkeypatch.setattr(PILImage.Image, "load", lambda self: loads.append(1) or real_load(self))
    assert check_image({"bytes": padded}) == (48, 40)
    assert not loads  # a complete ending: the header is enough
    assert check_image({"bytes": junk}) == (48, 40)
    assert loads  # junk after the end marker: decoded in full to decide


def test_decode_none_skips_image(tax):
    check_row(pref_row(image=None), "preference", tax, decode=None)


def test_oversized_image(tax, monkeypatch):
    monkeypatch.setattr(schema, "MAX_IMAGE_PIXELS", 40 * 40)
    check_row(pref_row(image={"bytes": _jpeg(40, 40), "path": "ok.jpg"}), "preference", tax)
    err = _err(pref_row(image={"bytes": _jpeg(41, 40), "path": "big.jpg"}), "preference", tax)
    assert err.field == "image"
    assert "41x40" in err.message


def test_check_image_returns_size():
    assert check_image({"bytes": _jpeg(48, 40), "path": None}) == (48, 40)
    png = io.BytesIO()
    PILImage.new("L", (7, 9)).save(png, format="PNG")
    assert check_image({"bytes": png.getvalue()}, decode="full") == (7, 9)


def test_unsupported_format_rejected():
    buf = io.BytesIO()
    PILImage.new("RGB", (8, 8)).save(buf, format="PPM")
    with pytest.raises(DataError) as e:
        check_image({"bytes": buf.getvalue()})
    assert e.value.field == "image"


@pytest.mark.parametrize("field, value", [("question_unsafe", "yes"), ("chosen_unsafe", 1), ("chosen_model", 5)])
def test_optional_column_types_checked(tax, field, value):
    err = _err(pref_row(**{field: value}), "preference", tax)
    assert err.field == field


# --- DataError -----------------------------------------------------------------------------------

def test_data_error_fields_and_location():
    e = DataError("empty text", field="question")
    assert (e.message, e.file, e.row, e.field) == ("empty text", None, None, "question")
    located = e.located(file="a.parquet", row=3)
    assert (located.file, located.row, located.field) == ("a.parquet", 3, "question")
    assert str(located) == "a.parquet: row 3: field question: empty text"
    # located never overwrites what is already known
    again = located.located(file="b.parquet", row=9)
    assert (again.file, again.row) == ("a.parquet", 3)
    assert isinstance(e, ValueError)


# --- check_table_schema ----------------------------------------------------------------------------

def test_table_schema_ok():
    check_table_schema(PREFERENCE_FEATURES.arrow_schema, dict(zip(PREFERENCE_COLUMNS, PREFERENCE_FEATURES.arrow_schema.types)), file="f.parquet")
    # large_string and all-null columns are accepted for string columns
    expected = {"question": pa.string()}
    check_table_schema(pa.schema([("question", pa.large_string())]), expected, file="f")
    check_table_schema(pa.schema([("question", pa.null())]), expected, file="f")


def test_table_schema_missing_column():
    expected = {n: t for n, t in zip(EVAL_COLUMNS, EVAL_FEATURES.arrow_schema.types)}
    have = EVAL_FEATURES.arrow_schema.remove(EVAL_FEATURES.arrow_schema.get_field_index("class2"))
    with pytest.raises(DataError) as e:
        check_table_schema(have, expected, file="data/test/harm-00000-of-00001.parquet")
    assert e.value.field == "class2"
    assert e.value.file == "data/test/harm-00000-of-00001.parquet"
    assert "missing" in e.value.message


@pytest.mark.parametrize(
    "column, bad_type",
    [("question", pa.int64()), ("image", pa.binary()), ("image", pa.struct([("path", pa.string())])),
     ("question_unsafe", pa.string()), ("class1", pa.list_(pa.string()))],
)
def test_table_schema_mistyped_column(column, bad_type):
    arrow = PREFERENCE_FEATURES.arrow_schema
    expected = dict(zip(arrow.names, arrow.types))
    have = arrow.set(arrow.get_field_index(column), pa.field(column, bad_type))
    with pytest.raises(DataError) as e:
        check_table_schema(have, expected, file="x.parquet")
    assert e.value.field == column
    assert e.value.file == "x.parquet"
