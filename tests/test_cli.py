"""The `spa-vl` console script, run as a user runs it: a subprocess, its output and exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from builder.cli import CLI
from builder.dev.fixture import write_fixture

SPA_VL = str(Path(sys.executable).with_name("spa-vl"))
COMMANDS = [name for name in dir(CLI) if not name.startswith("_")]


def run(*args, check_rc=0):
    proc = subprocess.run([SPA_VL, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


def test_taxonomy_tree_and_json():
    tree = run("taxonomy").stdout
    assert tree.startswith("spa-vl: 6 domains, 15 categories, 53 subcategories")
    assert "Malicious Use  [malicious_use]" in tree
    data = json.loads(run("taxonomy", "--json").stdout)
    assert data["counts"]["subcategories"] == 53
    assert [d["slug"] for d in data["domains"]][0] == "representation_toxicity"


def test_taxonomy_from_a_user_file(tmp_path):
    f = tmp_path / "tax.yaml"
    f.write_text("name: mine\ndomains:\n- slug: only\n  label: Only Harms\n  categories:\n"
                 "  - label: One\n    subcategories: [{label: a, provenance: upstream}]\n")
    out = run("taxonomy", "--taxonomy", f).stdout
    assert out.splitlines()[0] == "mine: 1 domains, 1 categories, 1 subcategories (0 provisional, marked *)"
    bad = tmp_path / "bad.yaml"
    bad.write_text("domains: [")
    proc = run("taxonomy", "--taxonomy", bad, check_rc=2)
    assert str(bad) in proc.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    proc = subprocess.run([SPA_VL, command, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    text = proc.stdout + proc.stderr  # fire writes help to stdout or stderr depending on its version
    assert "Example" in text and f"spa-vl {command}" in text


def test_fixture_command_writes_a_loadable_folder(tmp_path):
    out = tmp_path / "fx"
    proc = run("fixture", out, "--rows_per_domain", 6, "--eval_rows", 2)
    assert proc.stdout.startswith("fixture: 40 rows")  # 6 domains x 2 images x 3 rows + 2 x 2 eval rows
    assert (out / "manifest.json").exists() and (out / "README.md").exists()


def test_bad_usage_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "fx"
    proc = run("fixture", out, "--layout", "bogus", check_rc=2)
    assert "layout" in proc.stderr
    assert not out.exists()
    assert run("no_such_command", check_rc=2)


def test_existing_output_folder_is_refused(tmp_path):
    out = tmp_path / "fx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run("fixture", out, "--rows_per_domain", 3, "--eval_rows", 1, check_rc=2)
    assert "--overwrite" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_import_upstream_bad_parquet_exits_2(tmp_path):
    src, out = tmp_path / "up", tmp_path / "out"
    write_fixture(src, rows_per_domain=3, eval_rows=1, layout="upstream", progress=False)
    (src / "test" / "harm-00000-of-00001.parquet").write_bytes(b"this is not parquet")
    proc = run("import_upstream", src, out, check_rc=2)
    assert "harm-00000-of-00001.parquet" in proc.stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_demo_runs_end_to_end(tmp_path):
    proc = run("demo", tmp_path / "demo")
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("demo: ") and "rows in 8 configs" in last
    # the pipeline part: tiny local models -> run dir with a summary -> a built folder that loads per domain
    assert "generated" in last and "load_dataset(..., 'malicious_use')" in proc.stdout
    summary = json.loads((tmp_path / "demo" / "run" / "summary.json").read_text())
    assert summary["units"]["done"] == summary["units"]["total"] > 0 and summary["pairs"]["kept"] > 0
    assert (tmp_path / "demo" / "generated" / "manifest.json").exists()
    assert "malicious_use" in proc.stdout
    # the maintainer's part: the generated folder validates, and version 0.2.0 has a changelog entry
    assert "all checks passed" in proc.stdout
    generated = tmp_path / "demo" / "generated"
    assert json.loads((generated / "manifest.json").read_text())["version"] == "0.2.0"
    assert "## 0.2.0" in (generated / "CHANGELOG.md").read_text()
    # and it ends with two DPO steps of the tiny model
    assert "train dpo: 2 steps" in proc.stdout and (tmp_path / "demo" / "runs" / "dpo" / "adapter_config.json").exists()


def test_generate_exits_1_when_units_failed_and_2_on_a_bad_config(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from openai_server import OpenAIServer
    from pipeline_doubles import pipeline_responder, write_config

    bad = write_config(tmp_path / "bad.yaml", "http://127.0.0.1:9/v1", judge={"model": "missing"})
    proc = run("generate", bad, "--run_dir", tmp_path / "r0", check_rc=2)
    assert "bad.yaml: field judge.model" in proc.stderr
    with OpenAIServer(pipeline_responder, fault_rate=1.0, faults=("500",)) as srv:
        cfg = write_config(tmp_path / "run.yaml", srv.url, limit_keys={"max_retries": 1}, keywords={"model": None})
        proc = run("generate", cfg, "--run_dir", tmp_path / "r1", "--limit", 1, "--progress", "False", check_rc=1)
    assert proc.stdout.strip().startswith("generate: 1 units (0 done, 1 failed)")
    summary = json.loads((tmp_path / "r1" / "summary.json").read_text())
    assert summary["units"]["failures"][0]["kind"].startswith("http_5")


# --- the README's command reference and every example say what --help says -------------------------------
REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MANUAL = [README, *sorted((REPO / "docs").glob("*.md"))]  # the README and the docs it links to


def _code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line inside a ``` block."""
    out, inside = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            inside = not inside
        elif inside:
            out.append((n, line))
    return out


def test_the_readme_command_reference_is_the_help_usage():
    from builder.cli.command_line import commands

    text = README.read_text()
    section = text.split("## Command reference", 1)[1].split("\n## ", 1)[0]
    listed = [line for _, line in _code_lines(section) if line.startswith("spa-vl ")]
    expected = [c.synopsis() for c in commands(CLI).values()]
    assert listed == expected, "README.md's command reference should read:\n" + "\n".join(expected)


def _examples():
    """Every `spa-vl ...` command line in the code blocks of the README and docs/, and in the commands' --help
    examples."""
    import inspect
    import re

    found = [(f"{doc.relative_to(REPO)}:{n}", line) for doc in MANUAL for n, line in _code_lines(doc.read_text())
             if "[" not in line]
    for name in COMMANDS:
        doc = inspect.getdoc(getattr(CLI, name)) or ""
        found += [(f"spa-vl {name} --help", line) for line in doc.splitlines()]
    for where, line in found:
        line = re.sub(r"^\s*(?:[A-Z_]+=\S+\s+)*(?:\.venv/bin/)?", "", line)
        if line.startswith("spa-vl "):
            yield where, re.split(r"\s+(?:#|>|\|)\s*", line)[0]


@pytest.mark.parametrize("where, line", list(_examples()))
def test_every_example_command_line_is_valid(where, line):
    import shlex

    from builder.cli.command_line import HelpRequested, UsageError, check

    try:
        check(CLI, shlex.split(line)[1:])
    except HelpRequested:
        pass
    except UsageError as e:
        pytest.fail(f"{where}: {line}\n  {e}")


def test_every_link_of_the_manual_reaches_a_file():
    """A relative link of the README or a doc (``[text](docs/x.md)``, an image) names a file that exists."""
    import re

    local, missing = [], []
    for doc in MANUAL:
        for link in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", link) or link.startswith("#"):
                continue  # a web address or an anchor of the same page
            local.append(link)
            if not (doc.parent / link.split("#")[0]).exists():
                missing.append(f"{doc.relative_to(REPO)}: {link}")
    assert len(local) > 10 and not missing, missing
