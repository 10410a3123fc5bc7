"""`import spa_vl` and `load_dataset("spa_vl", ...)` from the folder above a dataset folder named spa_vl.

That is where the README's quick start leaves a user (`spa-vl import_upstream sqrti/SPA-VL spa_vl`).
The dataset folder has no __init__.py, so Python sees it as a namespace package; an editable install
that works through an import hook (setuptools' default for a flat layout) let it shadow spa_vl.py.
Each check runs in a fresh interpreter with that folder as its working directory, as a user would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder.dev.fixture import write_fixture
from builder.taxonomy import Taxonomy

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding a dataset folder named spa_vl, and nothing else."""
    here = tmp_path_factory.mktemp("user")
    write_fixture(here / "spa_vl", rows_per_domain=12, eval_rows=2, progress=False)
    return here


def python(code: str, cwd: Path, **env) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_import_spa_vl_gives_the_builder_module_next_to_a_dataset_folder_of_that_name(workdir):
    out = python("import spa_vl; print(spa_vl.__file__); print(spa_vl.SpaVL.__name__, callable(spa_vl.load))", workdir)
    assert out.splitlines() == [str(REPO / "spa_vl.py"), "SpaVL True"]


def test_load_dataset_of_the_folder_by_its_bare_name(workdir, tmp_path):
    domain = Taxonomy.load().domain("malicious_use").label
    out = python(
        "from datasets import load_dataset\n"
        f"ds = load_dataset('spa_vl', 'malicious_use', cache_dir={str(tmp_path / 'cache')!r})\n"
        "print(sorted(ds), ds['train'].num_rows, sorted(set(ds['train']['class1'])))\n"
        "import spa_vl\n"
        "print(spa_vl.load('malicious_use', 'train', source='spa_vl').num_rows)\n", workdir)
    first, second = out.splitlines()[-2:]
    assert first == f"['train', 'validation'] 9 [{domain!r}]"  # 4 images, one of them validation: 3 x 3 train rows
    assert second == "9"


def test_a_plain_install_is_not_shadowed_either(workdir, tmp_path):
    source, target = tmp_path / "src", tmp_path / "site"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(  # built from a copy: no build/ left in the checkout
        ".git", ".venv", "__pycache__", "build", "*.egg-info", "tests", "bench", "demo_out", "bench_out"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=600)
    assert (target / "spa_vl.py").is_file() and (target / "builder" / "taxonomy.yaml").is_file()
    out = python("import spa_vl, builder; print(spa_vl.__file__); print(builder.__file__)", workdir,
                 PYTHONPATH=str(target))
    assert out.splitlines() == [str(target / "spa_vl.py"), str(target / "builder" / "__init__.py")]
