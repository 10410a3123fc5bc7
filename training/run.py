"""The plumbing of one accelerate-driven run (the reward model and PPO): the accelerator, logging on the
main process, and the atomic save of model, run record (``spa_vl_train.json``) and model card.

    accelerator, say = make_accelerator(cfg, log)      # say(): stderr (or ``log``), main process only
    save_run(accelerator, cfg, write, result)           # write(folder) writes the model files
    write_record(folder, cfg, result, processes=2)      # spa_vl_train.json alone (DPO: trl saves the model)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from builder.files import atomic_write, swap_into_place, sweep_stale, temp_sibling
from training.card import write_model_card

RECORD_FILE = "spa_vl_train.json"
SECRET_HINTS = ("token", "secret", "password", "api_key")  # never written to the record
STALE_FILES = {RECORD_FILE, "reward_model.json", "value_head.safetensors", "README.md", "adapter_config.json",
               "adapter_model.safetensors", "adapter_model.bin", "config.json", "generation_config.json",
               "model.safetensors", "model.safetensors.index.json"}


def mixed_precision(cfg) -> str:
    """``bf16`` on a GPU that supports it (``bf16: auto``) or when asked; else ``no``."""
    if cfg.use_cpu or not torch.cuda.is_available():
        return "no"
    bf16 = cfg.bf16
    if bf16 == "auto":
        bf16 = torch.cuda.is_bf16_supported()
    return "bf16" if bf16 else "no"


def make_accelerator(cfg, log=None, **kwargs):
    """An ``accelerate.Accelerator`` for the run (one process, or as many as ``accelerate launch`` starts),
    tracking to TensorBoard or trackio when asked for and installed, and ``say``: ``log`` on the main
    process only (stderr by default)."""
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available, is_trackio_available

    report = cfg.report_to
    installed = {"tensorboard": is_tensorboard_available(), "trackio": is_trackio_available()}
    log_with = report if installed.get(report) else None
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg), cpu=cfg.use_cpu, log_with=log_with,
                              project_dir=cfg.output_dir, **kwargs)
    say = (log or _stderr) if accelerator.is_main_process else (lambda message: None)
    if report != "none" and not log_with:
        say(f"report_to={report}, but {report} is not installed: logging to the console only")
    if log_with:
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.to_dict().items()}
        accelerator.init_trackers(f"spa-vl-{cfg.kind}", config=flat)
    return accelerator, say


def save_run(accelerator, cfg, write, result=None, *, folder=None, pairs: int | None = None) -> None:
    """Write the run's model with ``write(folder)``, then ``spa_vl_train.json`` (main process only); with a
    ``result`` (the final save) also the model card, ``README.md``.

    Files are written to ``.OUT.tmp-PID`` beside the output folder (``builder.files``: a killed run's is swept
    by the next) and moved into it when all are written, ``spa_vl_train.json`` last: its presence marks a
    complete save. The model files of an earlier save there are removed first (a stale adapter_config.json
    would make a full model load as an adapter); anything else (checkpoints, tracker logs) is kept.
    """
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out = Path(folder or cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for old in out.iterdir():
            if old.is_file() and (old.name in STALE_FILES or old.name.startswith("model-")):
                old.unlink()
        sweep_stale(out)
        tmp = temp_sibling(out)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            write(tmp)
            if result is not None:
                write_model_card(tmp, cfg, result, pairs=pairs)
            write_record(tmp, cfg, result, processes=accelerator.num_processes)
            for f in sorted(tmp.iterdir(), key=lambda p: p.name == RECORD_FILE):
                dest = out / f.name
                if f.is_dir() or dest.is_dir():
                    swap_into_place(f, dest)
                else:
                    os.replace(f, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()


def write_record(folder: Path, cfg, result=None, *, processes: int = 1, data: dict | None = None) -> Path:
    """``folder/spa_vl_train.json``: the resolved settings (nothing secret-looking), the result, the number of
    processes, the library versions and, for DPO, what became of the data (``data``)."""
    config = {k: v for k, v in cfg.to_dict().items() if not any(h in k.lower() for h in SECRET_HINTS)}
    record = {"kind": cfg.kind, "config": config, "result": asdict(result) if result else None,
              "processes": processes, "versions": _versions()}
    if data is not None:
        record["data"] = data
    path = Path(folder) / RECORD_FILE
    atomic_write(path, json.dumps(record, indent=2, default=str) + "\n")
    return path


def _versions() -> dict:
    import accelerate
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "peft": peft.__version__}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
