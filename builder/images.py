"""Stage 1, images: gather images for each harm subcategory from sources and filter them as the paper does.

Sources (typography, a local folder, a URL list such as a LAION subset, a clip-retrieval kNN service)
are asked, keyword by keyword, for candidates. Each candidate goes through the filters (caption
blocklist, NSFW score, size and resolution, image-text similarity, exact and near-duplicates) and
comes out re-encoded as an RGB JPEG (quality 90)::

    sources = [build_source({"type": "folder", "path": "images/"}), TypographySource()]
    keywords = {("Malicious Use", "Security threats", "weapon"): ["assault rifle", "pipe bomb"]}
    images, rejected = asyncio.run(collect_images(sources, ImageFilters(), keywords, per_subcategory=10))
    images[0].class3, images[0].width, rejected["too_small"]     # ('weapon', 640, 2)

Same inputs, same images in the same order: downloads run concurrently, but results are taken in
candidate order (class path, then keyword, then source, then the source's own order).
"""

from __future__ import annotations

import asyncio
import inspect
import io
import itertools
import math
import re
import threading
from collections import Counter, deque
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import httpx2
import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont, ImageOps
from tqdm.auto import tqdm

from builder.errors import DataError
from builder.schema import MAX_IMAGE_PIXELS, image_sha256

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
TABLE_READERS = {".csv": pacsv.read_csv, ".jsonl": pajson.read_json, ".parquet": pq.read_table}
NSFW_TAGS = {"UNLIKELY": 0.0, "UNSURE": 0.5, "NSFW": 1.0}  # LAION metadata tags its NSFW column with words
USER_AGENT = "spa-vl-builder (dataset reproduction; images stage)"


class ImageRejected(Exception):
    """A candidate failed a filter; ``reason`` is the short key of the rejected counter."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class ImageCandidate:
    """What a source yields before filtering: bytes in hand, or a URL to download."""

    source: str
    ref: str
    caption: str | None = None
    data: bytes | None = None
    url: str | None = None
    nsfw: float | None = None
    similarity: float | None = None


@dataclass(frozen=True)
class CollectedImage:
    """One work unit's image, re-encoded, with its subcategory, keyword and provenance."""

    sha256: str
    data: bytes
    width: int
    height: int
    caption: str
    class1: str
    class2: str
    class3: str
    keyword: str
    source: str
    ref: str
    phash: int | None = None  # kept so that a resumed collection still drops near-duplicates of stored images


def normalize_image(data: bytes, *, max_pixels: int, max_bytes: int, min_side: int) -> tuple[bytes, int, int]:
    """Check limits from the header, decode, convert to RGB and re-encode as JPEG q90 without metadata.

    Returns (bytes, width, height); raises ImageRejected (too_many_bytes, too_many_pixels, too_small,
    undecodable). The pixel limit is capped at the dataset's own (``schema.MAX_IMAGE_PIXELS``).
    """
    if len(data) > max_bytes:
        raise ImageRejected("too_many_bytes", f"{len(data)} > {max_bytes} bytes")
    max_pixels = min(max_pixels, MAX_IMAGE_PIXELS)  # every kept image must pass the dataset's row check later
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only: no pixel is decoded before the checks
            w, h = im.size
            if w * h > max_pixels:
                raise ImageRejected("too_many_pixels", f"{w}x{h} > {max_pixels} pixels")
            if min(w, h) < min_side:
                raise ImageRejected("too_small", f"{w}x{h}: shorter side < {min_side}")
            im = ImageOps.exif_transpose(im)  # camera photos come out upright once the EXIF tag is dropped
            if im.mode.startswith("I;16") or im.mode in ("I", "F"):  # 16-bit grey: convert() would clip at 255
                im = im.convert("I").point(lambda v: v / 256).convert("L")
            if im.mode in ("RGBA", "LA", "PA", "P") and (im.mode != "P" or "transparency" in im.info):
                rgba = im.convert("RGBA")
                rgb = Image.new("RGB", rgba.size, "white")
                rgb.paste(rgba, mask=rgba.getchannel("A"))  # transparent areas become white, not black
            else:
                rgb = im.convert("RGB")
    except ImageRejected:
        raise
    except Image.DecompressionBombError as e:
        raise ImageRejected("too_many_pixels", str(e)) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes: OSError, SyntaxError, ValueError...
        raise ImageRejected("undecodable", f"{type(e).__name__}: {e}") from None
    rgb.info = {}  # no comment, EXIF or ICC profile is carried into the output
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=90)
    out = buf.getvalue()
    if len(out) > max_bytes:
        raise ImageRejected("too_many_bytes", f"re-encoded {len(out)} > {max_bytes} bytes")
    return out, rgb.width, rgb.height


def render_typography(text: str, *, size: int = 512) -> bytes:
    """MM-SafetyBench-style typography: ``text`` in black on a white square, wrapped and centred (PNG)."""
    margin = size // 16
    width = size - 2 * margin
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    for font_size in range(max(size // 6, 8), 7, -max(1, size // 128)):  # the largest font whose wrap fits
        font = ImageFont.load_default(size=font_size)
        lines = []
        for paragraph in text.split("\n"):
            line = ""
            for word in paragraph.split():
                trial = f"{line} {word}" if line else word
                if line and draw.textlength(trial, font=font) > width:
                    lines.append(line)
                    trial = word
                line = trial
            lines.append(line)
        line_height = round(font_size * 1.25)
        if len(lines) * line_height <= width and max(draw.textlength(s, font=font) for s in lines) <= width:
            break
    y = (size - len(lines) * line_height) // 2
    for line in lines:
        draw.text(((size - draw.textlength(line, font=font)) / 2, y), line, fill="black", font=font)
        y += line_height
    buf = io.BytesIO()
    img.save(buf, "PNG")  # Pillow writes no tIME or text chunks unless asked: same text, same bytes
    return buf.getvalue()


class ImageSource(Protocol):
    async def candidates(self, keyword: str, class_path: tuple[str, str, str], n: int) -> list[ImageCandidate]: ...


class TypographySource:
    """Renders the keyword, then the keyword with its subcategory; needs no network and no files."""

    def __init__(self, size: int = 512):
        self.size = size

    async def candidates(self, keyword: str, class_path: tuple[str, str, str], n: int) -> list[ImageCandidate]:
        texts = list(dict.fromkeys([keyword, f"{keyword} ({class_path[2]})"]))[:n]
        return [ImageCandidate("typography", t, caption=t, data=render_typography(t, size=self.size)) for t in texts]


class FolderSource:
    """Image files under a folder, in relative-path order.

    A folder laid out as ``<class1>/<class2>/<class3>/<file>`` (every image exactly three folders
    deep) gives each class path its own files; any other layout gives every class path all files.
    ``captions`` is a CSV, JSONL or parquet file with a ``caption`` column and a ``file_name`` (or
    ``file``, ``path``, ``image``) column holding the path relative to the folder, or the bare name.
    """

    def __init__(self, path: str | Path, captions: str | Path | None = None):
        self.root = Path(path)
        if not self.root.is_dir():
            raise DataError("image folder not found", file=str(self.root), field="path")
        self.files = sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        self.tree = bool(self.files) and all(f.count("/") == 3 for f in self.files)
        by_name: dict[str, str] = {}
        if captions is not None:
            try:
                table = TABLE_READERS[Path(captions).suffix.lower()](str(captions))
            except (KeyError, OSError, pa.ArrowException) as e:
                raise DataError(f"cannot read as .csv, .jsonl or .parquet: {e}", file=str(captions), field="captions") from None
            key = next((c for c in ("file_name", "file", "path", "image") if c in table.column_names), None)
            if key is None or "caption" not in table.column_names:
                raise DataError(f"needs columns 'file_name' and 'caption' (have: {', '.join(table.column_names)})",
                                file=str(captions), field="captions")
            by_name = {str(k): v for k, v in zip(table[key].to_pylist(), table["caption"].to_pylist()) if v}
        self.caption = {f: by_name.get(f, by_name.get(f.rsplit("/", 1)[-1])) for f in self.files}

    async def candidates(self, keyword: str, class_path: tuple[str, str, str], n: int) -> list[ImageCandidate]:
        prefix = "/".join(class_path) + "/"
        files = [f for f in self.files if f.startswith(prefix)] if self.tree else self.files

        def words(s: str) -> str:  # 'pipe_bomb-2.jpg' matches the keyword 'pipe bomb'
            return " " + re.sub(r"[\W_]+", " ", s.lower()) + " "

        kw = words(keyword).strip()
        matching = [f for f in files if kw and (kw in words(f) or kw in words(self.caption[f] or ""))]
        chosen = (matching or files)[:n]
        data = await asyncio.to_thread(lambda: [(self.root / f).read_bytes() for f in chosen])
        return [ImageCandidate("folder", f, caption=self.caption[f], data=d) for f, d in zip(chosen, data)]


class UrlListSource:
    """A CSV or parquet list of image URLs (e.g. a LAION subset); rows whose caption contains the keyword first.

    When the list has ``class1``/``class2``/``class3`` columns, only the rows of the asked class path are used.
    """

    def __init__(self, path: str | Path, url_column: str = "url", caption_column: str = "caption",
                 nsfw_column: str | None = None, similarity_column: str | None = None):
        try:
            table = TABLE_READERS[Path(path).suffix.lower()](str(path))
        except (KeyError, OSError, pa.ArrowException) as e:
            raise DataError(f"cannot read as .csv, .jsonl or .parquet: {e}", file=str(path), field="path") from None
        for field_name, column in (("url_column", url_column), ("caption_column", caption_column),
                                   ("nsfw_column", nsfw_column), ("similarity_column", similarity_column)):
            if column is not None and column not in table.column_names:
                raise DataError(f"no column {column!r} (have: {', '.join(table.column_names)})",
                                file=str(path), field=field_name)
        urls = table[url_column].cast(pa.string())
        self.table = table.filter(pc.fill_null(pc.not_equal(urls, ""), False))  # CSV writes a missing URL as ''
        self.columns = (url_column, caption_column, nsfw_column, similarity_column)

    async def candidates(self, keyword: str, class_path: tuple[str, str, str], n: int) -> list[ImageCandidate]:
        table = self.table
        if all(c in table.column_names for c in ("class1", "class2", "class3")):
            for name, label in zip(("class1", "class2", "class3"), class_path):
                table = table.filter(pc.equal(table[name], label))
        url_col, cap_col, nsfw_col, sim_col = self.columns
        captions = table[cap_col].cast(pa.string())
        match = pc.fill_null(pc.match_substring(captions, keyword, ignore_case=True), False).to_numpy(zero_copy_only=False)
        order = np.concatenate([np.flatnonzero(match), np.flatnonzero(~match)])
        rows = table.take(order[:n]).to_pylist()
        return [
            ImageCandidate(
                "urls", str(r[url_col]), caption=str(r[cap_col]) if r[cap_col] else None, url=str(r[url_col]),
                nsfw=_score(r[nsfw_col]) if nsfw_col else None,
                similarity=_score(r[sim_col]) if sim_col else None,
            )
            for r in rows
        ]


class ClipRetrievalSource:
    """Nearest images to the keyword from a clip-retrieval kNN service (``/knn-service``)."""

    def __init__(self, url: str, indice_name: str = "laion5B-L-14", num_images: int = 40, modality: str = "image",
                 timeout: float = 30):
        self.url, self.indice_name, self.num_images, self.modality = url, indice_name, num_images, modality
        self.timeout = timeout

    async def candidates(self, keyword: str, class_path: tuple[str, str, str], n: int) -> list[ImageCandidate]:
        body = {
            "text": keyword, "image": None, "embedding_input": None, "modality": self.modality,
            "num_images": self.num_images, "indice_name": self.indice_name, "num_result_ids": self.num_images,
            "use_mclip": False, "deduplicate": True, "use_safety_model": True, "use_violence_detector": True,
            "aesthetic_score": "", "aesthetic_weight": 0.5,
        }
        try:
            async with httpx2.AsyncClient(timeout=self.timeout, headers={"User-Agent": USER_AGENT}) as client:
                r = await client.post(self.url, json=body)
                r.raise_for_status()
                results = r.json()
        except (httpx2.HTTPError, httpx2.InvalidURL, ValueError) as e:
            raise ConnectionError(f"clip-retrieval {self.url}: {type(e).__name__}: {e}") from None
        if not isinstance(results, list):
            raise ConnectionError(f"clip-retrieval {self.url}: expected a JSON list, got {str(results)[:200]}")
        results = [x for x in results if isinstance(x, dict) and x.get("url")]
        return [
            ImageCandidate(
                "clip_retrieval", str(x["url"]), caption=x.get("caption") or None, url=str(x["url"]),
                nsfw=_score(x.get("punsafe", x.get("nsfw"))), similarity=_score(x.get("similarity")),
            )
            for x in results[:n]
        ]


def _score(value) -> float | None:
    """A score cell as a float: numbers, numeric strings and LAION's NSFW tags; anything else is None."""
    if isinstance(value, str):
        value = NSFW_TAGS.get(value.strip().upper(), value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x  # NaN is "no score", not a score that every comparison fails


SOURCE_TYPES = {"typography": TypographySource, "folder": FolderSource, "urls": UrlListSource,
                "clip_retrieval": ClipRetrievalSource}


def build_source(cfg: dict, *, base_dir: Path | None = None, index: int | None = None) -> ImageSource:
    """A source from one YAML entry of ``images.sources`` (``index`` locates errors in that list)."""
    where = f"images.sources[{'?' if index is None else index}]"
    if not isinstance(cfg, dict):
        raise DataError("expected a mapping with a 'type'", field=where)
    cls = SOURCE_TYPES.get(cfg.get("type")) if isinstance(cfg.get("type"), str) else None
    if cls is None:
        raise DataError(f"unknown source type {cfg.get('type')!r}; known: {', '.join(SOURCE_TYPES)}", field=f"{where}.type")
    params = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in cfg.items() if k != "type"}
    bad = [(k, "unknown") for k in kwargs if k not in params]
    bad += [(k, "missing") for k, p in params.items() if p.default is p.empty and k not in kwargs]
    if bad:
        raise DataError(f"{bad[0][1]} key of a {cfg['type']} source (keys: {', '.join(params)})", field=f"{where}.{bad[0][0]}")
    for key in ("path", "captions"):
        if kwargs.get(key) is not None and base_dir is not None:
            kwargs[key] = Path(base_dir) / kwargs[key]  # an absolute path stays as it is
    try:
        return cls(**kwargs)
    except DataError as e:
        raise DataError(e.message, file=e.file, row=e.row, field=f"{where}.{e.field}" if e.field else where) from None


async def download(client: httpx2.AsyncClient, url: str, *, max_bytes: int, timeout: float) -> bytes:
    """GET an image, streamed; raises ImageRejected (download_failed, bad_content_type, too_many_bytes)."""

    async def fetch() -> bytes:
        async with client.stream("GET", url, timeout=timeout, follow_redirects=True) as r:
            if not r.is_success:
                raise ImageRejected("download_failed", f"HTTP {r.status_code}")
            ctype = r.headers.get("content-type", "")
            if not ctype.strip().lower().startswith("image/"):
                raise ImageRejected("bad_content_type", ctype or "no Content-Type")
            length = r.headers.get("content-length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise ImageRejected("too_many_bytes", f"Content-Length {length} > {max_bytes}")
            buf = bytearray()
            async for chunk in r.aiter_bytes():
                buf += chunk
                if len(buf) > max_bytes:
                    raise ImageRejected("too_many_bytes", f"> {max_bytes} bytes")
            return bytes(buf)

    try:
        return await asyncio.wait_for(fetch(), timeout)  # httpx's timeout is per read: this also bounds a trickle
    except (httpx2.HTTPError, httpx2.InvalidURL, httpx2.StreamError, asyncio.TimeoutError) as e:
        raise ImageRejected("download_failed", f"{type(e).__name__}: {e}") from None


@dataclass
class ImageFilters:
    min_side: int = 224
    max_pixels: int = 40_000_000
    max_bytes: int = 20_000_000
    blocklist: tuple[str, ...] = ()
    max_nsfw: float | None = 0.5
    min_similarity: float | None = None
    scorer: str | None = None
    dedup_distance: int = 4

    @classmethod
    def from_config(cls, cfg: dict | None) -> ImageFilters:
        """From the ``images.filters`` mapping of the YAML config; unknown keys are errors."""
        cfg = dict(cfg or {})
        known = [f.name for f in fields(cls)]
        for key in cfg:
            if key not in known:
                raise DataError(f"unknown filter; known: {', '.join(known)}", field=f"images.filters.{key}")
        if "blocklist" in cfg:
            if isinstance(cfg["blocklist"], str) or not all(isinstance(w, str) for w in cfg["blocklist"] or ()):
                raise DataError("expected a list of words", field="images.filters.blocklist")
            cfg["blocklist"] = tuple(cfg["blocklist"] or ())
        return cls(**cfg)


class ClipScorer:
    """Cosine similarity of an image and a text with a local CLIP model folder; loads on first use."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._lock = threading.Lock()
        self._parts = None

    def score(self, image_bytes: bytes, text: str) -> float:
        import torch

        with self._lock:  # score runs in worker threads: load once
            if self._parts is None:  # transformers is heavy: imported only when a scorer is used
                from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

                self._parts = (CLIPModel.from_pretrained(self.path).eval(), CLIPTokenizer.from_pretrained(self.path),
                               CLIPImageProcessorPil.from_pretrained(self.path))
        model, tokenizer, processor = self._parts
        with Image.open(io.BytesIO(image_bytes)) as im:
            pixels = processor(images=im.convert("RGB"), return_tensors="pt")["pixel_values"]
        tokens = tokenizer([text], truncation=True, max_length=model.config.text_config.max_position_embeddings,
                           return_tensors="pt")
        with torch.no_grad():
            out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
        return float((out.text_embeds[0] * out.image_embeds[0]).sum())  # both come out L2-normalised


async def collect_images(sources: list[ImageSource], filters: ImageFilters, keywords: dict[tuple[str, str, str], list[str]],
                         *, per_subcategory: int, download_concurrency: int = 16, timeout: float = 30.0,
                         progress: bool = True, seen: tuple[set[str], list[int]] | None = None,
                         ) -> tuple[list[CollectedImage], Counter]:
    """Up to ``per_subcategory`` filtered images per class path; returns (images, rejected reason counts).

    Class paths in the dict's order; for each, keywords in order and sources in order until enough
    images pass. Filters: caption blocklist (whole words) → NSFW score → download and normalize_image
    → similarity (the source's, else the scorer's against the keyword) → exact duplicate (sha256) →
    near-duplicate (phash distance), both across all images kept so far. A candidate already tried for
    a class path (same source and ref, under an earlier keyword) is skipped without counting.
    """
    block = (re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, filters.blocklist)) + r")(?!\w)", re.IGNORECASE)
             if filters.blocklist else None)
    scorer = ClipScorer(filters.scorer) if filters.scorer and filters.min_similarity is not None else None
    images: list[CollectedImage] = []
    rejected: Counter = Counter()
    shas: set[str] = set(seen[0]) if seen else set()  # `seen`: images kept earlier (sha256s, phashes)
    hashes, n_hashes = np.zeros(1024, np.uint64), 0
    for ph in (seen[1] if seen else ()):
        if n_hashes == len(hashes):
            hashes = np.concatenate([hashes, np.zeros_like(hashes)])
        hashes[n_hashes], n_hashes = ph, n_hashes + 1
    window = max(1, download_concurrency)

    async def prepare(c: ImageCandidate, client: httpx2.AsyncClient) -> tuple[bytes, int, int, int | None]:
        if c.data is not None:
            data = c.data
        elif c.url:
            data = await download(client, c.url, max_bytes=filters.max_bytes, timeout=timeout)
        else:
            raise ImageRejected("download_failed", "candidate has neither data nor url")

        def decode() -> tuple[bytes, int, int, int | None]:
            out, w, h = normalize_image(data, max_pixels=filters.max_pixels, max_bytes=filters.max_bytes,
                                        min_side=filters.min_side)
            if c.source == "typography" or not filters.dedup_distance:  # renders of different texts sit a few bits apart
                return out, w, h, None
            with Image.open(io.BytesIO(out)) as im:
                im.draft("L", (128, 128))  # phash looks at 32x32 grey: a JPEG decoded at 1/8 scale is plenty
                return out, w, h, int(str(imagehash.phash(im)), 16)

        return await asyncio.to_thread(decode)

    async def check(c: ImageCandidate, job, keyword: str) -> tuple[str, bytes, int, int, int | None]:
        """The checks that need the image, taken in candidate order; raises ImageRejected."""
        if isinstance(job, str):
            raise ImageRejected(job)
        data, w, h, ph = await job
        sim = c.similarity
        if sim is None and scorer is not None:
            sim = await asyncio.to_thread(scorer.score, data, keyword)
        if filters.min_similarity is not None and sim is not None and sim < filters.min_similarity:
            raise ImageRejected("low_similarity", f"{sim:.3f}")
        sha = image_sha256(data)
        if sha in shas:
            raise ImageRejected("duplicate", sha)
        if ph is not None and n_hashes:
            x = hashes[:n_hashes] ^ np.uint64(ph)
            dist = int((np.bitwise_count(x) if hasattr(np, "bitwise_count")
                        else np.unpackbits(x.view(np.uint8)).reshape(-1, 64).sum(1)).min())
            if dist <= filters.dedup_distance:
                raise ImageRejected("near_duplicate", f"phash distance {dist}")
        return sha, data, w, h, ph

    bar = tqdm(total=per_subcategory * len(keywords), desc="images", unit="img", disable=not progress)
    limits = httpx2.Limits(max_connections=window)
    async with httpx2.AsyncClient(timeout=timeout, limits=limits, headers={"User-Agent": USER_AGENT}) as client:
        for class_path, kws in keywords.items():
            got, tried = 0, set()
            for keyword, (si, source) in itertools.product(kws, enumerate(sources)):
                if got >= per_subcategory:
                    break
                # headroom for rejects (dead links are common in LAION) and for refs tried under earlier keywords
                found = await source.candidates(keyword, class_path, 2 * (per_subcategory - got) + len(tried))
                todo = iter({c.ref: c for c in found if (si, c.ref) not in tried}.values())
                tried.update((si, c.ref) for c in found)
                pending: deque = deque()  # (candidate, rejection reason or prepare task), in candidate order
                try:
                    while got < per_subcategory:
                        while len(pending) < window and (c := next(todo, None)) is not None:
                            reason = ("blocklist" if block and c.caption and block.search(c.caption) else
                                      "nsfw" if filters.max_nsfw is not None and c.nsfw is not None
                                      and c.nsfw > filters.max_nsfw else None)
                            pending.append((c, reason or asyncio.create_task(prepare(c, client))))
                        if not pending:
                            break
                        c, job = pending.popleft()
                        try:
                            sha, data, w, h, ph = await check(c, job, keyword)
                        except ImageRejected as e:
                            rejected[e.reason] += 1
                            bar.set_postfix(dict(rejected), refresh=False)
                            continue
                        shas.add(sha)
                        if ph is not None:
                            if n_hashes == len(hashes):
                                hashes = np.concatenate([hashes, np.zeros_like(hashes)])
                            hashes[n_hashes] = ph
                            n_hashes += 1
                        images.append(CollectedImage(sha, data, w, h, c.caption or keyword, *class_path, keyword,
                                                     c.source, c.ref, ph))
                        got += 1
                        bar.update(1)
                finally:  # enough images, or an error: the downloads still running are not needed
                    tasks = [job for _, job in pending if isinstance(job, asyncio.Task)]
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
    bar.close()
    return images, rejected
