"""`generate --executor ray` on a real two-node Ray cluster on this machine (`ray start --head`, then a second
`ray start --address`), whose nodes have no endpoint variables: the driver hands the workers every URL and key.

The shipped `pipeline` recipe runs against the loopback OpenAI server (which wants the key) and builds the same
bytes as the local executor; then the worker node is killed mid-run and the run still finishes, with no
request answered twice and every paid request counted. Each node is started in a session of its own, and the
teardown ends exactly the processes of those sessions (never `ray stop`, which would end every Ray on the
machine, other users' too).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from openai_server import OpenAIServer
from pipeline_doubles import pipeline_responder, write_config

pytest.importorskip("ray")

from builder.generate import build  # noqa: E402
from builder.generate.pipeline import generate  # noqa: E402

KEY = "sk-loopback-cluster-test-0001"
LIMIT = 6
RAY = str(Path(sys.executable).with_name("ray"))
# what a node must not see: the endpoint variables, and anything that would point it at another cluster
NODE_ENV_DROP = ("OPENAI_BASE_URL", "OPENAI_API_KEY", "SPA_VL_MODEL", "RAY_ADDRESS")
FAST_FAILURE = {"RAY_AUTH_MODE": "disabled", "RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "1000",
                "RAY_health_check_failure_threshold": "4"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of the session ``sid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) == sid and Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(entry))
        except (OSError, IndexError):
            continue
    return found


class LoopbackCluster:
    """A head node and a worker node, each `ray start`ed in its own session, with one CPU each."""

    def __init__(self):
        self.temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.sessions: dict[str, int] = {}

    def _node_args(self) -> list[str]:  # every port of its own: two nodes share this machine
        return ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory", str(80 * 2**20),
                "--disable-usage-stats", "--node-manager-port", str(_free_port()),
                "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
                "--metrics-export-port", str(_free_port()), "--runtime-env-agent-port", str(_free_port())]

    def _start(self, name: str, args: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if k not in NODE_ENV_DROP} | FAST_FAILURE
        proc = subprocess.Popen([RAY, "start", *args, *self._node_args()], env=env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.sessions[name] = proc.pid  # a session leader's pid is the session id its daemons keep
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start ({name}) failed:\n{out[-3000:]}")

    def start(self) -> "LoopbackCluster":
        self._start("head", ["--head", "--port", str(self.port), "--include-dashboard", "false", "--dashboard-port",
                             str(_free_port()), "--ray-client-server-port", str(_free_port()), "--temp-dir", self.temp])
        self._start("worker", ["--address", self.address])
        return self

    def kill(self, name: str) -> None:
        """SIGKILL every process of a node (raylet, agents, its workers): the node is lost, as a machine would be."""
        for pid in _session_processes(self.sessions[name]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while _session_processes(self.sessions[name]) and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        for name in self.sessions:
            self.kill(name)
        subprocess.run(["rm", "-rf", self.temp], check=False)

    def driver_env(self, server_url: str) -> dict:
        """The driver (the CLI) alone knows the endpoint: its URL and key."""
        env = {k: v for k, v in os.environ.items() if k not in NODE_ENV_DROP}
        return env | {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "disabled", "OPENAI_BASE_URL": server_url,
                      "OPENAI_API_KEY": KEY}


@pytest.fixture(scope="module")
def cluster():
    if not Path(RAY).is_file():
        pytest.skip(f"no `ray` command next to {sys.executable}")
    c = LoopbackCluster()
    try:
        yield c.start()
    finally:
        c.stop()
        assert not any(_session_processes(sid) for sid in c.sessions.values())


@pytest.fixture(scope="module")
def server():
    with OpenAIServer(pipeline_responder, api_keys={KEY}) as srv:  # a worker without the key gets 401s
        yield srv


@pytest.fixture(scope="module")
def local(server, tmp_path_factory):
    """The shipped recipe with the local executor: the reference bytes and spending."""
    tmp = tmp_path_factory.mktemp("local")
    saved = {k: os.environ.get(k) for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "SPA_VL_MODEL")}
    os.environ.update(OPENAI_BASE_URL=server.url, OPENAI_API_KEY=KEY)
    os.environ.pop("SPA_VL_MODEL", None)
    try:
        server.reset()
        summary = generate("pipeline", tmp / "run", limit=LIMIT, progress=False)
        served = server.stats()["ok"]
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    build(tmp / "run", tmp / "out", progress=False)
    assert summary["units"]["done"] == LIMIT and summary["requests"]["sent"] == served
    return {"summary": summary, "out": tmp / "out", "served": served}


def _node_waits_on(sid: int, server) -> bool:
    """Whether a process of the node (session ``sid``) has a request held by the server's pause."""
    import psutil

    ports = {port for _, port in server.held_peers()}
    pids = set(_session_processes(sid))
    return any(c.pid in pids and c.laddr and c.laddr.port in ports for c in psutil.net_connections("tcp"))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _generate_cmd(run: Path) -> list[str]:
    return [sys.executable, "-m", "builder.cli", "generate", "pipeline", "--run_dir", str(run), "--executor", "ray",
            "--limit", str(LIMIT), "--progress", "False"]


def test_shipped_recipe_on_a_two_node_cluster_builds_what_the_local_executor_builds(cluster, server, local, tmp_path):
    server.reset()
    done = subprocess.run(_generate_cmd(tmp_path / "run"), cwd=tmp_path, env=cluster.driver_env(server.url),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    stats = server.stats()
    assert stats["unauthorized"] == 0  # every worker sent the driver's key, though no node has one
    assert max(server.served().values()) == 1  # no request answered twice
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["executor"] == "ray" and summary["units"]["done"] == LIMIT
    assert summary["requests"]["sent"] == stats["ok"] == local["served"]
    assert summary["cost_usd"] == local["summary"]["cost_usd"]
    for path in (tmp_path / "run").rglob("*"):  # neither the key nor the URL reached the run directory
        if path.is_file():
            assert KEY.encode() not in path.read_bytes() and server.url.encode() not in path.read_bytes()
    assert KEY not in done.stdout + done.stderr
    for path in Path(cluster.temp).rglob("*"):  # nor any of the cluster's logs
        if path.is_file() and not path.is_symlink() and path.suffix in (".log", ".out", ".err", ".txt", ".json"):
            assert KEY.encode() not in path.read_bytes(), path
    build(tmp_path / "run", tmp_path / "out", progress=False)
    assert _files(tmp_path / "out") == _files(local["out"])


def test_losing_the_worker_node_mid_run_sends_nothing_twice_and_counts_everything(cluster, server, local, tmp_path):
    """The server holds every request after the first half; the worker node is killed while it waits on
    some; Ray re-runs its chunk on the head, which finds the replies already stored."""
    half = local["served"] // 2
    server.pause_after = half
    server.reset()
    proc = subprocess.Popen(_generate_cmd(tmp_path / "run"), cwd=tmp_path, env=cluster.driver_env(server.url),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.wait_for_ok(half, timeout=300), proc.communicate(timeout=30)
        deadline = time.monotonic() + 120
        while not _node_waits_on(cluster.sessions["worker"], server):  # a task on the worker node is mid-unit
            assert time.monotonic() < deadline and proc.poll() is None, "the worker node never sent a held request"
            time.sleep(0.2)
        time.sleep(1.0)  # the workers have the replies the server sent; let them store them
        cluster.kill("worker")
        assert not _session_processes(cluster.sessions["worker"])
    finally:
        server.pause_after = None
        server.resume()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    stats = server.stats()
    assert stats["dropped"] >= 1  # the dead node's requests in flight were never answered...
    assert max(server.served().values()) == 1  # ...and what was answered was never asked again
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["units"]["done"] == LIMIT and summary["units"]["failed"] == 0
    # counted where the replies are stored: what the dead worker paid for is not lost
    assert summary["requests"]["sent"] == stats["ok"] == local["served"]
    assert summary["cost_usd"] == local["summary"]["cost_usd"] and summary["tokens"] == local["summary"]["tokens"]
    build(tmp_path / "run", tmp_path / "out", progress=False)
    assert _files(tmp_path / "out") == _files(local["out"])


def test_a_config_error_in_a_worker_stops_the_run_with_the_local_one_line(cluster, server, tmp_path):
    """A local model that does not load fails every request the same way: on Ray it used to become one failed
    unit per chunk with a traceback header; now the run stops, exit 2, with the line the local run prints."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # a folder, but no model in it
    cfg = write_config(tmp_path / "run.yaml", server.url, limit_keys={"api_key_env": "OPENAI_API_KEY"},
                       keywords={"model": None})
    data = yaml.safe_load(cfg.read_text())
    data["models"]["broken"] = {"backend": "transformers", "path": "broken-model"}
    data["questions"]["describer"] = "broken"
    cfg.write_text(yaml.safe_dump(data))
    lines = {}
    for executor in ("local", "ray"):
        cmd = [sys.executable, "-m", "builder.cli", "generate", str(cfg), "--run_dir", str(tmp_path / executor),
               "--executor", executor, "--limit", "2", "--progress", "False"]
        done = subprocess.run(cmd, cwd=tmp_path, env=cluster.driver_env(server.url), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
        lines[executor] = done.stderr.strip().splitlines()
    assert len(lines["local"]) == 1 and lines["ray"] == lines["local"]
    assert lines["local"][0].startswith(f"spa-vl: error: {cfg}: field models.broken.path: cannot load the model")
