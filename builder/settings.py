"""Reading a YAML settings file: one way to load it, one way to say what is wrong, one way to expand
``${ENV}`` references. Every config spa-vl reads (pipeline recipes, trainer settings, judge files,
run snapshots) comes through ``load_mapping``::

    data = load_mapping(path, what="a judge config")        # dict, or a DataError naming the file
    data = expand_env(data)                                  # ${OPENAI_BASE_URL:-http://localhost:8000/v1}
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from builder.errors import DataError

_ENV = re.compile(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}")


def load_mapping(path: str | Path, *, what: str = "a config") -> dict:
    """The YAML mapping in ``path`` (an empty file is ``{}``); a one-line DataError naming the file when it
    cannot be read, is not YAML, or is not a mapping."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"not valid YAML: {' '.join(str(e).split())}", file=str(path)) from None
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text: {e.reason} at byte {e.start}", file=str(path)) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", file=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DataError(f"{what} must be a YAML mapping of settings, not a {type(data).__name__}", file=str(path))
    return data


def expand_env(value, where: str = ""):
    """``${NAME}``, ``${NAME:-default}`` and ``${NAME:?what to set}`` in strings, so one shipped file serves
    any endpoint unedited; the last is a DataError naming the field ``where`` when NAME is unset or empty."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            found = os.environ.get(m.group(1))
            if not found and m.group(2) == ":?":
                raise DataError(f"set the environment variable {m.group(1)}: {m.group(3) or 'it is required'}",
                                field=where or None)
            return found or (m.group(3) if m.group(2) == ":-" else "") or ""

        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value
