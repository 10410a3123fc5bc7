"""Run by test_distributed.py under ``accelerate launch --num_processes 2``: what PPO does across processes.

Each process whitens its own advantages with PPO's reduce (sums over processes) and takes its share of
one shared prompt order; every process writes what it got to ``OUT/rank-N.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from training.ppo import prompt_share
from training.ppo_core import whiten

# Each process's advantages and response masks: different lengths, different scales.
DATA = {
    0: ([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -99.0, -99.0]], [[1, 1, 1, 0], [1, 1, 0, 0]]),
    1: ([[10.0, -3.0, 77.0, 77.0], [0.5, 6.0, 7.0, 8.0]], [[1, 1, 0, 0], [1, 1, 1, 1]]),
}


def main(out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    x, mask = (torch.tensor(t, dtype=torch.float32) for t in DATA[rank])
    white = whiten(x, mask, reduce=lambda t: accelerator.reduce(t, "sum"))
    order = torch.randperm(16, generator=torch.Generator().manual_seed(42)).tolist()[:8]
    share = prompt_share(order, rank, accelerator.num_processes)
    (out / f"rank-{rank}.json").write_text(json.dumps({"white": white.tolist(), "share": share,
                                                       "processes": accelerator.num_processes}))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
