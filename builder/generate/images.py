"""Stage 1, images: gather images for each harm subcategory from sources and filter them as the paper does.

Sources (:mod:`builder.generate.image_sources`: typography, a local folder, a URL list such as a LAION subset, a
clip-retrieval kNN service) are asked, keyword by keyword, for candidates. Each candidate goes through the filters (caption
blocklist, NSFW score, size and resolution, image-text similarity, exact and near-duplicates) and
comes out re-encoded as an RGB JPEG (quality 90)::

    from builder.generate.image_sources import TypographySource, build_source

    sources = [build_source({"type": "folder", "path": "images/"}), TypographySource()]
    keywords = {("Malicious Use", "Security threats", "weapon"): ["assault rifle", "pipe bomb"]}
    images, rejected = asyncio.run(collect_images(sources, ImageFilters(), keywords, per_subcategory=10))
    images[0].class3, images[0].width, rejected["too_small"]     # ('weapon', 640, 2)

Same inputs, same images in the same order: downloads run concurrently, but results are taken in
candidate order (class path, then keyword, then source, then the source's own order).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import itertools
import re
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import imagehash
import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from builder.config_fields import typed_section
from builder.format.schema import MAX_IMAGE_PIXELS, image_sha256
from builder.generate.image_sources import USER_AGENT, ImageCandidate, ImageSource


class ImageRejected(Exception):
    """A candidate failed a filter; ``reason`` is the short key of the rejected counter."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


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


@dataclass(frozen=True)
class ImageFilters:
    min_side: int = field(default=224, metadata={"min": 0})
    max_pixels: int = field(default=40_000_000, metadata={"min": 1})
    max_bytes: int = field(default=20_000_000, metadata={"min": 1})
    blocklist: tuple[str, ...] = ()
    max_nsfw: float | None = field(default=0.5, metadata={"min": 0, "max": 1})
    min_similarity: float | None = None
    scorer: str | None = None  # a local CLIP model folder (or Hub id) that scores image-text similarity
    dedup_distance: int = field(default=4, metadata={"min": 0})

    @classmethod
    def from_config(cls, cfg: dict | None, *, file: str | None = None, base_dir: Path | None = None) -> ImageFilters:
        """From the ``images.filters`` mapping of the YAML config: unknown keys, wrong types and ranges are
        errors. A relative ``scorer`` that exists next to the config (``base_dir``) is taken from there."""
        filters = typed_section(cls, cfg, file=file, where="images.filters")
        blocklist = tuple(filters.blocklist)
        scorer = filters.scorer
        if scorer is not None and base_dir is not None and (Path(base_dir) / scorer).exists():
            scorer = str(Path(base_dir) / scorer)
        return dataclasses.replace(filters, blocklist=blocklist, scorer=scorer)


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


class KeptImages:
    """The images kept so far, by sha256 and perceptual hash: one that repeats a kept image exactly, or within
    ``distance`` bits of its phash, is a duplicate."""

    def __init__(self, distance: int, seen: tuple[set[str], list[int]] | None = None):
        self.distance = distance
        self.shas: set[str] = set(seen[0]) if seen else set()  # `seen`: images kept earlier (sha256s, phashes)
        self._hashes, self._n = np.zeros(1024, np.uint64), 0
        for ph in (seen[1] if seen else ()):
            self._add_hash(ph)

    def _add_hash(self, ph: int) -> None:
        if self._n == len(self._hashes):
            self._hashes = np.concatenate([self._hashes, np.zeros_like(self._hashes)])
        self._hashes[self._n], self._n = ph, self._n + 1

    def check(self, sha: str, ph: int | None) -> None:
        """Raises ImageRejected (duplicate, near_duplicate) when the image repeats a kept one."""
        if sha in self.shas:
            raise ImageRejected("duplicate", sha)
        if ph is not None and self._n:
            x = self._hashes[:self._n] ^ np.uint64(ph)
            dist = int((np.bitwise_count(x) if hasattr(np, "bitwise_count")
                        else np.unpackbits(x.view(np.uint8)).reshape(-1, 64).sum(1)).min())
            if dist <= self.distance:
                raise ImageRejected("near_duplicate", f"phash distance {dist}")

    def add(self, sha: str, ph: int | None) -> None:
        self.shas.add(sha)
        if ph is not None:
            self._add_hash(ph)


class CandidateScreen:
    """The images stage's filters, in order, each rejection counted by its reason (``rejected``): caption
    blocklist (whole words) and NSFW score before any download; then download and :func:`normalize_image`,
    similarity (the source's, else the scorer's against the keyword), exact and near duplicates of every
    image kept so far (:class:`KeptImages`)."""

    def __init__(self, filters: ImageFilters, *, timeout: float, window: int,
                 seen: tuple[set[str], list[int]] | None = None):
        self.filters, self.timeout, self.window = filters, timeout, max(1, window)
        self.block = (re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, filters.blocklist)) + r")(?!\w)", re.IGNORECASE)
                      if filters.blocklist else None)
        self.scorer = ClipScorer(filters.scorer) if filters.scorer and filters.min_similarity is not None else None
        self.kept = KeptImages(filters.dedup_distance, seen)
        self.rejected: Counter = Counter()

    def _early_reason(self, c: ImageCandidate) -> str | None:
        """Why a candidate is rejected from its metadata alone (no download), or None."""
        if self.block and c.caption and self.block.search(c.caption):
            return "blocklist"
        if self.filters.max_nsfw is not None and c.nsfw is not None and c.nsfw > self.filters.max_nsfw:
            return "nsfw"
        return None

    async def _prepare(self, c: ImageCandidate, client: httpx2.AsyncClient) -> tuple[bytes, int, int, int | None]:
        f = self.filters
        if c.data is not None:
            data = c.data
        elif c.url:
            data = await download(client, c.url, max_bytes=f.max_bytes, timeout=self.timeout)
        else:
            raise ImageRejected("download_failed", "candidate has neither data nor url")

        def decode() -> tuple[bytes, int, int, int | None]:
            out, w, h = normalize_image(data, max_pixels=f.max_pixels, max_bytes=f.max_bytes, min_side=f.min_side)
            if c.source == "typography" or not f.dedup_distance:  # renders of different texts sit a few bits apart
                return out, w, h, None
            with Image.open(io.BytesIO(out)) as im:
                im.draft("L", (128, 128))  # phash looks at 32x32 grey: a JPEG decoded at 1/8 scale is plenty
                return out, w, h, int(str(imagehash.phash(im)), 16)

        return await asyncio.to_thread(decode)

    async def _check(self, c: ImageCandidate, job, keyword: str) -> tuple[str, bytes, int, int, int | None]:
        """The checks that need the image, taken in candidate order; raises ImageRejected."""
        if isinstance(job, str):
            raise ImageRejected(job)
        data, w, h, ph = await job
        sim = c.similarity
        if sim is None and self.scorer is not None:
            sim = await asyncio.to_thread(self.scorer.score, data, keyword)
        if self.filters.min_similarity is not None and sim is not None and sim < self.filters.min_similarity:
            raise ImageRejected("low_similarity", f"{sim:.3f}")
        sha = image_sha256(data)
        self.kept.check(sha, ph)
        return sha, data, w, h, ph

    async def take(self, candidates: list[ImageCandidate], keyword: str, class_path: tuple[str, str, str],
                   client: httpx2.AsyncClient, wanted: int, bar) -> list[CollectedImage]:
        """Up to ``wanted`` candidates that pass every filter, in candidate order; at most ``window`` downloads
        run ahead of the one being checked."""
        todo, pending, kept = iter(candidates), deque(), []  # pending: (candidate, rejection reason or prepare task)
        try:
            while len(kept) < wanted:
                while len(pending) < self.window and (c := next(todo, None)) is not None:
                    pending.append((c, self._early_reason(c) or asyncio.create_task(self._prepare(c, client))))
                if not pending:
                    break
                c, job = pending.popleft()
                try:
                    sha, data, w, h, ph = await self._check(c, job, keyword)
                except ImageRejected as e:
                    self.rejected[e.reason] += 1
                    bar.set_postfix(dict(self.rejected), refresh=False)
                    continue
                self.kept.add(sha, ph)
                kept.append(CollectedImage(sha, data, w, h, c.caption or keyword, *class_path, keyword, c.source, c.ref,
                                           ph))
                bar.update(1)
        finally:  # enough images, or an error: the downloads still running are not needed
            tasks = [job for _, job in pending if isinstance(job, asyncio.Task)]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return kept


async def collect_images(sources: list[ImageSource], filters: ImageFilters, keywords: dict[tuple[str, str, str], list[str]],
                         *, per_subcategory: int, download_concurrency: int = 16, timeout: float = 30.0,
                         progress: bool = True, seen: tuple[set[str], list[int]] | None = None,
                         ) -> tuple[list[CollectedImage], Counter]:
    """Up to ``per_subcategory`` filtered images per class path; returns (images, rejected reason counts).

    Class paths in the dict's order; for each, keywords in order and sources in order until enough
    images pass :class:`CandidateScreen`'s filters, duplicates checked across all images kept so far
    (and ``seen``: the sha256s and phashes of images kept earlier). A candidate already tried for a
    class path (same source and ref, under an earlier keyword) is skipped without counting.
    """
    screen = CandidateScreen(filters, timeout=timeout, window=download_concurrency, seen=seen)
    images: list[CollectedImage] = []
    bar = tqdm(total=per_subcategory * len(keywords), desc="images", unit="img", disable=not progress)
    limits = httpx2.Limits(max_connections=screen.window)
    async with httpx2.AsyncClient(timeout=timeout, limits=limits, headers={"User-Agent": USER_AGENT}) as client:
        for class_path, kws in keywords.items():
            got, tried = 0, set()
            for keyword, (si, source) in itertools.product(kws, enumerate(sources)):
                if got >= per_subcategory:
                    break
                # headroom for rejects (dead links are common in LAION) and for refs tried under earlier keywords
                found = await source.candidates(keyword, class_path, 2 * (per_subcategory - got) + len(tried))
                fresh = list({c.ref: c for c in found if (si, c.ref) not in tried}.values())
                tried.update((si, c.ref) for c in found)
                kept = await screen.take(fresh, keyword, class_path, client, per_subcategory - got, bar)
                images += kept
                got += len(kept)
    bar.close()
    return images, screen.rejected
