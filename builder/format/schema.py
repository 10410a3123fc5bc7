"""Row schemas of the dataset folder and the one row check every writer and reader uses.

Preference rows (train/validation) and eval rows (test/harm, test/help) keep the upstream
``sqrti/SPA-VL`` column names and types and add an id, the question type and nullable provenance.
"""

from __future__ import annotations

import hashlib
import io
from typing import Literal

import pyarrow as pa
from datasets import Features, Image, Value
from PIL import Image as PILImage

from builder.errors import DataError
from builder.taxonomy import Taxonomy

QUESTION_TYPES = ("easy", "hardq", "hards")
MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard; SPA-VL images are well under 4k x 4k
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")

_text = Value("string")
PREFERENCE_FEATURES = Features(
    {
        "id": _text,
        "image": Image(),
        "image_name": _text,
        "question": _text,
        "question_type": _text,
        "chosen": _text,
        "rejected": _text,
        "class1": _text,
        "class2": _text,
        "class3": _text,
        "chosen_model": _text,
        "rejected_model": _text,
        "judge_rationale": _text,
        "question_unsafe": Value("bool"),
        "chosen_unsafe": Value("bool"),
        "rejected_unsafe": Value("bool"),
    }
)
EVAL_FEATURES = Features(
    {
        "id": _text,
        "image": Image(),
        "image_name": _text,
        "question": _text,
        "class1": _text,
        "class2": _text,
        "class3": _text,
    }
)
RowKind = Literal["preference", "eval"]

# Text that must be present and non-blank in every row of a kind.
REQUIRED_TEXT = {
    "preference": ("id", "image_name", "question", "chosen", "rejected"),
    "eval": ("id", "image_name", "question"),
}

# Nullable provenance of preference rows, and the Python type a present value must have.
OPTIONAL_TYPES = {
    "question_type": str, "chosen_model": str, "rejected_model": str, "judge_rationale": str,
    "question_unsafe": bool, "chosen_unsafe": bool, "rejected_unsafe": bool,
}


def row_id(image_sha256: str, question: str, chosen: str | None = None, rejected: str | None = None) -> str:
    """Stable content hash of a row: same image bytes and texts, same id, whatever the file order."""
    h = hashlib.sha256()
    for part in (image_sha256, question, chosen or "", rejected or ""):
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "big"))  # length-prefixed: no two field splits hash alike
        h.update(data)
    return h.hexdigest()[:32]


def image_sha256(image_bytes: bytes) -> str:
    return hashlib.sha256(image_bytes).hexdigest()


def check_table_schema(schema: pa.Schema, expected: dict[str, pa.DataType], *, file: str) -> None:
    """Raise a DataError naming the first missing or mistyped column of a parquet file."""
    for name, want in expected.items():
        idx = schema.get_field_index(name)
        if idx < 0:
            raise DataError(f"missing column (have: {', '.join(schema.names)})", file=file, field=name)
        got = schema.field(idx).type
        if not _type_compatible(got, want):
            raise DataError(f"expected type {want}, got {got}", file=file, field=name)


def _type_compatible(got: pa.DataType, want: pa.DataType) -> bool:
    if pa.types.is_string(want) or pa.types.is_large_string(want):
        return pa.types.is_string(got) or pa.types.is_large_string(got) or pa.types.is_null(got)
    if pa.types.is_struct(want):  # the Image feature: struct<bytes: binary, path: string>
        idx = got.get_field_index("bytes") if pa.types.is_struct(got) else -1
        return idx >= 0 and (pa.types.is_binary(got.field(idx).type) or pa.types.is_large_binary(got.field(idx).type))
    if pa.types.is_boolean(want):
        return pa.types.is_boolean(got) or pa.types.is_null(got)
    return got.equals(want)


def invalid_utf8(column: pa.Array | pa.ChunkedArray) -> list[tuple[int, str]]:
    """(index, message) of every cell of a string column that is not valid UTF-8; [] for a clean column.

    Parquet readers hand string columns over unchecked; one vectorised pass finds a clean column, and
    only a bad one is walked in Python to say where.
    """
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return []
    try:
        column.validate(full=True)
        return []
    except pa.ArrowInvalid:
        pass
    out = []
    for i, data in enumerate(column.cast(pa.binary() if pa.types.is_string(column.type) else pa.large_binary())
                             .to_pylist()):
        try:
            if data is not None:
                data.decode("utf-8")
        except UnicodeDecodeError as e:
            out.append((i, f"not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} ({e.reason})"))
    return out


def check_image(image, *, decode: Literal["header", "full"] = "header") -> tuple[int, int]:
    """Check an image cell ({'bytes': ..., 'path': ...}); return (width, height).

    ``header`` reads the format and size and checks that the bytes end the way a complete file of
    that format ends (JPEG: the FFD9 end marker, PNG: the IEND chunk, GIF: its trailer, WebP: the
    RIFF length); an image without that ending, or of a format without one we check (BMP, TIFF),
    is decoded in full to decide. So a JPEG whose tail was cut off fails in either mode.
    ``full`` decodes every pixel of every image.
    Raises DataError(field='image') on anything that is not a decodable image within limits.
    """
    data = image.get("bytes") if isinstance(image, dict) else None
    if not data:
        raise DataError("image bytes missing", field="image")
    fmt, ended = None, None
    try:
        with PILImage.open(io.BytesIO(data)) as im:
            w, h = im.size
            if im.format not in IMAGE_FORMATS:
                raise DataError(f"unsupported image format {im.format}", field="image")
            if w <= 0 or h <= 0 or w * h > MAX_IMAGE_PIXELS:
                raise DataError(f"image size {w}x{h} outside limits (max {MAX_IMAGE_PIXELS} pixels)", field="image")
            fmt, ended = im.format, image_ends_complete(data, im.format)
            if decode == "full" or not ended:
                im.load()
    except DataError:
        raise
    except Exception as e:  # PIL raises many types for bad bytes: UnidentifiedImageError, OSError, SyntaxError...
        cut = f"is cut short ({_END_MARKERS[fmt]} missing) and " if ended is False else ""
        raise DataError(f"image {cut}does not decode: {type(e).__name__}: {e}", field="image") from None
    return w, h


_END_MARKERS = {"JPEG": "the JPEG end marker FFD9", "MPO": "the JPEG end marker FFD9",
                "PNG": "the PNG IEND chunk", "GIF": "the GIF trailer", "WEBP": "part of the WebP RIFF body"}
_TRAILING_PAD = b"\x00\r\n\t "  # some encoders pad after the end marker; the decoder ignores it


def image_ends_complete(data, fmt: str | None) -> bool | None:
    """Whether ``data`` ends like a complete ``fmt`` file (False: cut short, or other bytes follow its
    ending); None for formats without an ending we check."""
    if fmt not in _END_MARKERS:
        return None
    if fmt == "WEBP":
        ok = len(data) >= 12 and int.from_bytes(bytes(data[4:8]), "little") + 8 <= len(data)
    else:
        tail = bytes(data[-64:]).rstrip(_TRAILING_PAD)
        ok = tail.endswith({"PNG": b"IEND\xaeB`\x82", "GIF": b"\x3b"}.get(fmt, b"\xff\xd9"))
    return ok


def check_row(
    row: dict,
    kind: RowKind,
    taxonomy: Taxonomy,
    *,
    allow_unattributed: bool = False,
    decode: Literal["header", "full"] | None = "header",
) -> None:
    """The row check used everywhere rows are written or imported.

    Non-empty text, labels inside the taxonomy (a full class1/class2/class3 path), a present and
    decodable image. ``allow_unattributed`` accepts preference rows whose three labels are all
    null (upstream train rows that could not be attributed to a subcategory).
    Raises DataError with ``field`` set; callers add file and row.
    """
    for name in REQUIRED_TEXT[kind]:
        value = row.get(name)
        if not isinstance(value, str):
            raise DataError("missing text" if value is None else f"expected text, got {type(value).__name__}", field=name)
        if not value.strip():
            raise DataError("empty or whitespace-only text", field=name)
    if kind == "preference":
        for name, types in OPTIONAL_TYPES.items():
            value = row.get(name)
            if value is not None and not isinstance(value, types):
                raise DataError(f"expected {types.__name__} or null, got {type(value).__name__}", field=name)
        qt = row.get("question_type")
        if qt is not None and qt not in QUESTION_TYPES:
            raise DataError(f"question_type must be one of {QUESTION_TYPES} or null, got {qt!r}", field="question_type")
    labels = [row.get("class1"), row.get("class2"), row.get("class3")]
    if labels == [None, None, None] and allow_unattributed and kind == "preference":
        pass
    else:
        for i, name in enumerate(("class1", "class2", "class3")):
            if not isinstance(labels[i], str) or not labels[i]:
                raise DataError("label missing", field=name)
            if not taxonomy.contains(*labels[: i + 1]):
                raise DataError(
                    f"label {labels[i]!r} is not in the taxonomy under {' / '.join(labels[:i]) or 'the root'} "
                    f"({taxonomy.source}); if the data is right, add it to a taxonomy file and pass --taxonomy",
                    field=name,
                )
    if decode is not None:
        check_image(row.get("image"), decode=decode)
