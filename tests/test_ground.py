"""The ground layer's helpers: atomic writes and swaps, the sweep of dead processes' leftovers, chunked
digests, YAML settings files with ${ENV}, retries."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from builder.errors import DataError
from builder.files import (
    atomic_write,
    built_beside,
    file_digest,
    sibling_owner,
    sweep_stale,
    temp_sibling,
)
from builder.retry import backoff_seconds, retry
from builder.settings import expand_env, load_mapping


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    atomic_write(path, "first")
    atomic_write(path, b"second")
    assert path.read_bytes() == b"second"

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write(path, "third")
    assert path.read_bytes() == b"second" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_built_beside_swaps_in_on_success_and_leaves_the_old_folder_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with built_beside(out) as tmp:
            assert tmp == temp_sibling(out) and not any(tmp.iterdir())
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("half way")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with built_beside(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sweep_touches_only_our_names_of_dead_processes(tmp_path):
    out, dead = tmp_path / "out", _dead_pid()
    stale = tmp_path / f".out.tmp-{dead}"
    alive = tmp_path / f".out.tmp-{os.getpid()}"
    stranger = tmp_path / f".other.tmp-{dead}"
    user = tmp_path / ".out.tmp-notapid"
    for p in (stale, alive, stranger, user):
        p.mkdir()
    assert sweep_stale(out) == [stale]
    assert not stale.exists() and alive.exists() and stranger.exists() and user.exists()


def test_a_folder_left_between_the_two_renames_is_given_back(tmp_path):
    out, dead = tmp_path / "out", _dead_pid()
    old = tmp_path / f".out.old-{dead}"
    old.mkdir()
    (old / "thesis.tex").write_text("years of work")
    assert sweep_stale(out) == [old]
    assert (out / "thesis.tex").read_text() == "years of work"


def test_sibling_names_are_read_back():
    assert sibling_owner(temp_sibling("/x/spa_vl").name) == ("spa_vl", "tmp", os.getpid())
    assert sibling_owner(".spa_vl.old-12") == ("spa_vl", "old", 12)
    assert sibling_owner("spa_vl.tmp-12") is None and sibling_owner(".spa_vl.tmp-") is None


def test_file_digest_is_hashlib_s_and_git_s_blob_id(tmp_path):
    path = tmp_path / "f.bin"
    data = os.urandom(3 * (1 << 20) + 17)  # several chunks
    path.write_bytes(data)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    assert file_digest(path, "sha1", prefix=b"blob %d\0" % len(data)) == blob


def test_load_mapping_names_the_file_for_every_kind_of_bad_file(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("a: 1\nb: [x]\n")
    assert load_mapping(good) == {"a": 1, "b": ["x"]}
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_mapping(empty) == {}
    cases = {"bad.yaml": b"a: [1,\n", "list.yaml": b"- 1\n- 2\n", "latin1.yaml": "a: caf\xe9\n".encode("latin-1")}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError) as err:
            load_mapping(tmp_path / name, what="a judge config")
        assert err.value.file == str(tmp_path / name) and "\n" not in str(err.value)
    with pytest.raises(DataError) as err:
        load_mapping(tmp_path / "missing.yaml")
    assert err.value.file == str(tmp_path / "missing.yaml")


def test_expand_env_defaults_and_required(monkeypatch):
    monkeypatch.setenv("SPA_VL_T_URL", "http://gpu:8000/v1")
    monkeypatch.delenv("SPA_VL_T_UNSET", raising=False)
    data = {"models": {"m": {"base_url": "${SPA_VL_T_URL}", "key": "${SPA_VL_T_UNSET:-EMPTY}"}}, "n": 3}
    assert expand_env(data) == {"models": {"m": {"base_url": "http://gpu:8000/v1", "key": "EMPTY"}}, "n": 3}
    with pytest.raises(DataError) as err:
        expand_env({"judge": ["${SPA_VL_T_UNSET:?the judge's URL}"]})
    assert err.value.field == "judge[0]" and "SPA_VL_T_UNSET" in str(err.value)


def test_retry_retries_what_is_transient_and_raises_the_rest():
    calls, said = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset by peer")
        return "ok"

    assert retry(flaky, retries=5, backoff=0, transient=lambda e: isinstance(e, ConnectionError),
                 log=said.append, what="publish: read the repo") == "ok"
    assert len(calls) == 3 and len(said) == 2 and said[0].startswith("publish: read the repo: attempt 1 failed")
    calls.clear()
    with pytest.raises(ConnectionError):
        retry(flaky, retries=1, backoff=0, transient=lambda e: True)
    assert len(calls) == 2
    with pytest.raises(ValueError):
        retry(lambda: (_ for _ in ()).throw(ValueError("bad")), retries=5, backoff=0,
              transient=lambda e: isinstance(e, ConnectionError))


def test_backoff_grows_is_capped_and_jittered():
    for attempt in range(1, 12):
        wait = backoff_seconds(1.0, attempt)
        ceiling = min(30.0, 2 ** (attempt - 1))
        assert ceiling / 2 <= wait <= ceiling
        assert 0 <= backoff_seconds(1.0, attempt, full_jitter=True) <= ceiling
    assert backoff_seconds(0, 3) == 0.0
