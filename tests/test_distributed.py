"""`accelerate launch` with two processes (DDP over gloo on the CPU): DPO, the reward model and PPO.

The same code runs one process per GPU; here two CPU processes prove what only several processes
exercise: data prepared on the main process first, gathered metrics, one summary line, one save.
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
    assert (out / "value_head.safetensors").is_file() and not list(out.glob(".partial-*"))


def test_ppo_on_two_processes(tiny, rm_run):
    rm_out, _ = rm_run
    out = tiny["root"] / "ppo"
    proc = launch("ppo", "tiny-ppo", out, tiny, "--reward_model", str(rm_out))
    assert len(_summary_lines(proc, "ppo")) == 1
    result = json.loads((out / "spa_vl_train.json").read_text())["result"]
    assert result["steps"] == 2 and result["samples"] == 2 * 4 * PROCESSES  # 2 iterations × 4 prompts × 2
    for key in ("reward", "kl", "policy_loss", "value_loss"):
        assert isinstance(result["metrics"][key], float) and math.isfinite(result["metrics"][key]), key
    assert (out / "adapter_model.safetensors").is_file()
