"""builder.cli.command_line: the whole command line is checked against the command's signature before it runs."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest

from builder.cli import command_line
from builder.cli import CLI, main
from builder.cli.command_line import Command, HelpRequested, UsageError, check

SPA_VL = str(Path(sys.executable).with_name("spa-vl"))


def parse(*argv):
    command, values, extra = check(CLI, [str(a) for a in argv])
    return values, extra


def refusal(*argv) -> str:
    with pytest.raises(UsageError) as e:
        check(CLI, [str(a) for a in argv])
    return str(e.value)


@pytest.mark.parametrize("spelling", [["--dry_run"], ["--dry-run"], ["--dry_run=true"], ["--dry-run", "True"]])
def test_the_spellings_users_type_are_accepted(spelling):
    values, _ = parse("publish", "out", "org/x", *spelling)
    assert values == {"dir": "out", "repo_id": "org/x", "dry_run": True}


@pytest.mark.parametrize("spelling", ["--no-private", "--no_private", "--noprivate", "--private=false"])
def test_negative_bool_spellings(spelling):
    values, _ = parse("publish", "out", "org/x", spelling)
    assert values["private"] is False


@pytest.mark.parametrize("argv, flag, nearest", [
    (["publish", "out", "org/x", "--dryrun"], "--dryrun", "--dry_run"),
    (["publish", "out", "org/x", "--no-privat"], "--no-privat", "--no-private"),
    (["publish", "out", "org/x", "--nogate"], "--nogate", "--no-gated"),
    (["version", "out", "--bunp", "minor"], "--bunp", "--bump"),
    (["pull", "org/x", "out", "--revison", "v1.0.0"], "--revison", "--revision"),
])
def test_a_mistyped_flag_is_refused_naming_the_nearest(argv, flag, nearest):
    message = refusal(*argv)
    assert f"unknown flag {flag}; did you mean {nearest}?" in message


def test_validate_has_no_taxonomy_flag_any_more():
    # the folder carries its taxonomy; a --taxonomy here used to be ignored silently
    assert "unknown flag --taxonomy" in refusal("validate", "out", "--taxonomy", "my.yaml")


@pytest.mark.parametrize("argv, words", [
    (["version", "out", "--bump", "minr"], "--bump is one of patch, minor, major, not 'minr'; did you mean minor?"),
    (["fixture", "out", "--layout", "upstrem"], "--layout is one of spa_vl, upstream"),
    (["fixture", "out", "--rows_per_domain", "-3"], "--rows_per_domain must be >= 0, not -3"),
    (["fixture", "out", "--rows_per_domain", "many"], "--rows_per_domain takes an integer, not 'many'"),
    (["publish", "out", "org/x", "--retries", "-1"], "--retries must be >= 0"),
    (["publish", "out", "org/x", "--dry_run", "--dry_run"], "--dry_run is given twice"),
    (["publish", "out", "org/x", "--no-dry_run=true"], "takes no value"),
    (["generate", "c.yaml", "r", "--executor", "slurm"], "--executor is one of local, ray"),
    (["generate", "c.yaml", "r", "--limit", "0"], "--limit must be >= 1"),
    (["evaluate", "m", "d", "j.yaml", "o", "--batch_size", "nan"], "--batch_size takes an integer"),
    (["pull", "org/x"], "missing OUT"),
    (["pull", "org/x", "out", "v1.0.0"], "unexpected argument 'v1.0.0'"),
    (["pull", "org/x", "out", "--revision"], "--revision needs a value"),
    (["publish", "out", "org/x", "-n"], "flags are spelled --name"),
    (["card", "out", "--repo_id", ""], "--repo_id is empty"),
])
def test_types_choices_ranges_and_shape_are_checked(argv, words):
    assert words in refusal(*argv)


def test_values_reach_fire_as_typed():
    command, values, extra = check(CLI, ["pull", "org/x", "123", "--revision", "456"])
    assert values == {"repo_id": "org/x", "out": "123", "revision": "456"}  # strings stay strings
    fire_argv = command.fire_argv(values, extra)
    assert fire_argv[0] == "pull" and sorted(fire_argv[1:]) == ["--out='123'", "--repo_id='org/x'", "--revision='456'"]
    values, _ = parse("train", "dpo", "--max_steps", "-1")
    assert values == {"kind": "dpo", "max_steps": -1}
    values, _ = parse("generate", "c.yaml", "--run_dir=runs/r1", "--limit", "None")
    assert values == {"config": "c.yaml", "run_dir": "runs/r1", "limit": None}


def test_train_passes_its_overrides_on_for_its_own_loader():
    values, extra = parse("train", "dpo", "--config", "c.yaml", "--learning_rate", "1e-5", "--gradient_checkpointing",
                          "--beta=0.2", "--max_steps", "3")
    assert values == {"kind": "dpo", "config": "c.yaml", "max_steps": 3}
    assert extra == ["--learning_rate", "1e-5", "--gradient_checkpointing", "--beta=0.2"]
    assert "--max_steps must be" not in str(parse("train", "ppo", "--max_steps", "-1"))
    assert "--max_steps must be >= -1" in refusal("train", "ppo", "--max_steps", "-2")


def test_a_command_added_later_is_checked_from_its_signature_alone():
    class Later(CLI):
        def review(self, dir: str, verdicts: int = 10, strict: bool = False, note: str | None = None):
            """Review rows by hand.

            Example:
              spa-vl review out/spa_vl --verdicts 20
            """

    command, values, _ = check(Later, ["review", "out", "--verdicts", "20", "--strict"])
    assert values == {"dir": "out", "verdicts": 20, "strict": True}
    assert command.synopsis() == "spa-vl review DIR [--verdicts N] [--strict] [--note NOTE]"
    with pytest.raises(UsageError, match="did you mean --verdicts"):
        check(Later, ["review", "out", "--verdict", "3"])
    with pytest.raises(UsageError, match="--verdicts takes an integer"):
        check(Later, ["review", "out", "--verdicts", "lots"])


def test_unknown_command_names_the_nearest_and_help_is_ours():
    with pytest.raises(UsageError, match="unknown command 'publsh'; did you mean 'publish'"):
        check(CLI, ["publsh"])
    with pytest.raises(HelpRequested) as h:
        check(CLI, ["publish", "out", "--dryrun", "--help"])  # help wins over a bad line
    assert h.value.command.name == "publish"
    for argv in ([], ["--help"], ["-h"], ["help"]):
        with pytest.raises(HelpRequested) as h:
            check(CLI, argv)
        assert h.value.command is None
    overview = command_line.overview(CLI)
    for name in command_line.commands(CLI):
        assert sum(line.startswith(f"  {name} ") for line in overview.splitlines()) == 1  # one line each


def test_every_command_signature_is_readable():
    for name, command in command_line.commands(CLI).items():
        assert isinstance(command, Command) and command.synopsis().startswith(f"spa-vl {name}")
        for p in command.params:  # an annotation the checker cannot read would go to fire unchecked
            assert p.kind in (str, int, float, bool), (name, p.name)


def test_every_command_documents_its_arguments_in_order():
    """A command's signature and its docstring's ``Args:`` are its contract: the same names, in the same order."""
    import re

    for name, command in command_line.commands(CLI).items():
        documented = re.findall(r"^  (\w+):", command.doc.partition("\nArgs:\n")[2], re.M)
        expected = [p.name for p in command.params] + (["overrides"] if command.takes_overrides else [])
        assert documented == expected, (name, documented)


def test_main_exits_2_and_runs_nothing(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["fixture", tmp_path / "fx", "--rows_per_domain", "3", "--eval-row", "1"])
    assert e.value.code == 2
    assert "did you mean --eval_rows?" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _run(*args, **kw):
    return subprocess.run([SPA_VL, *map(str, args)], capture_output=True, text=True, timeout=120, **kw)


def test_a_path_that_looks_like_a_number_reaches_the_command_as_a_path(tmp_path, capsys):
    # fire alone turned `--taxonomy 123` into the int 123 (a traceback in Path()); the checked line keeps text text
    with pytest.raises(SystemExit) as e:
        main(["taxonomy", "--taxonomy", "123"])
    assert e.value.code == 2
    assert "123: taxonomy file not found" in capsys.readouterr().err


def test_version_help_and_unknown_command_from_the_shell():
    version = _run("--version")
    assert version.returncode == 0 and version.stdout.startswith("spa-vl ") and not version.stderr
    overview = _run("--help")
    assert overview.returncode == 0 and "  publish " in overview.stdout and not overview.stderr
    bad = _run("pubish")
    assert bad.returncode == 2 and "did you mean 'publish'" in bad.stderr and "Traceback" not in bad.stderr


def test_help_piped_into_head_prints_no_traceback():
    proc = subprocess.run(f"'{SPA_VL}' --help | head -1; '{SPA_VL}' fixture --help | head -1", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines()[0].startswith("usage: spa-vl COMMAND")
    assert proc.stdout.splitlines()[1].startswith("usage: spa-vl fixture OUT")
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
    # a reader that is gone before the first write: every write meets a closed pipe
    for line in ("--help", "publish --help", "taxonomy"):
        gone = subprocess.run(f"'{SPA_VL}' {line} | true; echo $((PIPESTATUS[0]))", shell=True, executable="/bin/bash",
                              capture_output=True, text=True, timeout=120)
        assert gone.stdout.strip() == "141" and gone.stderr == "", (line, gone.stderr)


def test_help_never_opens_a_pager_even_on_a_terminal(tmp_path):
    marker = tmp_path / "paged"
    env = {**os.environ, "PAGER": f"sh -c 'cat > {marker}'"}  # fire pages help through $PAGER on a TTY
    leader, follower = pty.openpty()
    proc = subprocess.Popen([SPA_VL, "publish", "--help"], stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    shown = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the command ended
            break
        if not chunk:
            break
        shown += chunk
    assert proc.wait(timeout=60) == 0
    os.close(leader)
    assert not marker.exists()
    assert b"usage: spa-vl publish DIR REPO_ID" in shown
