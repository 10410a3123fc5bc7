"""The `spa-vl` command line (python-fire). Every command's --help shows an example.

One class of commands per job, joined in ``CLI``: ``data`` (taxonomy, fixture, import_upstream),
``generation`` (generate, build, configs), ``release`` (validate, card, version, publish, pull, review),
``training`` (train, evaluate), and ``demo`` here. ``main`` checks the whole command line against the
command's signature (``command_line``), lets fire call the command, and turns a failure into one line
and an exit code (``failures``): 0 success, 1 a check or job failed, 2 bad usage or bad input::

    main(["publish", "out/spa_vl", "my-org/SPA-VL", "--dry_run"])    # what `spa-vl publish ...` runs
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import fire

from builder.cli import command_line
from builder.cli.data import DataCommands
from builder.cli.failures import Terminated, environment_failure, hub_failure, on_sigterm
from builder.cli.generation import GenerationCommands
from builder.cli.release import ReleaseCommands
from builder.cli.training import TrainingCommands
from builder.errors import DataError

__all__ = ["CLI", "main"]


class CLI(DataCommands, GenerationCommands, ReleaseCommands, TrainingCommands):
    """spa-vl: the SPA-VL safety preference dataset, its tooling and its trainers.

    Examples:
      spa-vl taxonomy
      spa-vl fixture out/fx --rows_per_domain 300
      spa-vl import_upstream sqrti/SPA-VL spa_vl
      spa-vl configs
      spa-vl generate pipeline --run_dir runs/r1 --limit 12
      spa-vl build runs/r1 out/spa_vl_v2
      spa-vl validate out/spa_vl_v2
      spa-vl card out/spa_vl_v2
      spa-vl version out/spa_vl_v2 --bump minor
      spa-vl publish out/spa_vl_v2 my-org/SPA-VL --dry_run
      spa-vl pull my-org/SPA-VL copy --revision v0.2.0
      spa-vl train dpo --config llava-1.5-7b-lora --dataset out/spa_vl
      spa-vl evaluate runs/dpo out/spa_vl --judge judge --out runs/eval
      spa-vl demo demo_out
    """

    def demo(self, out: str = "demo_out"):
        """Run the project end to end offline: fixture -> import -> dataset folder -> load every config.

        Example:
          spa-vl demo demo_out

        Args:
          out: the folder to write into (created if absent; the demo's own subfolders in it are replaced).
        """
        from builder.dev.demo import run_demo

        run_demo(Path(out))


def main(argv: list[str] | None = None) -> None:
    """The `spa-vl` console script: check the whole command line, then let fire call the command."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread (an embedding caller): leave the signals alone
        previous = None
    try:
        _run(argv)
    except BrokenPipeError:  # `spa-vl --help | head -1`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(141)
    except Terminated:
        print("spa-vl: stopped by SIGTERM", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print("spa-vl: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str]) -> None:
    try:
        if argv and argv[0] == "--version":
            print(f"spa-vl {_version()}")
            return
        command, values, extra = command_line.check(CLI, argv)
        fire.Fire(CLI, command=command.fire_argv(values, extra), name="spa-vl")
    except command_line.HelpRequested as h:
        sys.stdout.write(h.command.help_text() if h.command else command_line.overview(CLI))
        sys.stdout.flush()
    except DataError as e:
        print(f"spa-vl: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # the Hub or the network: exit 1 (the job failed); the disk: exit 2
        message = hub_failure(e)
        if message is not None:
            print(f"spa-vl: {message}", file=sys.stderr)
            sys.exit(1)
        message = environment_failure(e)
        if message is None:
            raise
        print(f"spa-vl: error: {message}", file=sys.stderr)
        sys.exit(2)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spa-vl")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"

