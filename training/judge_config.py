"""The judge file of `spa-vl evaluate` (``training/configs/judge.yaml`` documents every key), read and checked.

    cfg = load_judge_config("training/configs/judge.yaml")   # or a shipped file by name: "judge"
    cfg.harm_judge, cfg.harm_format.name, cfg.reference_entry, cfg.describe(cfg.harm_judge)

Errors name the file and the key (:class:`builder.errors.DataError`), before any model is loaded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from builder.errors import DataError
from builder.generate.model_spec import ModelSpec
from builder.generate.router import TRANSPORT_PARAMS
from builder.settings import expand_env, load_mapping
from training.judge_formats import HARM_FORMATS, HarmFormat

PROMPTS = Path(__file__).with_name("prompts")
CONFIGS = Path(__file__).with_name("configs")
ROLES = ("harm_judge", "help_judge")
# The placeholders each prompt may use (str.format; double the braces of literal JSON).
PROMPT_FIELDS = {
    "harm_judge": ("question", "answer", "class1", "class2", "class3"),
    "help_judge": ("question", "answer_a", "answer_b", "class1", "class2", "class3"),
}
DEFAULT_OPENAI_URL = "https://api.openai.com/v1"

JUDGE_DEFAULTS: dict = {
    "models": {},
    "harm_judge": None,
    "harm_format": "json",
    "help_judge": None,
    "reference": None,
    "prompts": None,
    "params": {"temperature": 0.0},
    "send_image": True,
    "in_flight": 64,
    "max_failure_rate": 0.05,
}


def public_endpoint(url: str) -> str:
    """The URL without user, password, query or fragment: what may be written down (keys travel there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass
class JudgeConfig:
    file: str
    models: dict[str, ModelSpec]
    harm_judge: str
    help_judge: str
    harm_format: HarmFormat
    reference: str | None
    prompts: dict[str, str]       # role → template text
    prompt_files: dict[str, str]  # role → the file it came from
    params: dict
    send_image: bool
    in_flight: int
    max_failure_rate: float

    def describe(self, name: str) -> dict:
        """What metrics.json records of a model entry: name, model, backend and endpoint (never a key)."""
        spec = self.models[name]
        if spec.backend == "transformers":
            return {"name": name, "model": spec.path, "backend": spec.backend}
        url = spec.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_URL
        return {"name": name, "model": spec.model, "backend": spec.backend, "endpoint": public_endpoint(url)}

    def record(self, reference_entry: str | None = None) -> dict:
        """The judge as metrics.json records it: file, entries with endpoints, format, params, prompt hashes."""
        return {"file": self.file, "harm_judge": self.describe(self.harm_judge), "harm_format": self.harm_format.name,
                "help_judge": self.describe(self.help_judge), "send_image": self.send_image,
                "reference": self.describe(reference_entry) if reference_entry else None,
                "params": {k: v for k, v in self.params.items() if k not in TRANSPORT_PARAMS},  # no headers (keys)
                "prompts_sha256": {k: hashlib.sha256(v.encode()).hexdigest()[:16] for k, v in self.prompts.items()}}

    def text_models(self) -> set[str]:
        """In-process entries that are causal LMs (an MD-Judge harm judge), not VLMs."""
        spec = self.models[self.harm_judge]
        return {self.harm_judge} if self.harm_format.text_model and spec.backend == "transformers" else set()

    def reference_entry(self, reference: str | None) -> str | None:
        """The model entry that writes the HelpEval reference answers, if ``reference`` names one."""
        return reference if reference in self.models else None


def _resolve_judge_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    shipped = CONFIGS / (p.name if p.suffix else f"{p.name}.yaml")
    if not p.exists() and shipped.is_file() and p.parent == Path("."):
        return shipped
    raise DataError("judge config file not found", file=str(path))


def _near(base: Path, value: str) -> str:
    """A relative path that exists next to the config file, resolved; anything else as given (a Hub id)."""
    candidate = base / value
    return str(candidate.resolve()) if not Path(value).is_absolute() and candidate.exists() else value


def _read(path: Path) -> dict:
    data = load_mapping(path, what="a judge config")
    for key in data:
        if key not in JUDGE_DEFAULTS:
            raise DataError(f"unknown key; expected one of {sorted(JUDGE_DEFAULTS)}", file=str(path), field=str(key))
    return {**JUDGE_DEFAULTS, **expand_env(data)}


def _models(raw: dict, base: Path, file: str) -> dict[str, ModelSpec]:
    if not isinstance(raw["models"], dict) or not raw["models"]:
        raise DataError("a mapping of model entries is required (as in builder/configs/pipeline.yaml)",
                        file=file, field="models")
    models = {}
    for name, entry in raw["models"].items():
        if entry is not None and not isinstance(entry, dict):
            raise DataError("a model entry is a mapping", file=file, field=f"models.{name}")
        if entry and entry.get("path"):
            entry = {**entry, "path": _near(base, str(entry["path"]))}
        try:
            models[str(name)] = ModelSpec.from_config(str(name), entry)
        except (DataError, TypeError) as e:
            raise DataError(str(getattr(e, "message", e)), file=file,
                            field=getattr(e, "field", None) or f"models.{name}") from None
    return models


def _roles(raw: dict, models: dict[str, ModelSpec], file: str) -> tuple[dict[str, str], HarmFormat]:
    roles = {}
    for role in ROLES:
        name = raw[role]
        if name in (None, ""):
            raise DataError("a model name from `models:` is required here", file=file, field=role)
        if str(name) not in models:
            raise DataError(f"model {name!r} is not defined under `models:` ({sorted(models)})", file=file, field=role)
        roles[role] = str(name)
    fmt = HARM_FORMATS.get(str(raw["harm_format"]))
    if fmt is None:
        raise DataError(f"unknown harm_format {raw['harm_format']!r}; expected one of {sorted(HARM_FORMATS)}",
                        file=file, field="harm_format")
    harm = models[roles["harm_judge"]]
    if fmt.text_model and harm.backend == "transformers":
        if fmt.name != "md-judge-v0.1":
            raise DataError(f"{fmt.name} runs through an OpenAI-compatible server (e.g. vLLM --trust-remote-code); "
                            "the in-process judge supports md-judge-v0.1", file=file, field="harm_format")
        if roles["help_judge"] == roles["harm_judge"]:
            raise DataError("an in-process MD-Judge is a text-only causal LM and cannot judge HelpEval: "
                            "name another entry here", file=file, field="help_judge")
    return roles, fmt


def _prompts(raw: dict, fmt: HarmFormat, base: Path, file: str) -> tuple[dict[str, str], dict[str, str]]:
    prompt_dir = None
    if raw["prompts"]:
        prompt_dir = base / str(raw["prompts"])
        if not prompt_dir.is_dir():
            raise DataError(f"not a folder: {prompt_dir}", file=file, field="prompts")
    texts, files = {}, {}
    for role, stem in (("harm_judge", fmt.prompt), ("help_judge", "help_judge")):
        own = prompt_dir / f"{stem}.txt" if prompt_dir else None
        src = own if own and own.is_file() else PROMPTS / f"{stem}.txt"
        text = src.read_text()
        try:
            text.format(**dict.fromkeys(PROMPT_FIELDS[role], ""))
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(f"bad placeholder {e} (known: {', '.join(PROMPT_FIELDS[role])}; write literal braces "
                            "as {{ }})", file=str(src), field=f"prompts.{role}") from None
        texts[role], files[role] = text, str(src)
    return texts, files


def _rate(value, file: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise DataError(f"a share of failed judge calls from 0 to 1 (0.05 = 5%), got {value!r}", file=file,
                        field="max_failure_rate")
    return float(value)


def load_judge_config(path: str | Path) -> JudgeConfig:
    """Read and check a judge YAML (see ``training/configs/judge.yaml``); errors name the file and field."""
    p = _resolve_judge_path(path)
    file = str(p)
    raw = _read(p)
    base = p.parent.resolve()
    models = _models(raw, base, file)
    roles, fmt = _roles(raw, models, file)
    reference = raw["reference"]
    if reference is not None and not isinstance(reference, str):
        raise DataError("a model entry of `models:`, a model (Hub id or folder) or a .jsonl file of {id, answer}",
                        file=file, field="reference")
    if reference and reference not in models:
        reference = _near(base, reference)
    prompts, prompt_files = _prompts(raw, fmt, base, file)
    if raw["params"] is None:
        raw["params"] = {}
    if not isinstance(raw["params"], dict):
        raise DataError("request parameters are a mapping", file=file, field="params")
    if not isinstance(raw["send_image"], bool):
        raise DataError("must be true or false", file=file, field="send_image")
    if not isinstance(raw["in_flight"], int) or isinstance(raw["in_flight"], bool) or raw["in_flight"] < 1:
        raise DataError("must be a positive integer", file=file, field="in_flight")
    return JudgeConfig(file=file, models=models, harm_judge=roles["harm_judge"], help_judge=roles["help_judge"],
                       harm_format=fmt, reference=reference or None, prompts=prompts, prompt_files=prompt_files,
                       params=dict(raw["params"]), send_image=raw["send_image"], in_flight=raw["in_flight"],
                       max_failure_rate=_rate(raw["max_failure_rate"], file))
