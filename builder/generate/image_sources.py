"""Image sources of the images stage: where candidates for a subcategory come from.

Four kinds, each built from one entry of the config's ``images.sources`` (:func:`source_config` checks
an entry when the config is read; :func:`build_source` builds it):

- ``typography``: renders the keyword (MM-SafetyBench style); no network, no files;
- ``folder``: image files under a folder, optionally laid out ``class1/class2/class3/<file>``;
- ``urls``: a CSV/JSONL/parquet list of image URLs, such as a LAION subset;
- ``clip_retrieval``: the nearest images to the keyword from a clip-retrieval kNN service.

Example::

    source = build_source({"type": "folder", "path": "images/"}, base_dir=Path("."))
    candidates = asyncio.run(source.candidates("pipe bomb", ("Malicious Use", "Security threats", "weapon"), 10))
"""

from __future__ import annotations

import asyncio
import inspect
import io
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from builder.config_fields import check_value
from builder.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
TABLE_READERS = {".csv": pacsv.read_csv, ".jsonl": pajson.read_json, ".parquet": pq.read_table}
NSFW_TAGS = {"UNLIKELY": 0.0, "UNSURE": 0.5, "NSFW": 1.0}  # LAION metadata tags its NSFW column with words
USER_AGENT = "spa-vl-builder (dataset reproduction; images stage)"


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


def source_config(cfg, *, base_dir: Path | None = None, index: int | None = None, file: str | None = None) -> dict:
    """One YAML entry of ``images.sources`` checked without building it: a known ``type``, the keys its class
    takes with the types they take (numbers above 0), and files that exist; relative paths resolved against
    ``base_dir``. ``index`` locates errors in the list. Returns the entry with its paths resolved."""
    where = f"images.sources[{'?' if index is None else index}]"
    if not isinstance(cfg, dict):
        raise DataError("expected a mapping with a 'type'", file=file, field=where)
    cls = SOURCE_TYPES.get(cfg.get("type")) if isinstance(cfg.get("type"), str) else None
    if cls is None:
        raise DataError(f"unknown source type {cfg.get('type')!r}; known: {', '.join(SOURCE_TYPES)}", file=file,
                        field=f"{where}.type")
    params = inspect.signature(cls).parameters
    hints = typing.get_type_hints(cls.__init__)
    kwargs = {k: v for k, v in cfg.items() if k != "type"}
    bad = [(k, "unknown") for k in kwargs if k not in params]
    bad += [(k, "missing") for k, p in params.items() if p.default is p.empty and k not in kwargs]
    if bad:
        raise DataError(f"{bad[0][1]} key of a {cfg['type']} source (keys: {', '.join(params)})", file=file,
                        field=f"{where}.{bad[0][0]}")
    for key, value in kwargs.items():
        numeric = hints[key] in (int, float)
        check_value(value, hints[key], field=f"{where}.{key}", file=file, rules={"gt": 0} if numeric else None)
    for key in ("path", "captions"):
        if kwargs.get(key) is not None:
            kwargs[key] = str(Path(base_dir or ".") / kwargs[key])  # an absolute path stays as it is
            wanted = Path.is_dir if (cls is FolderSource and key == "path") else Path.is_file
            if not wanted(Path(kwargs[key])):
                what = "folder" if wanted is Path.is_dir else "file"
                raise DataError(f"no such {what} {kwargs[key]!r}", file=file, field=f"{where}.{key}")
    return {"type": cfg["type"], **kwargs}


def build_source(cfg: dict, *, base_dir: Path | None = None, index: int | None = None) -> ImageSource:
    """A source from one YAML entry of ``images.sources`` (see :func:`source_config`)."""
    where = f"images.sources[{'?' if index is None else index}]"
    checked = source_config(cfg, base_dir=base_dir, index=index)
    try:
        return SOURCE_TYPES[checked.pop("type")](**checked)
    except DataError as e:
        raise DataError(e.message, file=e.file, row=e.row, field=f"{where}.{e.field}" if e.field else where) from None
