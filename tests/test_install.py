"""Shipped configs by name after a plain (non-editable) `pip install`, from a folder that is not the repository.

The project is installed with pip into a fresh `--target` folder (no dependencies: those of this venv are
used) from a copy of its tracked files, and run from an empty working directory with only that folder on
the path: `spa-vl configs`, `generate pipeline` against the loopback server, `configs copy`, and the
trainers' and the evaluation's own name resolution (`--config llava-1.5-7b-lora`, `--judge judge`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from openai_server import OpenAIServer
from pipeline_doubles import pipeline_responder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A non-editable install of the working tree's tracked files; returns (site folder, an empty cwd)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    site = tmp / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-cache-dir", "--target", str(site), str(src)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    return site, cwd


def _run(installed, code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    site, cwd = installed
    # -I would also drop this venv's site-packages (the dependencies): PYTHONPATH puts the install first instead,
    # and PYTHONSAFEPATH keeps the working directory off the path.
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPA_VL_MODEL")}
    full_env |= {"PYTHONPATH": str(site), "PYTHONSAFEPATH": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)


def test_the_install_is_the_one_imported(installed):
    site, _ = installed
    done = _run(installed, "import builder, training, spa_vl; print(builder.__file__, training.__file__, spa_vl.__file__)")
    assert done.returncode == 0, done.stderr
    assert all(p.startswith(str(site)) for p in done.stdout.split())
    assert not (site / "builder" / "__editable__").exists()


def test_generate_and_configs_take_shipped_names_from_any_folder(installed):
    site, cwd = installed
    with OpenAIServer(pipeline_responder) as srv:
        done = _run(installed, "from builder.cli import main; main(['generate', 'pipeline', '--run_dir', 'run', "
                               "'--limit', '2', '--progress', 'False'])",
                    {"OPENAI_BASE_URL": srv.url, "OPENAI_API_KEY": "sk-install-test"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((cwd / "run/summary.json").read_text())
    assert summary["units"]["done"] == 2
    assert yaml.safe_load((cwd / "run/config.yaml").read_text())["config_file"] == str(site / "builder/configs/pipeline.yaml")
    listed = _run(installed, "from builder.cli import main; main(['configs'])")
    assert listed.returncode == 0 and "local-server" in listed.stdout and "llava-1.5-7b-lora" in listed.stdout
    copied = _run(installed, "from builder.cli import main; main(['configs', 'copy', 'local-server', 'mine.yaml'])")
    assert copied.returncode == 0, copied.stderr
    assert (cwd / "mine.yaml").read_bytes() == (site / "builder/configs/local-server.yaml").read_bytes()


def test_trainer_and_judge_configs_resolve_by_name_from_any_folder(installed):
    site, _ = installed
    code = (
        "from training.config import load_config, resolve_config_path\n"
        "from training.judge_config import _resolve_judge_path, load_judge_config\n"
        "print(resolve_config_path('llava-1.5-7b-lora'))\n"
        "print(load_config('llava-1.5-7b-lora', 'dpo').kind)\n"
        "print(_resolve_judge_path('judge'))\n"
        "print(sorted(load_judge_config('judge').prompts))\n"
    )
    done = _run(installed, code)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == str(site / "training/configs/llava-1.5-7b-lora.yaml") and lines[1] == "dpo"
    assert lines[2] == str(site / "training/configs/judge.yaml") and "harm_judge" in lines[3]
