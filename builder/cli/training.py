"""`spa-vl` commands that train on a dataset folder and evaluate the result."""

from __future__ import annotations

import inspect
import os
import sys

from builder.errors import DataError


class TrainingCommands:
    """DPO, the reward model and PPO; HarmEval and HelpEval."""

    def train(self, kind: str | None = None, config: str | None = None, model: str | None = None, dataset: str | None = None,
              config_name: str | None = None, max_steps: int | None = None, output_dir: str | None = None,
              **overrides):
        """Train on SPA-VL: dpo (trl DPOTrainer), rm (reward model) or ppo (our PPO, value model from the RM).

        The YAML holds the run's settings with the paper's values as defaults; any setting can be
        overridden as --key value (train dpo also takes any trl.DPOConfig field); a bad value or an
        unknown key is a one-line error naming it. Vision tower frozen, projector trained; `lora:` in
        the YAML trains LoRA adapters on every linear layer of the language model instead of the whole
        model. Several GPUs: accelerate launch -m builder.cli train dpo --config ...

        Example:
          spa-vl train dpo --config training/configs/llava-1.5-7b-lora.yaml --dataset out/spa_vl --config_name malicious_use
          spa-vl train rm --config training/configs/llava-1.5-7b-rm.yaml --dataset out/spa_vl --output_dir runs/rm
          spa-vl train ppo --config training/configs/llava-1.5-7b-ppo-lora.yaml --reward_model runs/rm --max_steps 100

        Args:
          kind: dpo, rm or ppo.
          config: a YAML file (or the name of one in training/configs/, e.g. llava-1.5-7b-lora).
          model: a Hub id or local folder of an image-text-to-text model.
          dataset: a spa-vl dataset folder or Hub repo id.
          config_name: a harm domain (e.g. malicious_use) or default (all domains).
          max_steps: stop after this many optimizer steps (PPO: iterations); -1 for whole epochs.
          output_dir: where the model, processor and spa_vl_train.json are written.
          overrides: any other setting of the YAML, e.g. --learning_rate 1e-5 --beta 0.2 --max_samples 10000.
        """
        from training.config import KINDS, load_config

        if kind is None or overrides.pop("help", False) or overrides.pop("h", False):
            # fire passes --help on to a command that takes --key value overrides: show the help ourselves
            doc = inspect.cleandoc(TrainingCommands.train.__doc__)
            print("spa-vl train KIND [--config YAML] [--key value ...]\n\n" + doc)
            return
        if kind not in KINDS:
            raise DataError(f"unknown trainer {kind!r}; expected one of {', '.join(KINDS)}", field="kind")
        cfg = load_config(config, kind, model=model, dataset=dataset, config_name=config_name, max_steps=max_steps,
                          output_dir=output_dir, **overrides)
        if kind == "dpo":
            from training.dpo import train_dpo as run
        elif kind == "rm":
            from training.reward import train_rm as run
        else:
            from training.ppo import train_ppo as run
        result = run(cfg)
        if os.environ.get("RANK", "0") == "0":  # under accelerate launch / torchrun, one summary line
            print(result.line())

    def evaluate(self, model: str, dataset: str, judge: str, out: str, reference: str | None = None,
                 batch_size: int = 8, max_new_tokens: int = 256, limit: int | None = None, domains: str | None = None,
                 seed: int = 0, max_failure_rate: float | None = None, progress: bool = True):
        """Score a model on HarmEval (test/harm: unsafe-response rate, harm score) and HelpEval (test/help: win rate).

        Answers are generated in batches and saved as they come (a re-run resumes); the judge is any
        OpenAI-compatible endpoint or a local model from JUDGE.yaml (harm_format: json, md-judge-v0.1 or
        md-judge-v0.2, the paper's MD-Judge), its calls cached. Prints the results with 95% confidence
        intervals (USR: Wilson; harm score and win rate: bootstrap over questions, --seed) and writes
        OUT/metrics.json, OUT/metrics.md and OUT/metrics_by_category.png. Exits 1 when the judge failed on
        more than max_failure_rate of a benchmark's rows (or on all of them).

        Example:
          spa-vl evaluate runs/dpo out/spa_vl --judge training/configs/judge.yaml --out runs/eval
          spa-vl evaluate llava-hf/llava-1.5-7b-hf my-org/SPA-VL --judge judge.yaml --out runs/base --reference answers.jsonl
          spa-vl evaluate runs/dpo out/spa_vl --judge judge.yaml --out runs/eval --reference gpt-4o --limit 20

        Args:
          model: a Hub id, local model folder or LoRA adapter folder.
          dataset: a spa-vl dataset folder or Hub repo id (its `test` config is used).
          judge: the judge YAML (models, harm_judge, harm_format, help_judge, reference); see training/configs/judge.yaml.
          out: the output folder.
          reference: the HelpEval reference: a model entry of the judge file (e.g. gpt-4o), a model (its answers are generated) or a .jsonl of {id, answer}.
          batch_size: generation batch size.
          max_new_tokens: longest answer generated (also for a reference model entry).
          limit: evaluate the first N questions of each split only (a positive integer).
          domains: only these harm domains, comma-separated config names or class1 labels (e.g. malicious_use,privacy).
          seed: the bootstrap's seed for the confidence intervals.
          max_failure_rate: the largest share of failed judge rows per benchmark that still passes (default: the judge file's, 0.05).
          progress: show progress bars.
        """
        from training.evaluate import evaluate
        from training.report import results_table, summary_line

        metrics = evaluate(model, dataset, judge, out, reference=reference, batch_size=batch_size,
                           max_new_tokens=max_new_tokens, limit=limit, domains=domains, seed=seed,
                           max_failure_rate=max_failure_rate, progress=progress)
        print(results_table(metrics))
        print(summary_line(metrics))
        if not metrics["judge_failures"]["ok"]:
            for problem in metrics["judge_failures"]["problems"]:
                print(f"spa-vl evaluate: failed: {problem}; see {out}/judgments.jsonl", file=sys.stderr)
            sys.exit(1)
