"""The run config: one YAML file drives a pipeline run (taxonomy, images, prompts, models, judge, limits, prices, seed).

Example::

    cfg = PipelineConfig.load("builder/configs/pipeline.yaml")
    cfg.models["gpt-4o"].price, cfg.responses["bag"], cfg.prompt("judge")

Unknown keys, models that are referenced but not defined and a model bag of fewer than two entries
are errors that name the file and the field. Relative paths resolve against the config file's folder.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from builder.errors import DataError
from builder.llm import ModelSpec
from builder.taxonomy import Taxonomy

SHIPPED = Path(__file__).parent / "configs"
PROMPTS = Path(__file__).parent / "prompts"
PROMPT_NAMES = ("keywords", "description", "easy", "hardq", "hards", "judge", "safety")

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


_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _expand(value):
    """``${NAME}`` and ``${NAME:-default}`` in strings, so one shipped file serves any endpoint unedited."""
    if isinstance(value, str):
        return _ENV.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def _merge(base: dict, over: dict, where: str, file: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in base:
            raise DataError(f"unknown key; expected one of {sorted(base)}", file=file, field=f"{where}{key}")
        if isinstance(base[key], dict) and base[key] and isinstance(value, dict) and key not in ("filters", "params"):
            out[key] = _merge(base[key], value, f"{where}{key}.", file)
        else:
            out[key] = value
    return out


@dataclass
class PipelineConfig:
    raw: dict
    base_dir: Path
    file: str
    taxonomy: Taxonomy
    models: dict[str, ModelSpec]
    prompts: dict[str, str] = field(default_factory=dict)
    unexpanded: dict | None = None

    @classmethod
    def load(cls, path: str | Path, **overrides) -> "PipelineConfig":
        """Read a run config; ``overrides`` replace top-level keys (tests and the CLI use them)."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise DataError("config file not found", file=str(path)) from None
        except yaml.YAMLError as e:
            raise DataError(f"not valid YAML: {e}", file=str(path)) from None
        if not isinstance(data, dict):
            raise DataError("the config must be a YAML mapping", file=str(path))
        data.update(overrides)
        cfg = cls.from_dict(_expand(data), base_dir=path.parent, file=str(path))
        cfg.unexpanded = data  # what the run directory keeps: `${VAR}` unexpanded, so no secret reaches disk
        return cfg

    @classmethod
    def from_dict(cls, data: dict, *, base_dir: Path, file: str = "<config>") -> "PipelineConfig":
        raw = _merge(DEFAULTS, data, "", file)
        base_dir = Path(base_dir).resolve()
        models = {}
        for name, entry in (raw["models"] or {}).items():
            if isinstance(entry, dict) and entry.get("path"):
                entry = {**entry, "path": str((base_dir / entry["path"]).resolve())}
            try:
                models[name] = ModelSpec.from_config(str(name), entry)
            except (DataError, TypeError) as e:
                raise DataError(str(getattr(e, "message", e)), file=file, field=getattr(e, "field", f"models.{name}")) from None
        tax_path = raw["taxonomy"] and str(base_dir / raw["taxonomy"])
        cfg = cls(raw=raw, base_dir=base_dir, file=file, taxonomy=Taxonomy.load(tax_path), models=models)
        cfg._check_models()
        prompt_dir = Path(base_dir / raw["prompts"]) if raw["prompts"] else None
        for name in PROMPT_NAMES:
            own = prompt_dir / f"{name}.txt" if prompt_dir else None
            cfg.prompts[name] = (own if own and own.exists() else PROMPTS / f"{name}.txt").read_text()
        return cfg

    def _check_models(self) -> None:
        refs = {"keywords.model": self.raw["keywords"]["model"], "judge.model": self.raw["judge"]["model"],
                "safety.model": self.raw["safety"]["model"]}
        refs.update({f"questions.{k}": self.raw["questions"][k] for k in ("describer", "easy", "hard")})
        bag = self.raw["responses"]["bag"] or []
        refs.update({f"responses.bag[{i}]": m for i, m in enumerate(bag)})
        for where, name in refs.items():
            if name is not None and name not in self.models:
                raise DataError(f"model {name!r} is not defined under `models:` ({sorted(self.models)})",
                                file=self.file, field=where)
        for where in ("questions.describer", "questions.easy", "questions.hard", "judge.model"):
            if refs[where] is None:
                raise DataError("a model is required here", file=self.file, field=where)
        if len(set(bag)) < 2:
            raise DataError("the model bag needs at least two distinct models (two answers per question)",
                            file=self.file, field="responses.bag")
        if self.raw["judge"]["agreement"] not in ("strict", "average"):
            raise DataError("must be strict (both orders must agree) or average (local judges: mean probability "
                            "over both orders)", file=self.file, field="judge.agreement")
        for key in ("validation_fraction", "test_fraction"):
            if not isinstance(self.raw["build"][key], (int, float)) or not 0 <= self.raw["build"][key] < 1:
                raise DataError("must be a number in [0, 1)", file=self.file, field=f"build.{key}")

    def __getattr__(self, name):  # cfg.images, cfg.judge … read the merged YAML sections
        raw = self.__dict__.get("raw")
        if raw is not None and name in raw:
            return raw[name]
        raise AttributeError(name)

    def prompt(self, name: str) -> str:
        return self.prompts[name]

    @property
    def seed(self) -> int:
        return int(self.raw["seed"])

    @functools.cached_property
    def units_fingerprint(self) -> str:
        """What a unit record's content depends on (not limits or prices): build skips records made otherwise."""
        models = {n: [s.backend, s.model, s.path, s.params, s.system] for n, s in sorted(self.models.items())}
        blob = json.dumps([self.seed, models, self.questions, self.responses, self.judge, self.safety,
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
