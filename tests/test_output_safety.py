"""Never lose data: --overwrite refusals, SIGTERM and SIGKILL mid-write, disk and file-system errors.

Every case runs the `spa-vl` command as a user does (a subprocess, or ``main`` in-process where a fault
is injected) and checks what is on disk afterwards: the input intact, no half-written output, no debris.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.cli import main
from builder.dev.fixture import write_fixture
from builder.format.output import prepare_output, sweep_stale

SPA_VL = str(Path(sys.executable).with_name("spa-vl"))


def run(*args, rc=0, **kw):
    proc = subprocess.run([SPA_VL, *map(str, args)], capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == rc, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) by its sha256: what 'intact' means here."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.fixture
def thesis(tmp_path) -> Path:
    """A user's folder that spa-vl did not write."""
    root = tmp_path / "thesis"
    (root / "chapters").mkdir(parents=True)
    (root / "chapters" / "one.tex").write_text("\\chapter{Results}\n")
    (root / "notes.md").write_text("do not lose this\n")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished pipeline run (2 units) made against the loopback OpenAI server."""
    from openai_server import OpenAIServer
    from pipeline_doubles import pipeline_responder, write_config

    from builder.generate.pipeline import generate

    tmp = tmp_path_factory.mktemp("run")
    with OpenAIServer(pipeline_responder) as server:
        generate(write_config(tmp / "run.yaml", server.url), tmp / "run", limit=2, progress=False)
    return tmp / "run"


# --- --overwrite replaces only a folder spa-vl wrote, of the same kind, that is no input ----------------
@pytest.mark.parametrize("layout", ["spa_vl", "upstream"])
def test_fixture_never_overwrites_a_users_folder(thesis, layout):
    before = snapshot(thesis)
    proc = run("fixture", thesis, "--layout", layout, "--rows_per_domain", 3, "--eval_rows", 1, "--overwrite", rc=2)
    assert f"{thesis}: --overwrite replaces only" in proc.stderr
    assert snapshot(thesis) == before and siblings(thesis) == ["thesis"]


def test_overwrite_needs_the_same_kind(tmp_path):
    dataset, upstream = tmp_path / "dataset", tmp_path / "upstream"
    write_fixture(dataset, rows_per_domain=3, eval_rows=1, progress=False)
    write_fixture(upstream, rows_per_domain=3, eval_rows=1, layout="upstream", progress=False)
    for out, layout in ((dataset, "upstream"), (upstream, "spa_vl")):
        before = snapshot(out)
        run("fixture", out, "--layout", layout, "--rows_per_domain", 3, "--eval_rows", 1, "--overwrite", rc=2)
        assert snapshot(out) == before
    for out, layout in ((dataset, "spa_vl"), (upstream, "upstream")):  # the same kind is replaced
        run("fixture", out, "--layout", layout, "--rows_per_domain", 3, "--eval_rows", 1, "--seed", 1, "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "upstream"]


def test_import_upstream_never_deletes_its_source(tmp_path):
    top = tmp_path / "top"
    write_fixture(top / "src", rows_per_domain=3, eval_rows=1, layout="upstream", progress=False)
    before = snapshot(top)
    proc = run("import_upstream", top / "src", top, "--overwrite", rc=2)  # top is no dataset folder
    assert "--overwrite replaces only" in proc.stderr and snapshot(top) == before
    # and when the output folder is a dataset folder spa-vl wrote, a source inside it still stops the run
    run("import_upstream", top / "src", tmp_path / "made")
    for name in ("manifest.json", "README.md", "taxonomy.yaml"):
        shutil.copy(tmp_path / "made" / name, top / name)
    before = snapshot(top)
    proc = run("import_upstream", top / "src", top, "--overwrite", rc=2)
    assert f"would delete an input: {top / 'src'} is inside the output folder" in proc.stderr
    assert snapshot(top) == before


def test_build_never_deletes_the_run_it_reads(run_dir, tmp_path):
    run_copy = tmp_path / "run"
    shutil.copytree(run_dir, run_copy)
    before = snapshot(run_copy)
    proc = run("build", run_copy, run_copy, "--overwrite", rc=2)  # the paid replies in run.sqlite
    assert f"{run_copy}: --overwrite replaces only" in proc.stderr
    assert snapshot(run_copy) == before
    # a dataset folder that holds the run: replacing it would delete the run
    out = tmp_path / "out"
    run("build", run_copy, out)
    shutil.move(run_copy, out / "run")
    before = snapshot(out)
    proc = run("build", out / "run", out, "--overwrite", rc=2)
    assert f"would delete an input: {out / 'run'} is inside the output folder" in proc.stderr
    assert snapshot(out) == before
    shutil.move(out / "run", run_copy)
    run("build", run_copy, out, "--overwrite")  # our folder, no input inside: replaced
    assert (out / "manifest.json").is_file() and not (out / "run").exists()


def test_a_taxonomy_inside_the_output_folder_is_an_input(tmp_path):
    out = tmp_path / "fx"
    write_fixture(out, rows_per_domain=3, eval_rows=1, progress=False)
    before = snapshot(out)
    proc = run("fixture", out, "--taxonomy", out / "taxonomy.yaml", "--rows_per_domain", 3, "--overwrite", rc=2)
    assert "would delete an input" in proc.stderr and snapshot(out) == before


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "report.pdf"
    target.write_bytes(b"%PDF-1.7 mine")
    proc = run("fixture", target, "--rows_per_domain", 3, "--overwrite", rc=2)
    assert "exists and is not a folder" in proc.stderr and target.read_bytes() == b"%PDF-1.7 mine"


def test_the_guard_resolves_real_paths(tmp_path):
    real = tmp_path / "real"
    write_fixture(real, rows_per_domain=3, eval_rows=1, progress=False)
    (tmp_path / "link").symlink_to(real)
    from builder.errors import DataError

    with pytest.raises(DataError, match="would delete an input"):  # the input reached through a link
        prepare_output(real, inputs=(tmp_path / "link" / "data",), overwrite=True)


# --- SIGTERM unwinds like Ctrl-C; SIGKILL's debris is swept by the next run ------------------------------
def _start_big_fixture(out: Path, layout: str = "spa_vl") -> subprocess.Popen:
    proc = subprocess.Popen([SPA_VL, "fixture", str(out), "--layout", layout, "--rows_per_domain", "6000",
                             "--image_size", "192", "--texture"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    tmp = out.parent / f".{out.name}.tmp-{proc.pid}"
    while time.monotonic() < deadline:  # wait until rows are on disk in the temporary folder
        if tmp.is_dir() and any(p.is_file() for p in tmp.rglob("*")):
            return proc
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the fixture never started writing")


@pytest.mark.parametrize("layout", ["spa_vl", "upstream"])
def test_sigterm_mid_write_leaves_no_debris(tmp_path, layout):
    out = tmp_path / "big"
    proc = _start_big_fixture(out, layout)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no OUT, no .OUT.tmp-PID


def test_sigkill_debris_is_swept_by_the_next_run(tmp_path):
    out = tmp_path / "big"
    proc = _start_big_fixture(out)
    proc.kill()
    proc.communicate(timeout=60)  # reaped: its PID is dead
    debris = tmp_path / f".big.tmp-{proc.pid}"
    assert debris.is_dir()  # what SIGKILL leaves: nothing can clean up
    run("fixture", out, "--rows_per_domain", 3, "--eval_rows", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_sweep_touches_only_our_names_with_dead_pids(tmp_path):
    out = tmp_path / "out"
    write_fixture(out, rows_per_domain=3, eval_rows=1, progress=False)
    dead = _dead_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f".out.tmp-{dead}", f".out.old-{dead}", f".out.tmp-{alive.pid}", f".other.tmp-{dead}",
                     f".out.tmp-{dead}-mine", "out.tmp-1"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "f").write_text("x")
        partial = tmp_path / ".out.partial"
        partial.mkdir()
        (partial / ".spa_vl_pull.json").write_text(json.dumps({"repo_id": "o/r", "revision": None, "pid": dead}))
        swept = sweep_stale(out)
    finally:
        alive.kill()
        alive.wait()
    assert sorted(p.name for p in swept) == sorted([f".out.tmp-{dead}", f".out.old-{dead}", ".out.partial"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", f".out.tmp-{alive.pid}", f".other.tmp-{dead}", f".out.tmp-{dead}-mine", "out.tmp-1"])


def test_a_run_killed_between_the_two_renames_gets_its_folder_back(tmp_path):
    out = tmp_path / "out"
    write_fixture(out, rows_per_domain=3, eval_rows=1, progress=False)
    before = snapshot(out)
    old = tmp_path / f".out.old-{_dead_pid()}"
    os.replace(out, old)  # swap_into_place moved OUT aside, then the process died
    proc = run("fixture", out, "--rows_per_domain", 3, "--eval_rows", 1, rc=2)  # OUT is back, and not empty
    assert "--overwrite" in proc.stderr
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- environment errors: one line naming the path, exit 2 -------------------------------------------------
def _main(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    line = err[err.index("spa-vl: "):]  # after what a progress bar left on the line
    assert len(line.strip().splitlines()) == 1, err
    return line


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_read_only_folder_is_one_line(tmp_path, monkeypatch, capsys, code):
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **kw):
        if self.parent == tmp_path:
            raise OSError(code, os.strerror(code), str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)  # root ignores chmod; the file system's answer is injected
    err = _main(["fixture", tmp_path / "fx", "--rows_per_domain", 3], capsys)
    assert err.startswith(f"spa-vl: error: {tmp_path / 'fx'}: cannot create the output folder: {os.strerror(code)}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layout", ["spa_vl", "upstream"])
def test_a_full_disk_mid_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, layout):
    import pyarrow.parquet as pq

    real_write = pq.ParquetWriter.write_table
    calls = []

    def write_table(self, *a, **kw):
        calls.append(1)
        if len(calls) > 2:  # a few row groups reach the disk, then it is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, *a, **kw)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_table)
    out = tmp_path / "fx"
    err = _main(["fixture", out, "--layout", layout, "--rows_per_domain", 600, "--eval_rows", 1], capsys)
    assert err.startswith(f"spa-vl: error: {out}: cannot write: {os.strerror(errno.ENOSPC)}")
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_run_store_or_config_is_one_line(run_dir, tmp_path, capsys):
    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    (broken / "run.sqlite").write_bytes(b"this is not an sqlite file, only its name" * 100)
    for suffix in ("-wal", "-shm"):
        (broken / f"run.sqlite{suffix}").unlink(missing_ok=True)
    err = _main(["build", broken, tmp_path / "out"], capsys)
    assert f"{broken / 'run.sqlite'}: not a readable spa-vl run store" in err
    (broken / "config.yaml").write_text("seed: [1, 2\n")
    assert f"{broken / 'config.yaml'}: not valid YAML" in _main(["build", broken, tmp_path / "out"], capsys)
    (broken / "config.yaml").write_text("- just\n- a list\n")
    assert f"{broken / 'config.yaml'}: not a run config" in _main(["build", broken, tmp_path / "out"], capsys)
    assert not (tmp_path / "out").exists()


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    from pipeline_doubles import write_config

    cfg = write_config(tmp_path / "run.yaml", "http://127.0.0.1:9/v1")
    runs = tmp_path / "runs"
    runs.write_text("not a folder")
    err = _main(["generate", cfg, "--run_dir", runs, "--progress", "false"], capsys)
    assert f"{runs}: exists and is not a folder" in err
    err = _main(["build", runs, tmp_path / "out"], capsys)
    assert f"{runs}: not a run directory" in err
    assert runs.read_text() == "not a folder"


def test_an_upstream_fixture_written_before_the_mark_can_still_be_replaced(tmp_path):
    out = tmp_path / "up"
    write_fixture(out, rows_per_domain=3, eval_rows=1, layout="upstream", progress=False)
    (out / ".spa_vl_fixture.json").unlink()  # as `make demo` left demo_out/upstream before the mark existed
    assert prepare_output(out, kind="upstream-fixture", overwrite=True) == out
    (out / "README.md").write_text("# my own notes\n")
    from builder.errors import DataError

    with pytest.raises(DataError, match="replaces only"):
        prepare_output(out, kind="upstream-fixture", overwrite=True)
