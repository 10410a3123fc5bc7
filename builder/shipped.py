"""The configs shipped inside the package, by name: what `spa-vl configs` lists and copies out.

A config argument is a path when a file is there, else the name of a shipped config of its kind, so
``spa-vl generate pipeline`` works after a plain ``pip install`` from any folder::

    resolve_config("pipeline", PIPELINE_CONFIGS)       # .../site-packages/builder/configs/pipeline.yaml
    resolve_config("my_run.yaml", PIPELINE_CONFIGS)    # my_run.yaml, as given
    [(c.kind, c.name) for c in shipped_configs()]      # [("pipeline", "local"), ..., ("train", "tiny-rm")]
    copy_config("local-server", "my.yaml")              # refuses to replace an existing file

Each shipped YAML starts with a comment whose first line says what it is; that line is its description.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from builder.errors import DataError
from builder.files import temp_sibling

ACTIONS = ("list", "copy")  # spa-vl configs [list|copy NAME DEST]

PIPELINE_CONFIGS = Path(__file__).with_name("configs")
PROMPTS = Path(__file__).with_name("prompts")


@dataclass(frozen=True)
class ShippedConfig:
    kind: str          # pipeline (spa-vl generate), train (spa-vl train --config), judge (spa-vl evaluate --judge)
    name: str
    path: Path
    description: str


def _training_configs() -> Path:
    # training/ sits above builder/ in the layers: its folder is found on disk, without importing it
    return Path(__file__).resolve().parent.parent / "training" / "configs"


def describe(path: Path, width: int = 110) -> str:
    """The first clause of the file's leading comment (what the config is), at most ``width`` characters."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text.startswith("#") or (lines and not text.lstrip("#").strip()):
            break
        lines.append(text.lstrip("#").strip())
    text, depth = " ".join(lines).strip(), 0
    for i, ch in enumerate(text):  # stop at the first ". " or ": " outside parentheses
        depth += (ch in "([") - (ch in ")]")
        if depth == 0 and ch in ".:" and text[i + 1:i + 2] in (" ", ""):
            text = text[:i]
            break
    return text if len(text) <= width else text[:width - 1].rstrip() + "…"


def shipped_configs() -> list[ShippedConfig]:
    """Every shipped config: the pipeline recipes, then the trainers' and the evaluation judge's."""
    found = [ShippedConfig("pipeline", p.stem, p, describe(p)) for p in sorted(PIPELINE_CONFIGS.glob("*.yaml"))]
    for p in sorted(_training_configs().glob("*.yaml")):
        found.append(ShippedConfig("judge" if p.stem == "judge" else "train", p.stem, p, describe(p)))
    return found


def resolve_config(value: str | os.PathLike, folder: Path = PIPELINE_CONFIGS) -> Path:
    """``value`` when it is a file; else the shipped config of that name in ``folder`` (``.yaml`` optional)."""
    path = Path(value)
    if path.is_file():
        return path
    if path.parent == Path(".") and path.suffix in ("", ".yaml"):
        shipped = folder / f"{path.name.removesuffix('.yaml')}.yaml"
        if shipped.is_file():
            return shipped
    names = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
    what = "is a folder, not a config file" if path.is_dir() else f"no such file, nor a shipped config ({names})"
    raise DataError(f"{what}; `spa-vl configs` lists the shipped ones", file=str(value))


def copy_config(name: str, dest: str | os.PathLike) -> Path:
    """Copy the shipped config ``name`` to ``dest`` (a file, or a folder to put NAME.yaml in) for editing;
    an existing file is never replaced."""
    matches = [c for c in shipped_configs() if c.name == name.removesuffix(".yaml")]
    if not matches:
        names = ", ".join(c.name for c in shipped_configs())
        raise DataError(f"no shipped config of that name (shipped: {names})", field="name")
    target = Path(dest)
    if target.is_dir():
        target = target / matches[0].path.name
    if target.exists() or target.is_symlink():
        raise DataError("already exists; choose another destination (nothing was replaced)", file=str(target))
    if not target.parent.is_dir():
        raise DataError("no such folder", file=str(target.parent))
    tmp = temp_sibling(target)
    shutil.copyfile(matches[0].path, tmp)
    try:
        os.link(tmp, target)  # fails if the file appeared meanwhile: never replaces one
    except FileExistsError:
        raise DataError("already exists; choose another destination (nothing was replaced)", file=str(target)) from None
    except OSError:  # a filesystem without hard links
        if target.exists():
            raise DataError("already exists; choose another destination (nothing was replaced)", file=str(target)) from None
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
