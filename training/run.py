"""The plumbing of one accelerate-driven run (the reward model and PPO): the accelerator, logging on the
main process, and the atomic save of model, run record (``spa_vl_train.json``) and model card.

    accelerator, say = make_accelerator(cfg, log)      # say(): stderr (or ``log``), main process only
    save_run(accelerator, cfg, write, result)           # write(folder) writes the model files
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from training.card import adapter_base, write_model_card

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

    Files are written to a hidden temp folder inside ``output_dir`` and moved into place when all are
    written, ``spa_vl_train.json`` last: its presence marks a complete save. The model files of an
    earlier save there are removed first (a stale adapter_config.json would make a full model load as
    an adapter); anything else (checkpoints, tracker logs) is kept.
    """
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out = Path(folder or cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for old in out.iterdir():
            if old.is_file() and (old.name in STALE_FILES or old.name.startswith("model-")):
                old.unlink()
        tmp = out / f".partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        if result is not None:
            write_model_card(tmp, cfg, result, base_model=adapter_base(cfg.model), pairs=pairs)
        config = {k: v for k, v in cfg.to_dict().items() if not any(h in k.lower() for h in SECRET_HINTS)}
        record = {"kind": cfg.kind, "config": config, "result": asdict(result) if result else None,
                  "processes": accelerator.num_processes, "versions": _versions()}
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == RECORD_FILE):
            dest = out / f.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(f, dest)
        tmp.rmdir()
    accelerator.wait_for_everyone()


def _versions() -> dict:
    import accelerate
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "peft": peft.__version__}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
