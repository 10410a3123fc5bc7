"""Following `spa-vl publish DIR REPO` from its root argument (issue 15: "following publish stays inside
the hub, format and card layers, reading the manifest once").

The command runs in this process (``builder.cli.main``), through the loopback Hub (``tests/hub_server.py``)
driven by the real ``huggingface_hub`` client, as a real publish and as a dry run. Two probes watch it:

- an audit hook (``sys.addaudithook``; a hook cannot be removed, so a flag turns it on only while the
  command runs) counts every ``open`` of ``DIR/manifest.json`` for reading, by anyone: our code,
  ``huggingface_hub`` uploading it, ``datasets`` loading the configs. Exactly one is allowed: the
  command body's ``DatasetFolder.open``. Everything after works on that value (``DatasetFolder.raw``
  gives the manifest's bytes to hash and to upload).
- a profile function (``sys.setprofile`` on this thread, ``threading.setprofile`` for the threads the
  command starts) records every call of a project function: a function whose code lives under
  ``builder/``, ``dataset_card/``, ``training/`` or in ``spa_vl.py``. Module and class bodies that run
  because a lazy import happens during the command are imports, not calls, and are not counted.

Every project function called must live in the allowed set, and here is why each member is in it:

- ``builder.cli`` (and its ``command_line`` and ``failures``): the command line layer (parse, check argv,
  call the body, turn an error into one line);
- ``builder.hub``: the command's own package (plan, publish, the retries and timeouts it shares);
- ``builder.format``: the folder's owner: layout, ``DatasetFolder`` and manifest, and ``history``
  (publish records the released row ids, the baseline of the next bump, under ``.spa_vl/``);
- ``builder.errors``, ``builder.files``, ``builder.retry``, ``builder.taxonomy``, ``builder.settings``:
  the ground helpers (errors, hashing and atomic writes, retries, the folder's taxonomy and the YAML
  loader a taxonomy may read through);
- ``dataset_card``: publish re-renders the card so that its load examples name the repo;
- ``builder.validate``: only inside one call of ``builder.validate.run.validate`` whose ``folder`` is the
  very ``DatasetFolder`` value the command body opened (and in the threads that call starts while it
  runs). The checks themselves are validate's business; publish hands them the value and reads the report
  it returns, a plain result value: its own methods (``builder.validate.report``: ``ok``,
  ``format_table``) are allowed after the call, nothing else of the package is.

Anything else (``builder.versioning``, ``builder.upstream``, ``builder.generate``, ``training``, ...) fails.
Before issue 15 the dry run read ``manifest.json`` six times (four parses and two hashes), the real
publish seventeen times, and publish called ``builder.versioning`` and validate's own manifest reader.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path

import pytest
from hub_server import HubServer, hub_env

import builder.validate.run
from builder.cli import main
from builder.format.manifest import DatasetFolder

REPO = "org/SPA-VL"
TOKEN = "hf_loopbackTEST0123456789follow"
ROOT = Path(__file__).resolve().parents[1]
PROJECT = tuple(str(ROOT / p) for p in ("builder", "dataset_card", "training", "spa_vl.py"))
GROUND = {"builder.errors", "builder.files", "builder.retry", "builder.taxonomy", "builder.settings"}
ALLOWED_PACKAGES = ("builder.cli", "builder.hub", "builder.format", "dataset_card")
REPORT = "builder.validate.report"  # the result value validate returns; publish reads it


def _module(filename: str) -> str:
    parts = list(Path(filename).resolve().relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _allowed(module: str) -> bool:
    return module in GROUND or any(module == p or module.startswith(p + ".") for p in ALLOWED_PACKAGES)


class _Follow:
    """The audit hook and the profile function, and what they saw while ``on``."""

    installed = False
    current: "_Follow | None" = None

    def __init__(self, manifest: Path):
        self.manifest = str(manifest)
        self.manifest_reads: list[str] = []  # the innermost project function of each read ("library" if none)
        self.modules: set[str] = set()  # every module a project function was called in
        self.outside: list[str] = []  # calls outside the allowed set
        self.opened: DatasetFolder | None = None  # what the command body's DatasetFolder.open returned
        self.validate_calls: list[bool] = []  # per call of validate: was its folder the opened value?
        self.in_validate = 0
        self.local = threading.local()

    # --- the audit hook: opens of manifest.json for reading ---------------------------------------------
    @staticmethod
    def audit(event: str, args) -> None:
        self = _Follow.current
        if self is None or event != "open":
            return
        path, mode, flags = args
        if not isinstance(path, (str, bytes, os.PathLike)) or os.fsdecode(path) != self.manifest:
            return
        writing = (isinstance(mode, str) and any(c in mode for c in "wax") and "+" not in mode) or \
                  (mode is None and isinstance(flags, int) and flags & os.O_ACCMODE == os.O_WRONLY)
        if not writing:
            frame, where = sys._getframe(1), "library"
            while frame is not None:
                if frame.f_code.co_filename.startswith(PROJECT):
                    where = f"{_module(frame.f_code.co_filename)}.{frame.f_code.co_name}"
                    break
                frame = frame.f_back
            self.manifest_reads.append(where)

    # --- the profile function: project calls ----------------------------------------------------------
    def profile(self, frame, event: str, arg) -> None:
        if event not in ("call", "return") or not frame.f_code.co_filename.startswith(PROJECT):
            return
        code = frame.f_code
        if code.co_name == "<module>":  # a module imported during the command: its body, and all it calls
            self.local.imports = getattr(self.local, "imports", 0) + (1 if event == "call" else -1)
            return
        if getattr(self.local, "imports", 0):
            return
        if code is DatasetFolder.open.__func__.__code__ and event == "return" and self.opened is None:
            self.opened = arg
        if code is builder.validate.run.validate.__code__:
            if event == "call":
                self.validate_calls.append(frame.f_locals.get("folder") is self.opened)
            self.in_validate += 1 if event == "call" else -1
            return
        if event != "call":
            return
        module = _module(code.co_filename)
        self.modules.add(module)
        inside_validate = self.in_validate > 0 and module.startswith("builder.validate")
        reading_the_report = module == REPORT and self.validate_calls
        if not _allowed(module) and not inside_validate and not reading_the_report:
            self.outside.append(f"{module}.{code.co_name}")

    def run(self, argv: list[str]) -> None:
        if not _Follow.installed:
            sys.addaudithook(_Follow.audit)
            _Follow.installed = True
        _Follow.current = self
        threading.setprofile(self.profile)
        sys.setprofile(self.profile)
        try:
            main(argv)
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
            _Follow.current = None


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with HubServer({}, token=TOKEN) as server:
        hub_env(monkeypatch, server, tmp_path / "hf_home")
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry_run", "publish"])
def test_publish_reads_the_manifest_once_and_stays_in_the_hub_format_and_card_layers(
        fixture_folder, tmp_path, hub, dry_run, capsys):
    folder = tmp_path / "spa_vl"
    shutil.copytree(fixture_folder, folder)
    follow = _Follow(folder / "manifest.json")
    follow.run(["publish", str(folder), REPO, *(["--dry_run"] if dry_run else [])])

    out = capsys.readouterr()
    assert ("publish plan for org/SPA-VL" in out.err) if dry_run else out.out.startswith(f"published {REPO} v0.1.0")
    if dry_run:
        assert REPO not in hub.repos  # nothing written to the Hub
    else:
        assert hub.tags(REPO) == {"v0.1.0": hub.commits(REPO)[0]["id"]}
    assert follow.manifest_reads == ["builder.format.manifest._manifest_data"], follow.manifest_reads
    assert follow.outside == [], sorted(set(follow.outside))
    assert isinstance(follow.opened, DatasetFolder) and follow.opened.root == folder
    assert follow.validate_calls == [True]  # validate ran once, on the value the command opened
    # the probes saw the whole way: the command line, the hub, the folder's owner, the card (real publish)
    assert {"builder.cli", "builder.hub.publish", "builder.hub.plan", "builder.format.manifest"} <= follow.modules
    assert ("dataset_card.card" in follow.modules) != dry_run
    assert not any(m.startswith("builder.versioning") for m in follow.modules)
