"""The run config: one YAML file drives a pipeline run (taxonomy, images, prompts, models, judge, limits, prices, seed).

Example::

    cfg = PipelineConfig.load("pipeline")          # a shipped recipe by name, or a path to your own file
    cfg.models["gpt-4o"].price, cfg.responses.bag, cfg.judge.model, cfg.prompt("judge")

The whole file is checked when it is read, before any request: unknown keys, a section of the wrong
shape, every number's type and range, models that are referenced but not defined, a model bag of
fewer than two entries, request parameters a model does not take, a ``prompts:`` folder that does not
exist and prompt files with placeholders the stage does not fill are DataErrors that name the file and
the field. Relative paths resolve against the config file's folder. ``${NAME}``, ``${NAME:-default}``
and ``${NAME:?what to set}`` in strings read the environment (:func:`builder.settings.expand_env`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import string
from dataclasses import dataclass, field
from pathlib import Path

from builder.config_fields import check_mapping, check_value, typed_section
from builder.errors import DataError
from builder.format.manifest import parse_version
from builder.generate.image_sources import source_config
from builder.generate.images import ImageFilters
from builder.generate.model_spec import ModelSpec, check_params
from builder.settings import expand_env, load_mapping
from builder.shipped import PROMPTS, resolve_config
from builder.taxonomy import Taxonomy

LABELS = {"class1", "class2", "class3"}
# Each prompt's str.format fields: what the stage fills in (any of them), and what the prompt must use.
PROMPT_FIELDS = {
    "keywords": (LABELS | {"n"}, set()),
    "description": (LABELS | {"caption"}, set()),
    "easy": (LABELS | {"caption"}, set()),
    "hardq": (LABELS | {"caption", "description", "easy"}, set()),
    "hards": (LABELS | {"caption", "description", "easy"}, set()),
    "judge": ({"question", "answer_a", "answer_b"}, {"question", "answer_a", "answer_b"}),
    "safety": ({"text"}, {"text"}),
}
PROMPT_NAMES = tuple(PROMPT_FIELDS)

DEFAULTS: dict = {
    "seed": 0,
    "taxonomy": None,
    "prompts": None,
    "models": {},
    "keywords": {"model": None, "per_subcategory": 3, "params": {"temperature": 0.0, "max_tokens": 200}},
    "images": {"per_subcategory": 2, "download_concurrency": 16, "timeout": 30.0,
               "sources": [{"type": "typography"}], "filters": {}},
    "questions": {"describer": None, "easy": None, "hard": None, "params": {"temperature": 0.7, "max_tokens": 300}},
    "responses": {"bag": [], "params": {"temperature": 0.7, "max_tokens": 512}},
    "judge": {"model": None, "agreement": "strict", "params": {"temperature": 0.0, "max_tokens": 200}},
    "safety": {"model": None, "params": {"temperature": 0.0, "max_tokens": 20}},
    "build": {"validation_fraction": 0.07, "test_fraction": 0.005, "version": "0.1.0", "title": "SPA-VL (generated)"},
    "run": {"units_in_flight": 64, "ray_workers": None},
}


# --- the sections (DEFAULTS holds their default values; these hold the types and ranges) ------------------
@dataclass(frozen=True)
class KeywordsSection:
    model: str | None
    per_subcategory: int = field(metadata={"min": 1})
    params: dict


@dataclass(frozen=True)
class ImagesSection:
    per_subcategory: int = field(metadata={"min": 1})
    download_concurrency: int = field(metadata={"min": 1})
    timeout: float = field(metadata={"gt": 0})
    sources: tuple[dict, ...]  # each checked by builder.generate.images.source_config, paths resolved
    filters: ImageFilters


@dataclass(frozen=True)
class QuestionsSection:
    describer: str | None
    easy: str | None
    hard: str | None
    params: dict


@dataclass(frozen=True)
class ResponsesSection:
    bag: list[str]
    params: dict


@dataclass(frozen=True)
class JudgeSection:
    model: str | None
    agreement: str = field(metadata={"choices": ("strict", "average")})
    params: dict


@dataclass(frozen=True)
class SafetySection:
    model: str | None
    params: dict


@dataclass(frozen=True)
class BuildSection:
    validation_fraction: float = field(metadata={"min": 0, "lt": 1})
    test_fraction: float = field(metadata={"min": 0, "lt": 1})
    version: str
    title: str

    @classmethod
    def from_dict(cls, data, *, file: str | None = None) -> "BuildSection":
        section = typed_section(cls, data, file=file, where="build")
        try:
            parse_version(section.version)
        except DataError as e:
            raise DataError(e.message, file=file, field="build.version") from None
        return section


@dataclass(frozen=True)
class RunSection:
    units_in_flight: int = field(metadata={"min": 1})
    ray_workers: int | None = field(metadata={"min": 1})


def _merge(base: dict, over: dict, where: str, file: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in check_mapping(over, field=where.rstrip(".") or None, file=file).items():
        if key not in base:
            raise DataError(f"unknown key; expected one of {sorted(base)}", file=file, field=f"{where}{key}")
        if isinstance(base[key], dict) and base[key] and key not in ("filters", "params"):
            out[key] = _merge(base[key], value, f"{where}{key}.", file)  # a section given as a list is an error here
        else:
            out[key] = value
    return out


def _read_prompts(folder: str | None, base_dir: Path, file: str) -> dict[str, str]:
    """The prompts: the shipped files, replaced by name by those of the config's own ``prompts:`` folder."""
    own = None
    if folder is not None:
        own = base_dir / check_value(folder, str, field="prompts", file=file)
        if not own.is_dir():
            raise DataError(f"no such folder {str(own)!r} (a folder of prompt files named like {PROMPTS}/*.txt)",
                            file=file, field="prompts")
        for extra in sorted(p.name for p in own.glob("*.txt") if p.stem not in PROMPT_FIELDS):
            raise DataError(f"not a prompt name; the prompts are {', '.join(f'{n}.txt' for n in PROMPT_NAMES)}",
                            file=str(own / extra))
    prompts = {}
    for name, (allowed, required) in PROMPT_FIELDS.items():
        path = own / f"{name}.txt" if own is not None and (own / f"{name}.txt").is_file() else PROMPTS / f"{name}.txt"
        text = path.read_text(encoding="utf-8")
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
        except ValueError as e:
            raise DataError(f"not a str.format template: {e} (write a literal brace as {{{{ or }}}})", file=str(path)) from None
        if used - allowed or required - used:
            bad = sorted(used - allowed)
            why = (f"unknown placeholder {{{bad[0]}}}" if bad else f"missing placeholder {{{sorted(required - used)[0]}}}")
            raise DataError(f"{why}; this prompt is filled with {', '.join(f'{{{f}}}' for f in sorted(allowed))}",
                            file=str(path))
        prompts[name] = text
    return prompts


@dataclass
class PipelineConfig:
    file: str
    base_dir: Path
    seed: int
    taxonomy: Taxonomy
    models: dict[str, ModelSpec]
    prompts: dict[str, str]
    keywords: KeywordsSection
    images: ImagesSection
    questions: QuestionsSection
    responses: ResponsesSection
    judge: JudgeSection
    safety: SafetySection
    build: BuildSection
    run: RunSection
    raw: dict                        # the merged YAML, environment expanded: what the fingerprints hash
    unexpanded: dict | None = None   # as written (`${VAR}` kept): what the run directory keeps

    @classmethod
    def load(cls, path: str | Path, **overrides) -> "PipelineConfig":
        """Read a run config (a path, or the name of a shipped one); ``overrides`` replace top-level keys."""
        path = resolve_config(path)
        data = load_mapping(path, what="the config")
        data.update(overrides)
        try:
            expanded = expand_env(data)
        except DataError as e:
            raise e.located(file=str(path)) from None
        cfg = cls.from_dict(expanded, base_dir=path.parent, file=str(path))
        cfg.unexpanded = data  # `${VAR}` unexpanded, so no secret reaches the run directory
        return cfg

    @classmethod
    def from_dict(cls, data: dict, *, base_dir: Path, file: str = "<config>") -> "PipelineConfig":
        raw = _merge(DEFAULTS, data, "", file)
        base_dir = Path(base_dir).resolve()
        models = {}
        for name, entry in check_mapping(raw["models"], field="models", file=file).items():
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                entry = {**entry, "path": str((base_dir / entry["path"]).resolve())}
            models[name] = ModelSpec.from_config(name, entry, file=file)
        taxonomy = check_value(raw["taxonomy"], str | None, field="taxonomy", file=file)
        images = check_mapping(raw["images"], field="images", file=file)
        sources = check_value(images.get("sources"), list[dict], field="images.sources", file=file)
        if not sources:
            raise DataError("at least one image source is required", file=file, field="images.sources")
        section = functools.partial(typed_section, file=file)
        cfg = cls(
            file=file, base_dir=base_dir, raw=raw, models=models,
            seed=check_value(raw["seed"], int, field="seed", file=file),
            taxonomy=Taxonomy.load(taxonomy and str(base_dir / taxonomy)),
            prompts=_read_prompts(raw["prompts"], base_dir, file),
            keywords=section(KeywordsSection, raw["keywords"], where="keywords"),
            images=section(ImagesSection, {k: v for k, v in images.items() if k not in ("sources", "filters")},
                           where="images", given={
                               "sources": tuple(source_config(s, base_dir=base_dir, index=i, file=file)
                                                for i, s in enumerate(sources)),
                               "filters": ImageFilters.from_config(images.get("filters"), file=file, base_dir=base_dir)}),
            questions=section(QuestionsSection, raw["questions"], where="questions"),
            responses=section(ResponsesSection, raw["responses"], where="responses"),
            judge=section(JudgeSection, raw["judge"], where="judge"),
            safety=section(SafetySection, raw["safety"], where="safety"),
            build=BuildSection.from_dict(raw["build"], file=file),
            run=section(RunSection, raw["run"], where="run"),
        )
        cfg._check_models()
        return cfg

    def roles(self) -> dict[str, str | None]:
        """Where each model is named ("judge.model", "responses.bag[0]", …) → the entry named there."""
        refs = {"keywords.model": self.keywords.model, "judge.model": self.judge.model, "safety.model": self.safety.model}
        refs.update({f"questions.{k}": getattr(self.questions, k) for k in ("describer", "easy", "hard")})
        refs.update({f"responses.bag[{i}]": m for i, m in enumerate(self.responses.bag)})
        return refs

    def used_models(self) -> list[str]:
        """The entries this run sends requests to (entries defined but never named are not checked further)."""
        return sorted({m for m in self.roles().values() if m is not None})

    def _check_models(self) -> None:
        refs = self.roles()
        for where, name in refs.items():
            if name is not None and name not in self.models:
                raise DataError(f"model {name!r} is not defined under `models:` ({sorted(self.models)})",
                                file=self.file, field=where)
        for where in ("questions.describer", "questions.easy", "questions.hard", "judge.model"):
            if refs[where] is None:
                raise DataError("a model is required here", file=self.file, field=where)
        if len(set(self.responses.bag)) < 2:
            raise DataError("the model bag needs at least two distinct models (two answers per question)",
                            file=self.file, field="responses.bag")
        for section, params in (("keywords", self.keywords.params), ("questions", self.questions.params),
                                ("responses", self.responses.params), ("judge", self.judge.params),
                                ("safety", self.safety.params)):
            check_params(params, None, field=f"{section}.params", file=self.file)  # types, even when unused
            for where, name in refs.items():
                if where.startswith(section) and name is not None:  # the section's params go to each of its models
                    check_params(params, self.models[name].backend, field=f"{section}.params", file=self.file)
        for name in self.used_models():
            spec = self.models[name]
            if spec.backend == "transformers" and not Path(spec.path).is_dir():
                raise DataError(f"no such model folder {spec.path!r} (relative paths start at the config file's "
                                "folder; `spa-vl configs copy` puts a shipped config where you can edit it)",
                                file=self.file, field=f"models.{name}.path")

    def prompt(self, name: str) -> str:
        return self.prompts[name]

    def snapshot(self) -> dict:
        """What the run directory keeps: the merged config as written (`${VAR}` unexpanded, key names only)."""
        return {**_merge(DEFAULTS, self.unexpanded or self.raw, "", self.file), "taxonomy": self.taxonomy.source,
                "config_file": self.file, "units_fingerprint": self.units_fingerprint}

    @functools.cached_property
    def units_fingerprint(self) -> str:
        """What a unit record's content depends on (not limits or prices): build skips records made otherwise."""
        models = {n: [s.backend, s.model, s.path, s.params, s.system] for n, s in sorted(self.models.items())}
        blob = json.dumps([self.seed, models, *(self.raw[k] for k in ("questions", "responses", "judge", "safety")),
                           sorted((k, v) for k, v in self.prompts.items() if k != "keywords")], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def fingerprint(self, *sections: str, prompts: tuple[str, ...] | None = None) -> str:
        """Hash of the named sections (all when none) and prompts (all when None): what stored output depends on."""
        keys = sections or tuple(sorted(self.raw))
        blob = {k: self.raw[k] for k in keys}
        blob["taxonomy_sha"] = self.taxonomy.sha256
        blob["prompts"] = {k: hashlib.sha256(v.encode()).hexdigest() for k, v in sorted(self.prompts.items())
                           if prompts is None or k in prompts}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunSnapshot:
    """``RUN_DIR/config.yaml`` read back (what :meth:`PipelineConfig.snapshot` wrote): the parts a build and a
    review of the run use, checked once when read::

        snap = RunSnapshot.read("runs/r1")
        snap.responses.bag, snap.judge.model, snap.build.test_fraction, snap.units_fingerprint
    """

    file: str
    seed: int
    taxonomy: str | None           # the taxonomy file the run used (None: the shipped one)
    units_fingerprint: str | None  # what the records of this config carry (PipelineConfig.units_fingerprint)
    responses: ResponsesSection
    judge: JudgeSection
    safety: SafetySection
    build: BuildSection

    @classmethod
    def read(cls, run_dir: str | Path) -> "RunSnapshot":
        """A DataError naming the file when it is not readable YAML or not a config `spa-vl generate` wrote."""
        file = str(Path(run_dir) / "config.yaml")
        try:
            data = load_mapping(file, what="a run config")
        except DataError as e:
            if "must be a YAML mapping" not in e.message:
                raise
            data = {}
        missing = [name for name in ("build", "responses", "judge") if not isinstance(data.get(name), dict)]
        if missing:
            raise DataError(f"not a run config written by `spa-vl generate` (no {missing[0]} section)", file=file)

        def section(kind, name: str):  # the defaults fill in what an older snapshot did not write
            return typed_section(kind, {**DEFAULTS[name], **check_mapping(data.get(name), field=name, file=file)},
                                 file=file, where=name)

        return cls(file=file, seed=check_value(data.get("seed", DEFAULTS["seed"]), int, field="seed", file=file),
                   taxonomy=check_value(data.get("taxonomy"), str | None, field="taxonomy", file=file),
                   units_fingerprint=check_value(data.get("units_fingerprint"), str | None, field="units_fingerprint",
                                                 file=file),
                   responses=section(ResponsesSection, "responses"), judge=section(JudgeSection, "judge"),
                   safety=section(SafetySection, "safety"),
                   build=BuildSection.from_dict({**DEFAULTS["build"], **data["build"]}, file=file))
