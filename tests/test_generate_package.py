"""builder.generate's public faces, and the run snapshot that build and review read back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_doubles import write_config

from builder.errors import DataError
from builder.generate.config import PipelineConfig, RunSnapshot

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("openai", "numpy", "PIL", "httpx2", "torch", "transformers", "datasets", "pyarrow", "ray")


def test_the_package_shows_its_faces_and_imports_nothing_heavy():
    code = (
        "import sys\n"
        "import builder.generate as g\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "import builder.generate.folder_build\n"  # the module behind `build` is loaded: the face is still the function
        "from builder.generate import build, generate, NothingToBuild\n"
        "print(build.__module__, build.__name__, generate.__module__, NothingToBuild.__name__)\n"
        "print(all(getattr(g, n).__name__ == n for n in g.__all__))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    heavy, faces, every = done.stdout.splitlines()
    assert heavy == "[]"
    assert faces == "builder.generate.folder_build build builder.generate.pipeline NothingToBuild"
    assert every == "True"
    import builder.generate as g

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        g.nope  # noqa: B018


def _snapshot(tmp_path: Path, **edits) -> tuple[Path, PipelineConfig]:
    """A run directory holding only the config.yaml `generate` would write, with ``edits`` (section.key: value)."""
    cfg = PipelineConfig.load(write_config(tmp_path / "run.yaml", "http://127.0.0.1:9/v1"))
    snap = cfg.snapshot()
    for dotted, value in edits.items():
        section, _, key = dotted.partition(".")
        if value is None and not key:
            del snap[section]
        else:
            snap[section][key] = value
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(snap, sort_keys=False))
    return run, cfg


def test_the_snapshot_reads_back_typed(tmp_path):
    run, cfg = _snapshot(tmp_path)
    snap = RunSnapshot.read(run)
    assert snap.file == str(run / "config.yaml")
    assert (snap.seed, snap.units_fingerprint, snap.taxonomy) == (cfg.seed, cfg.units_fingerprint, cfg.taxonomy.source)
    assert (snap.responses, snap.judge, snap.safety, snap.build) == (cfg.responses, cfg.judge, cfg.safety, cfg.build)


@pytest.mark.parametrize("edits,message", [
    ({"build.test_fraction": "0.2"}, r"field build\.test_fraction: must be a number"),
    ({"judge.agreement": "sometimes"}, r"field judge\.agreement: must be one of strict, average"),
    ({"responses.bag": "m0"}, r"field responses\.bag: must be a list of strings"),
    ({"responses": None}, r"not a run config written by `spa-vl generate` \(no responses section\)"),
])
def test_build_and_review_refuse_the_same_bad_snapshot(tmp_path, edits, message):
    from builder.generate import build
    from builder.review.pairs import RunSource

    run, _ = _snapshot(tmp_path, **edits)
    (run / "run.sqlite").touch()
    with pytest.raises(DataError, match=rf"config\.yaml: {message}"):
        RunSnapshot.read(run)
    with pytest.raises(DataError, match=message):
        build(run, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match=message):  # review once read test_fraction with float(): "0.2" went through
        RunSource(run)
    assert not (tmp_path / "out").exists()
