"""Stage 1 (images): normalisation, typography, sources, downloads and filters; offline, loopback only."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx2
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from builder.errors import DataError
from builder.generate.image_sources import (
    ClipRetrievalSource,
    FolderSource,
    ImageCandidate,
    TypographySource,
    UrlListSource,
    build_source,
    render_typography,
)
from builder.generate.images import (
    ClipScorer,
    ImageFilters,
    ImageRejected,
    collect_images,
    download,
    normalize_image,
)

PATH = ("Malicious Use", "Security threats", "weapon")
PATH2 = ("Malicious Use", "Security threats", "cyber attack")


def picture(seed: int, size=(256, 256), fmt="JPEG", **save) -> bytes:
    """A smooth random picture: distinct seeds give far-apart perceptual hashes."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims a size in its header and carries no real pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def norm(data: bytes, **kw):
    return normalize_image(data, **{"max_pixels": 40_000_000, "max_bytes": 20_000_000, "min_side": 224, **kw})


def reason(fn, *args, **kw) -> str:
    with pytest.raises(ImageRejected) as e:
        fn(*args, **kw)
    return e.value.reason


class ListSource:
    """An in-memory source: the same candidates for every keyword and class path; records its calls."""

    def __init__(self, items: list[ImageCandidate]):
        self.items, self.calls = items, []

    async def candidates(self, keyword, class_path, n):
        self.calls.append((keyword, class_path, n))
        return self.items[:n]


def cand(ref: str, data: bytes | None = None, **kw) -> ImageCandidate:
    return ImageCandidate("test", ref, data=data if data is not None else picture(zlib.crc32(ref.encode()) % 1000), **kw)


def collect(sources, keywords, filters=None, **kw):
    kw = {"per_subcategory": 10, "progress": False, **kw}
    return asyncio.run(collect_images(sources, filters or ImageFilters(), keywords, **kw))


# --- normalize_image -----------------------------------------------------------------------------------
def test_normalize_reencodes_deterministically_to_rgb_jpeg():
    for data in (picture(1, (300, 240)), picture(2, (240, 300), "PNG")):
        out, w, h = norm(data)
        assert out == norm(data)[0]
        with Image.open(io.BytesIO(out)) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (w, h))
            assert "exif" not in im.info and "comment" not in im.info
    assert (w, h) == (240, 300)


def test_normalize_drops_metadata_and_whitens_transparency():
    im = Image.new("RGBA", (300, 300), (255, 0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    out, _, _ = norm(buf.getvalue())
    assert Image.open(io.BytesIO(out)).getpixel((10, 10)) == (255, 255, 255)
    buf = io.BytesIO()
    Image.fromarray(np.full((300, 300), 30_000, np.uint16)).save(buf, "PNG")  # 16-bit grey is scaled, not clipped
    assert Image.open(io.BytesIO(norm(buf.getvalue())[0])).getpixel((10, 10)) == (117, 117, 117)
    exif = Image.Exif()
    exif[0x010E] = "secret description"
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    with_meta = picture(3, (320, 240), exif=exif.tobytes(), comment=b"hello")
    assert "exif" in Image.open(io.BytesIO(with_meta)).info
    out, w, h = norm(with_meta)
    assert b"secret" not in out and b"hello" not in out and (w, h) == (240, 320)  # stored upright


def test_normalize_rejections():
    assert reason(norm, picture(1, (300, 100))) == "too_small"
    assert reason(norm, b"not an image at all") == "undecodable"
    assert reason(norm, picture(1, (300, 300))[:400]) == "undecodable"  # truncated
    assert reason(norm, picture(1, (300, 300)), max_bytes=1000) == "too_many_bytes"
    assert reason(norm, picture(1, (1000, 1000)), max_pixels=500_000) == "too_many_pixels"


def test_normalize_rejects_decompression_bombs_from_the_header():
    # Beyond PIL's own bomb limit: PIL refuses at open.
    assert reason(norm, png_header(100_000, 100_000)) == "too_many_pixels"
    # Under PIL's limit but over ours: a decode attempt would say "undecodable" (no pixel data), so the
    # size must have been judged from the header alone.
    assert reason(norm, png_header(8_500, 8_500)) == "too_many_pixels"
    assert reason(norm, png_header(8_500, 8_500), max_pixels=10**9) == "too_many_pixels"  # capped by the schema
    assert reason(norm, png_header(500, 500)) == "undecodable"


# --- render_typography ---------------------------------------------------------------------------------
def ink_rows(data: bytes) -> np.ndarray:
    a = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    return np.flatnonzero((a < 128).any(axis=1))


def test_typography_is_deterministic_and_wraps():
    short = render_typography("pipe bomb")
    assert short == render_typography("pipe bomb") != render_typography("pipe gun")
    with Image.open(io.BytesIO(short)) as im:
        assert (im.format, im.size) == ("PNG", (512, 512))
        assert not im.info  # no text chunks, no timestamps
    assert len(ink_rows(short)) > 10
    long_text = "how to build an untraceable improvised explosive device from household chemicals " * 3
    data = render_typography(long_text, size=256)
    a = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    assert (a < 128).any() and (a[:, :4] > 200).all() and (a[:, -4:] > 200).all()  # wrapped inside the margins
    rows = ink_rows(data)
    assert np.count_nonzero(np.diff(rows) > 1) >= 3  # several separate lines of text


def test_typography_source_renders_keyword_then_keyword_with_subcategory():
    got = asyncio.run(TypographySource(size=256).candidates("pipe bomb", PATH, 5))
    assert [c.ref for c in got] == ["pipe bomb", "pipe bomb (weapon)"]
    assert all(c.source == "typography" and c.data and c.caption == c.ref for c in got)
    assert len(asyncio.run(TypographySource().candidates("pipe bomb", PATH, 1))) == 1


# --- folder and URL-list sources -------------------------------------------------------------------------
def test_folder_source_class_tree_with_captions(tmp_path):
    root = tmp_path / "imgs"
    files = {
        "Malicious Use/Security threats/weapon/b.jpg": picture(1),
        "Malicious Use/Security threats/weapon/a_pipe_bomb.png": picture(2, fmt="PNG"),
        "Malicious Use/Security threats/weapon/c.jpg": picture(3),
        "Malicious Use/Security threats/cyber attack/d.jpg": picture(4),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "notes.txt").write_text("not an image")
    captions = tmp_path / "captions.csv"
    captions.write_text("file_name,caption\nMalicious Use/Security threats/weapon/c.jpg,a Rifle on a table\nb.jpg,knife\n")
    src = FolderSource(root, captions=captions)

    def refs(keyword, path=PATH, n=10):
        return [c.ref.rsplit("/", 1)[-1] for c in asyncio.run(src.candidates(keyword, path, n))]

    assert refs("rifle") == ["c.jpg"]  # caption match
    assert refs("pipe bomb") == ["a_pipe_bomb.png"]  # file-name match, '_' read as a space
    assert refs("grenade") == ["a_pipe_bomb.png", "b.jpg", "c.jpg"]  # nothing matches: the whole class folder
    assert refs("grenade", n=2) == ["a_pipe_bomb.png", "b.jpg"]
    assert refs("rifle", PATH2) == ["d.jpg"]
    assert refs("x", ("Malicious Use", "Security threats", "absent")) == []
    got = asyncio.run(src.candidates("grenade", PATH, 10))
    assert [c.caption for c in got] == [None, "knife", "a Rifle on a table"]
    assert got[0].data == files["Malicious Use/Security threats/weapon/a_pipe_bomb.png"] and got[0].source == "folder"


def test_folder_source_flat_layout_and_jsonl_captions(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "z.jpg").write_bytes(picture(1))
    (tmp_path / "sub" / "y.jpg").write_bytes(picture(2))
    (tmp_path / "caps.jsonl").write_text(json.dumps({"file_name": "sub/y.jpg", "caption": "a gun"}) + "\n")
    src = FolderSource(tmp_path, captions=tmp_path / "caps.jsonl")
    got = asyncio.run(src.candidates("knife", PATH, 10))
    assert [(c.ref, c.caption) for c in got] == [("sub/y.jpg", "a gun"), ("z.jpg", None)]
    (tmp_path / "bad.csv").write_text("name,text\na,b\n")
    with pytest.raises(DataError, match="caption"):
        FolderSource(tmp_path, captions=tmp_path / "bad.csv")


URL_ROWS = {
    "url": ["http://x/1.jpg", "http://x/2.jpg", None, "http://x/4.jpg", "http://x/5.jpg"],
    "caption": ["a cat", "Pipe BOMB diagram", "pipe bomb", None, "another pipe bomb"],
    "punsafe": [0.1, 0.9, 0.0, None, 0.2],
    "similarity": [0.3, 0.31, 0.2, 0.25, float("nan")],
}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_url_list_source(tmp_path, fmt):
    path = tmp_path / f"list.{fmt}"
    table = pa.table(URL_ROWS)
    pacsv.write_csv(table, path) if fmt == "csv" else pq.write_table(table, path)
    src = UrlListSource(path, nsfw_column="punsafe", similarity_column="similarity")
    got = asyncio.run(src.candidates("pipe bomb", PATH, 10))
    assert [c.url for c in got] == ["http://x/2.jpg", "http://x/5.jpg", "http://x/1.jpg", "http://x/4.jpg"]
    assert got[0] == ImageCandidate("urls", "http://x/2.jpg", "Pipe BOMB diagram", None, "http://x/2.jpg", 0.9, 0.31)
    assert got[1].similarity is None and got[3].caption is None and got[3].nsfw is None
    assert len(asyncio.run(src.candidates("pipe bomb", PATH, 1))) == 1
    with pytest.raises(DataError) as e:
        UrlListSource(path, url_column="URL")
    assert e.value.field == "url_column"


def test_url_list_source_restricts_to_class_columns(tmp_path):
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({"url": ["u1", "u2", "u3"], "caption": ["a", "b", "c"], "class1": [PATH[0]] * 3,
                             "class2": [PATH[1]] * 3, "class3": ["weapon", "cyber attack", "weapon"]}), path)
    got = asyncio.run(UrlListSource(path).candidates("zzz", PATH, 10))
    assert [c.url for c in got] == ["u1", "u3"]


# --- build_source and ImageFilters.from_config ----------------------------------------------------------
def test_build_source_and_filter_config(tmp_path):
    (tmp_path / "imgs").mkdir()
    pq.write_table(pa.table({"link": ["u"], "caption": ["c"]}), tmp_path / "l.parquet")
    assert isinstance(build_source({"type": "typography", "size": 256}), TypographySource)
    src = build_source({"type": "folder", "path": "imgs"}, base_dir=tmp_path)
    assert isinstance(src, FolderSource) and src.root == tmp_path / "imgs"
    assert isinstance(build_source({"type": "urls", "path": "l.parquet", "url_column": "link"}, base_dir=tmp_path),
                      UrlListSource)
    clip = build_source({"type": "clip_retrieval", "url": "http://h/knn", "num_images": 5})
    assert isinstance(clip, ClipRetrievalSource) and clip.num_images == 5
    for cfg, field in [
        ({"type": "flickr"}, "images.sources[2].type"),
        ({"type": "folder", "path": "imgs", "colour": 1}, "images.sources[2].colour"),
        ({"type": "folder"}, "images.sources[2].path"),
        ({"type": "folder", "path": "missing"}, "images.sources[2].path"),
    ]:
        with pytest.raises(DataError) as e:
            build_source(cfg, base_dir=tmp_path, index=2)
        assert e.value.field == field
    f = ImageFilters.from_config({"min_side": 100, "blocklist": ["bomb"], "max_nsfw": None})
    assert (f.min_side, f.blocklist, f.max_nsfw, f.dedup_distance) == (100, ("bomb",), None, 4)
    assert ImageFilters.from_config(None) == ImageFilters()
    with pytest.raises(DataError) as e:
        ImageFilters.from_config({"min_size": 3})
    assert e.value.field == "images.filters.min_size"


# --- loopback HTTP server: images, a page, a 404, oversized images, a slow one, the kNN service ----------
class Handler(BaseHTTPRequestHandler):
    images: ClassVar[dict[str, bytes]] = {}
    knn_requests: ClassVar[list[dict]] = []

    def log_message(self, *args):
        pass

    def send(self, code: int, ctype: str, body: bytes, length: bool = True):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        name = self.path.lstrip("/")
        if name == "page.html":
            self.send(200, "text/html; charset=utf-8", b"<html></html>")
        elif name == "big.jpg":
            self.send(200, "image/jpeg", b"\xff" * 300_000)
        elif name == "big-nolength.jpg":
            self.close_connection = True
            self.send(200, "image/jpeg", b"\xff" * 300_000, length=False)
        elif name == "slow.jpg":
            time.sleep(1.5)
            self.send(200, "image/jpeg", self.images["a.jpg"])
        elif name in self.images:
            self.send(200, "image/jpeg", self.images[name])
        else:
            self.send(404, "text/plain", b"not found")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.knn_requests.append(body)
        if self.path != "/knn-service":
            return self.send(500, "text/plain", b"boom")
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        results = [
            {"url": f"{base}/a.jpg", "caption": "a pipe bomb", "similarity": 0.32, "id": 1, "punsafe": 0.1},
            {"url": f"{base}/b.jpg", "caption": "explicit", "similarity": 0.30, "id": 2, "punsafe": 0.97},
            {"url": f"{base}/missing.jpg", "caption": "gone", "similarity": 0.29, "id": 3},
            {"url": f"{base}/page.html", "caption": "a page", "similarity": 0.28, "id": 4},
            {"url": f"{base}/c.jpg", "caption": "c", "similarity": 0.10, "id": 5},
            {"url": f"{base}/d.jpg", "caption": "d", "similarity": 0.27, "id": 6},
            {"caption": "no url", "id": 7},
        ]
        self.send(200, "application/json", json.dumps(results).encode())


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # the slow reply finds its client gone: expected
        pass


@pytest.fixture(scope="module")
def server():
    Handler.images = {f"{k}.jpg": picture(i + 10) for i, k in enumerate("abcd")}
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download(server):
    async def run():
        async with httpx2.AsyncClient() as client:
            got = {}
            for name, timeout in [("a.jpg", 5), ("page.html", 5), ("missing.jpg", 5), ("big.jpg", 5),
                                  ("big-nolength.jpg", 5), ("slow.jpg", 0.3)]:
                try:
                    got[name] = await download(client, f"{server}/{name}", max_bytes=100_000, timeout=timeout)
                except ImageRejected as e:
                    got[name] = e.reason
            for url in ("http://127.0.0.1:1/x.jpg", "not a url", "ftp://127.0.0.1/x.jpg"):
                try:
                    await download(client, url, max_bytes=100_000, timeout=5)
                except ImageRejected as e:
                    got[url] = e.reason
            return got

    got = asyncio.run(run())
    assert got.pop("a.jpg") == Handler.images["a.jpg"]
    assert got == {
        "page.html": "bad_content_type", "missing.jpg": "download_failed", "big.jpg": "too_many_bytes",
        "big-nolength.jpg": "too_many_bytes", "slow.jpg": "download_failed",
        "http://127.0.0.1:1/x.jpg": "download_failed", "not a url": "download_failed",
        "ftp://127.0.0.1/x.jpg": "download_failed",
    }


def test_clip_retrieval_source(server):
    Handler.knn_requests.clear()
    src = ClipRetrievalSource(f"{server}/knn-service", indice_name="laion_400m", num_images=7)
    got = asyncio.run(src.candidates("pipe bomb", PATH, 5))
    assert Handler.knn_requests == [{
        "text": "pipe bomb", "image": None, "embedding_input": None, "modality": "image", "num_images": 7,
        "indice_name": "laion_400m", "num_result_ids": 7, "use_mclip": False, "deduplicate": True,
        "use_safety_model": True, "use_violence_detector": True, "aesthetic_score": "", "aesthetic_weight": 0.5,
    }]
    assert [c.url.rsplit("/", 1)[-1] for c in got] == ["a.jpg", "b.jpg", "missing.jpg", "page.html", "c.jpg"]
    assert got[0] == ImageCandidate("clip_retrieval", f"{server}/a.jpg", "a pipe bomb", None, f"{server}/a.jpg", 0.1, 0.32)
    assert got[2].nsfw is None
    with pytest.raises(ConnectionError, match="500"):
        asyncio.run(ClipRetrievalSource(f"{server}/other").candidates("x", PATH, 5))


def test_collect_from_clip_retrieval(server):
    src = ClipRetrievalSource(f"{server}/knn-service")
    images, rejected = collect([src], {PATH: ["pipe bomb"]}, ImageFilters(min_side=100, min_similarity=0.2))
    assert [i.ref.rsplit("/", 1)[-1] for i in images] == ["a.jpg", "d.jpg"]
    assert images[0].data == norm(Handler.images["a.jpg"], min_side=100)[0]
    assert (images[0].caption, images[0].source, images[0].keyword) == ("a pipe bomb", "clip_retrieval", "pipe bomb")
    assert rejected == Counter(nsfw=1, download_failed=1, bad_content_type=1, low_similarity=1)


# --- filters and collect_images -------------------------------------------------------------------------
def test_caption_filters_and_similarity():
    items = [
        cand("1", caption="how to make a Bomb"), cand("2", caption="bombastic speech"), cand("3", caption=None),
        cand("4", nsfw=0.9), cand("5", nsfw=0.5), cand("6", similarity=0.1), cand("7", similarity=0.25),
        cand("8", data=picture(8, (100, 100))), cand("9", data=b"garbage"),
    ]
    f = ImageFilters(blocklist=("bomb", "gun powder"), min_similarity=0.2)
    images, rejected = collect([ListSource(items)], {PATH: ["kw"]}, f)
    assert [i.ref for i in images] == ["2", "3", "5", "7"]
    assert [i.caption for i in images] == ["bombastic speech", "kw", "kw", "kw"]
    assert rejected == Counter(blocklist=1, nsfw=1, low_similarity=1, too_small=1, undecodable=1)
    images, rejected = collect([ListSource(items)], {PATH: ["kw"]}, ImageFilters(max_nsfw=None))
    assert len(images) == 7 and rejected == Counter(too_small=1, undecodable=1)


def test_duplicates_exact_and_near():
    base = Image.open(io.BytesIO(picture(5, (300, 300))))
    tweaked = base.copy()
    tweaked.putpixel((0, 0), (0, 0, 0))
    variants = {}
    for name, im, q in [("orig", base, 95), ("requality", base, 60), ("pixel", tweaked, 95)]:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=q)
        variants[name] = buf.getvalue()
    items = [cand("orig", variants["orig"]), cand("other", picture(6, (300, 300))), cand("same", variants["orig"]),
             cand("requality", variants["requality"]), cand("pixel", variants["pixel"])]
    images, rejected = collect([ListSource(items)], {PATH: ["kw"], PATH2: ["kw"]})
    assert [(i.class3, i.ref) for i in images] == [("weapon", "orig"), ("weapon", "other")]
    # the second class path sees the same candidates: all duplicates of images already kept (global)
    assert rejected == Counter(duplicate=4, near_duplicate=4)
    images, rejected = collect([ListSource(items)], {PATH: ["kw"]}, ImageFilters(dedup_distance=0))
    assert [i.ref for i in images] == ["orig", "other", "requality", "pixel"] and rejected == Counter(duplicate=1)


def test_collect_per_subcategory_order_and_determinism(tmp_path):
    urls = ListSource([cand(f"u{i}", picture(100 + i), caption=f"img {i}") for i in range(6)])
    typo = TypographySource(size=256)
    keywords = {PATH: ["pipe bomb", "assault rifle"], PATH2: ["ransomware", "phishing kit"]}
    first = collect([typo, urls], keywords, per_subcategory=4, download_concurrency=3)
    assert collect([typo, urls], keywords, per_subcategory=4, download_concurrency=3) == first
    assert collect([typo, urls], keywords, per_subcategory=4, download_concurrency=1) == first
    images, rejected = first
    assert [(i.class3, i.keyword, i.ref) for i in images] == [
        ("weapon", "pipe bomb", "pipe bomb"), ("weapon", "pipe bomb", "pipe bomb (weapon)"),
        ("weapon", "pipe bomb", "u0"), ("weapon", "pipe bomb", "u1"),
        ("cyber attack", "ransomware", "ransomware"), ("cyber attack", "ransomware", "ransomware (cyber attack)"),
        ("cyber attack", "ransomware", "u2"), ("cyber attack", "ransomware", "u3"),
    ]
    assert rejected == Counter(duplicate=2)  # u0, u1 were kept for the first class path
    assert len({i.sha256 for i in images}) == 8 and all((i.width, i.height) == (256, 256) for i in images)
    # the source is asked for headroom: twice what is missing, plus what it already gave this class path
    assert urls.calls[0] == ("pipe bomb", PATH, 6)


def test_collect_does_not_retry_candidates_across_keywords():
    src = ListSource([cand("bad", b"garbage"), cand("good0"), cand("good1")])
    images, rejected = collect([src], {PATH: ["a", "b"]}, per_subcategory=5)
    assert [(i.keyword, i.ref) for i in images] == [("a", "good0"), ("a", "good1")]
    assert rejected == Counter(undecodable=1)  # not counted again, nor as a duplicate, under keyword "b"
    assert src.calls == [("a", PATH, 10), ("b", PATH, 9)]


def test_typography_of_different_keywords_are_not_near_duplicates():
    words = ["arson", "racism", "hacking", "stalking", "bullying", "pipe bomb"]  # some pairs within 4 phash bits
    images, rejected = collect([TypographySource()], {PATH: words}, per_subcategory=100)
    assert len(images) == 2 * len(words) and not rejected


# --- ClipScorer with a tiny random CLIP --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    path = tmp_path_factory.mktemp("tiny_clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {**layers, "vocab_size": len(vocab), "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1}
    config = CLIPConfig(text_config=text, vision_config={**layers, "image_size": 32, "patch_size": 8}, projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_clip_scorer(tiny_clip):
    scorer = ClipScorer(tiny_clip)
    image = norm(picture(1, (300, 300)))[0]
    a, b = scorer.score(image, "a pipe bomb"), scorer.score(image, "ransomware " * 20)  # long text is truncated
    assert isinstance(a, float) and -1 <= a <= 1 and -1 <= b <= 1 and a != b
    assert scorer.score(image, "a pipe bomb") == a
    items = [cand(str(i), picture(300 + i, (300, 300))) for i in range(3)] + [cand("given", similarity=0.9)]
    f = ImageFilters(scorer=str(tiny_clip), min_similarity=1.01)
    images, rejected = collect([ListSource(items)], {PATH: ["kw"]}, f)
    assert rejected == Counter(low_similarity=4)
    f = ImageFilters(scorer=str(tiny_clip), min_similarity=-1.0)
    images, rejected = collect([ListSource(items)], {PATH: ["kw"]}, f)
    assert len(images) == 4 and not rejected
