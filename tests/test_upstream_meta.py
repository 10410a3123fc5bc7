"""builder.upstream.meta: upstream's train/meta.json, streamed, and the join of a train row with its entry."""

from __future__ import annotations

import io
import json

import pytest

from builder.errors import DataError
from builder.taxonomy import Taxonomy
from builder.upstream.meta import (
    MALFORMED,
    NO_ENTRY,
    NO_INDEX,
    TEXTS_DIFFER,
    MetaIndex,
    iter_json_array,
    meta_index,
    text_key,
)

PATHS = Taxonomy.load().paths()


def entry(k: int, path=PATHS[0], n=0, **texts) -> dict:
    base = {"question": f"\n\n\"question {k}?\"", "chosen": f" I can't help. ({k})", "rejected": f"Sure: {k}\n\n1. x"}
    return {"id": k, "image": "/".join(path) + f"/{n}.jpg", **base, **texts}


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 1 << 20])
def test_the_list_streams_to_the_same_entries_whatever_the_chunk(chunk):
    entries = [entry(k, PATHS[k % len(PATHS)], k // 3) for k in range(200)] + [{"unicode": "naïve – ✓ 😀"}]
    raw = json.dumps(entries, indent=4, ensure_ascii=False).encode()
    got = list(iter_json_array(io.BytesIO(raw), source="m.json", chunk=chunk))
    assert got == list(enumerate(entries))


@pytest.mark.parametrize("raw, row, words", [
    (b'{"not": "a list"}', None, "expected a JSON list"),
    (b'[{"a": 1}, {"a": ]', 1, "not valid JSON"),
    (b'[{"a": 1} {"a": 2}]', 0, "expected ',' or ']' after entry 0"),
    (b'[{"a": 1}, {"a": 2}', None, "cut short"),
    (b'[{"a": "caf\xe9"}]', None, "not valid UTF-8 at byte 11"),
])
def test_bad_json_is_located(raw, row, words):
    with pytest.raises(DataError) as info:
        list(iter_json_array(io.BytesIO(raw), source="train.zip member train/meta.json", chunk=4))
    assert info.value.file == "train.zip member train/meta.json" and info.value.row == row
    assert words in info.value.message


def test_an_empty_list_has_no_entries():
    assert list(iter_json_array(io.BytesIO(b" [ ] "), source="m")) == []


@pytest.mark.parametrize("name, k", [("170.jpg", 170), ("0.jpg", 0), ("12.png", 12), ("a/7.jpg", 7),
                                     (b"9.jpg", 9), ("IMG_1.jpg", None), ("-1.jpg", None), ("1.5.jpg", None),
                                     ("٣.jpg", None), (None, None), ("", None)])
def test_meta_index_reads_the_integer_of_image_name(name, k):
    assert meta_index(name) == k


def test_text_key_is_the_exact_bytes():
    assert text_key("a", "b", "c") == text_key(b"a", b"b", b"c")
    assert text_key(" a", "b", "c") != text_key("a", "b", "c")  # a leading space counts
    assert text_key("ab", "", "c") != text_key("a", "b", "c")  # so do the boundaries


def test_lookup_labels_an_entry_with_equal_texts_and_says_why_not_otherwise():
    entries = [entry(0, PATHS[5]), entry(1, PATHS[9], 4), {"image": "x.jpg", "question": "q"},
               entry(3, PATHS[2], image="figs/" + "/".join(PATHS[2]) + "/8.jpg")]
    meta = MetaIndex.read(io.BytesIO(json.dumps(entries).encode()), source="m.json")
    key = lambda e: text_key(e["question"], e["chosen"], e["rejected"])  # noqa: E731
    assert meta.lookup(0, key(entries[0])) == (PATHS[5], None)
    assert meta.lookup(1, key(entries[1])) == (PATHS[9], None)
    assert meta.lookup(3, key(entries[3])) == (PATHS[2], None)  # folders above class1 are allowed
    assert meta.lookup(1, key(entries[0])) == (None, TEXTS_DIFFER)
    assert meta.lookup(0, text_key(entries[0]["question"].strip(), entries[0]["chosen"], entries[0]["rejected"])) \
        == (None, TEXTS_DIFFER)
    assert meta.lookup(2, key(entries[0])) == (None, MALFORMED)
    assert meta.lookup(4, key(entries[0])) == (None, NO_ENTRY)
    assert meta.lookup(None, key(entries[0])) == (None, NO_INDEX)
    assert len(meta.paths) == 3  # one copy of each class path, not one per entry
