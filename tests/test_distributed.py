"""`accelerate launch` with two processes (DDP over gloo on the CPU): DPO, the reward model and PPO.

The same code runs one process per GPU; here two CPU processes prove what only several processes
exercise: data prepared on the main process first, gathered metrics, one summary line, one save; for
PPO, each process samples its own share of the prompts, advantages are whitened over both processes'
response tokens, and the batch is the same as on one process.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

PROCESSES = 2


@pytest.fixture(scope="module")
def tiny(tiny_llava_data, tmp_path_factory):
    return {**tiny_llava_data, "root": tmp_path_factory.mktemp("ddp")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, config: str, out: Path, tiny: dict, *extra: str) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 -m builder.cli train KIND ...`` (the configs say use_cpu)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(PROCESSES), "--num_machines", "1",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "builder.cli", "train", kind, "--config", config,
           "--model", tiny["model"], "--dataset", tiny["data"], "--output_dir", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _summary_lines(proc, kind: str) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith(f"train {kind}:")]


def test_dpo_on_two_processes(tiny):
    out = tiny["root"] / "dpo"
    proc = launch("dpo", "tiny-dpo", out, tiny, "--max_steps", "2")
    assert len(_summary_lines(proc, "dpo")) == 1  # the main process alone prints it
    record = json.loads((out / "spa_vl_train.json").read_text())
    assert record["processes"] == PROCESSES
    # 2 steps × 2 pairs per device × 2 processes
    assert record["result"]["steps"] == 2 and record["result"]["samples"] == 2 * 2 * PROCESSES
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    # data prepared and logged once, by the main process
    assert sum(line.startswith("data: ") for line in proc.stderr.splitlines()) == 1


@pytest.fixture(scope="module")
def rm_run(tiny):
    out = tiny["root"] / "rm"
    return out, launch("rm", "tiny-rm", out, tiny)


def test_rm_on_two_processes(rm_run):
    out, proc = rm_run
    assert len(_summary_lines(proc, "rm")) == 1
    result = json.loads((out / "spa_vl_train.json").read_text())["result"]
    assert result["steps"] == 4 and result["samples"] == 4 * 4 * PROCESSES  # 4 steps × 4 pairs × 2 processes
    assert 0.0 <= result["metrics"]["eval_accuracy"] <= 1.0  # gathered over both processes' share
    assert (out / "value_head.safetensors").is_file() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_ppo_on_two_processes(tiny, rm_run):
    rm_out, _ = rm_run
    out = tiny["root"] / "ppo"
    proc = launch("ppo", "tiny-ppo", out, tiny, "--reward_model", str(rm_out))
    assert len(_summary_lines(proc, "ppo")) == 1
    record = json.loads((out / "spa_vl_train.json").read_text())
    result = record["result"]
    assert record["processes"] == PROCESSES
    # 2 iterations × 4 prompts, all processes together: the batch of a one-process run
    assert result["steps"] == 2 and result["samples"] == 2 * 4
    assert "2 on each of 2 processes" in proc.stderr and "1 per forward x 1 accumulation x 2 processes" in proc.stderr
    for key in ("reward", "kl", "policy_loss", "value_loss"):
        assert isinstance(result["metrics"][key], float) and math.isfinite(result["metrics"][key]), key
    assert (out / "adapter_model.safetensors").is_file()


def test_ppo_whitens_over_all_processes_and_each_takes_its_share(tmp_path):
    """Two processes whiten different advantages with PPO's reduce: together they are whitened as one batch
    (over response tokens only); the prompt shares of one shared order are disjoint and cover it."""
    import torch

    from ddp_probe import DATA

    from training.ppo_core import whiten

    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(PROCESSES), "--num_machines", "1",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", str(Path(__file__).with_name("ddp_probe.py")), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(PROCESSES)]
    assert all(g["processes"] == PROCESSES for g in got)
    x = torch.cat([torch.tensor(DATA[r][0]) for r in range(PROCESSES)])
    mask = torch.cat([torch.tensor(DATA[r][1], dtype=torch.float32) for r in range(PROCESSES)])
    expected = whiten(x, mask)  # one process holding both batches
    torch.testing.assert_close(torch.cat([torch.tensor(g["white"]) for g in got]), expected)
    mine = torch.tensor(got[0]["white"])[torch.tensor(DATA[0][1]).bool()]
    assert mine.mean().abs() > 0.1  # each process alone is not zero-mean: the statistics are global
    order = torch.randperm(16, generator=torch.Generator().manual_seed(42)).tolist()[:8]
    assert got[0]["share"] + got[1]["share"] == order and not set(got[0]["share"]) & set(got[1]["share"])
