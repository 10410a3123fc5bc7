"""HarmEval and HelpEval: score a VLM on the `test` config of a spa-vl dataset with a model judge.

    metrics = evaluate("runs/dpo", "out/spa_vl", "training/configs/judge.yaml", "runs/eval",
                       reference="llava-hf/llava-1.5-7b-hf", seed=0)
    print(results_table(metrics)); print(summary_line(metrics))          # training.report
    metrics["harm"]["usr"], metrics["harm"]["usr_ci"], metrics["help"]["win_rate"], metrics["judge_failures"]["ok"]

1. **Answers.** The model (a Hub id, a local folder, or a PEFT LoRA adapter folder whose
   ``adapter_config.json`` names its base model) answers every question of ``test/harm`` and
   ``test/help`` with the image, through its own chat template, greedily, in left-padded batches
   (:class:`builder.vlm.local.LocalVLM`, the pipeline's local backend).
   Each finished batch is appended to ``OUT/answers.jsonl`` (``{"id", "split", "answer", "model"}``,
   flushed and fsynced), so an interrupted run resumes where it stopped and a re-run generates nothing.
2. **Reference.** HelpEval is a win rate against a reference, one of: a model entry of the judge file
   (e.g. ``gpt-4o``, as the paper's GPT-4V; asked through the judge's router, cached and costed), a
   model (Hub id or folder) whose answers are generated like the model's, or a ``.jsonl`` of
   ``{"id", "answer"}``. Generated reference answers go to ``OUT/reference_answers.jsonl``.
3. **Judge** (:mod:`training.judges`, :mod:`training.judge_formats`). Every judge call goes through
   :class:`builder.generate.router.ModelRouter` (any OpenAI-compatible endpoint, with its limits, retries, cost
   meters, and a request cache in ``OUT/judge_cache.sqlite``: a re-run sends nothing that already
   succeeded), or runs in-process (``backend: transformers``): a local VLM scored by choice
   probabilities, or, for ``harm_format: md-judge-v0.1``, MD-Judge as a text-only causal LM.

   - HarmEval: the harm judge labels each answer unsafe or safe, with a harm score on its format's scale
     (``json``: 1-10, the default judge prompt, image included; ``md-judge-v0.2``: 1-5; ``md-judge-v0.1``:
     none). **USR** = the share of answers judged unsafe, in [0, 1] (the paper prints %).
   - HelpEval: the help judge compares the model's answer with the reference twice, with the answers
     swapped, which cancels a constant position bias. A question scores the mean of its two verdicts
     (1 win, 0.5 tie, 0 loss); **win_rate** = the mean question score (0.5: as good as the reference).
   - A call that fails for good, a reply that cannot be read and a score outside the scale count as
     ``failed`` and are left out of the rates. When a benchmark's failed share passes
     ``max_failure_rate`` (or every row failed) ``metrics["judge_failures"]["ok"]`` is false and
     `spa-vl evaluate` exits 1.
4. **Figures** (:mod:`training.metrics`): USR with a 95% Wilson interval, harm score and win rate with
   95% percentile-bootstrap intervals (``seed``), overall, per domain ``class1`` and per category ``class2``.
5. **Output** (:mod:`training.report`, each file written to a temp name, then renamed): ``metrics.json``
   (the figures, the judge with its endpoints but never a key, cost, and what makes the run repeatable:
   spa-vl's version, the dataset's manifest hash or Hub commit, model, reference, seed, start and end
   time), ``metrics.md``, ``metrics_by_category.png`` and ``judgments.jsonl`` (one verdict per row).

Bad input (a bad option, no ``test`` config, a judge file with an unknown key or an undefined model, no
reference) raises :class:`builder.errors.DataError` naming the file or option, before any model is loaded.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from builder.errors import DataError
from builder.files import file_digest
from builder.generate.request_cache import RequestCache
from builder.vlm.chat import prompt_messages
from builder.vlm.local import LocalVLM
from training.judge_config import JudgeConfig, load_judge_config
from training.judges import JudgeRouter, judge_all
from training.metrics import cost, failure_check, harm_metrics, help_metrics
from training.report import write_outputs

SPLITS = ("harm", "help")
UNLABELLED = "(unlabelled)"


# --- the test questions -------------------------------------------------------------------------------
def _domain_labels(domains: list[str] | None, rows: dict[str, list[dict]], dataset: str) -> set[str] | None:
    if not domains:
        return None
    from builder.format.manifest import folder_taxonomy
    from builder.taxonomy import Taxonomy

    tax = folder_taxonomy(dataset) if Path(dataset).is_dir() else Taxonomy.load()  # a folder's labels are its own
    present = {r["class1"] for split_rows in rows.values() for r in split_rows}
    labels = set()
    for d in domains:
        if d in tax.slugs:
            labels.add(tax.domain(d).label)
        elif d in present or tax.slug_for(d):
            labels.add(d)
        else:
            raise DataError(f"unknown domain {d!r}; use a config name ({', '.join(tax.slugs)}) or a class1 label",
                            file=str(dataset), field="domains")
    return labels


def load_test_rows(dataset: str, *, limit: int | None = None, domains: list[str] | None = None) -> dict[str, list[dict]]:
    """``{"harm": rows, "help": rows}`` from the ``test`` config; each row has ``id``, ``question``,
    ``class1..3``, ``image`` (the encoded bytes) and ``sha256``. A dataset without ids (the upstream
    ``sqrti/SPA-VL`` layout) gets the project's row id, the hash of image and question."""
    import datasets

    import spa_vl
    from builder.format.schema import image_sha256, row_id

    dataset = str(dataset)
    try:
        dd = spa_vl.load("test", source=dataset, keep_in_memory=True)
    except (ValueError, OSError) as first:
        try:  # another layout with a `test` config (the upstream sqrti/SPA-VL repo or a copy of it); a cache of its
            # own: `datasets` keys a local folder's cache by its card and file names, so a shared cache can
            # hand back another folder's rows
            with tempfile.TemporaryDirectory(prefix="spa-vl-test-") as cache:
                dd = datasets.load_dataset(dataset, "test", cache_dir=cache, keep_in_memory=True)
        except Exception as second:  # noqa: BLE001 - both ways failed: say why, as bad input
            raise DataError(f"no `test` config with splits harm and help could be loaded ({first}; {second})"[:800],
                            file=dataset, field="test") from None
    out = {}
    for split in SPLITS:
        if split not in dd:
            raise DataError(f"the `test` config has no {split!r} split (it has {sorted(dd)})", file=dataset,
                            field=f"test/{split}")
        ds = dd[split]
        missing = {"image", "question"} - set(ds.column_names)
        if missing:
            raise DataError(f"missing column(s) {sorted(missing)}", file=dataset, field=f"test/{split}")
        ds = ds.cast_column("image", datasets.Image(decode=False))
        rows = []
        for i, r in enumerate(ds):
            img = r["image"] or {}
            data = img.get("bytes")
            if data is None and img.get("path") and os.path.isfile(img["path"]):
                data = Path(img["path"]).read_bytes()
            if not data or not isinstance(r["question"], str) or not r["question"].strip():
                raise DataError("a row needs an image and a question", file=dataset, row=i, field=f"test/{split}")
            sha = image_sha256(data)
            rows.append({"id": r.get("id") or row_id(sha, r["question"]), "question": r["question"],
                         "class1": r.get("class1") or UNLABELLED, "class2": r.get("class2") or UNLABELLED,
                         "class3": r.get("class3") or "", "image": data, "sha256": sha})
        out[split] = rows
    keep = _domain_labels(domains, out, dataset)
    for split in SPLITS:
        rows = [r for r in out[split] if keep is None or r["class1"] in keep]
        out[split] = rows if limit is None else rows[:limit]
    return out


# --- answers ----------------------------------------------------------------------------------------
def model_label(model: str) -> str:
    """How answers name their model: a local folder as its absolute path, a Hub id as given."""
    return str(Path(model).resolve()) if os.path.isdir(model) else str(model)


def read_answers(path: Path, model: str | None = None) -> dict[tuple[str, str], str]:
    """(split, id) → answer from an answers file; a last line cut short by a crash is dropped (and cut
    from the file, so appends stay line-aligned). With ``model``, every record must be that model's."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
        data = data[:end]
    out = {}
    for i, line in enumerate(data.decode("utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            key, answer = (str(rec["split"]), str(rec["id"])), rec["answer"]
        except (ValueError, KeyError, TypeError):
            raise DataError("not an answer record {id, split, answer, model}", file=str(path), row=i) from None
        if not isinstance(answer, str):
            raise DataError("the answer must be a string", file=str(path), row=i, field="answer")
        if model is not None and rec.get("model") != model:
            raise DataError(f"holds answers of {rec.get('model')!r}, not {model!r}: use another output folder",
                            file=str(path), row=i, field="model")
        out[key] = answer
    return out


def generate_answers(model: str, rows: dict[str, list[dict]], path: Path, *, batch_size: int = 8,
                     max_new_tokens: int = 256, device: str | None = None, progress: bool = True,
                     role: str = "model") -> dict[tuple[str, str], str]:
    """(split, id) → answer for every row; answers already in ``path`` are kept, the rest generated in
    batches and appended as each batch finishes. Nothing is loaded when nothing is left to answer."""
    if batch_size < 1 or max_new_tokens < 1:
        raise DataError("batch_size and max_new_tokens must be positive", field="batch_size")
    label = model_label(model)
    done = read_answers(path, label)
    todo, seen = [], set()
    for split, split_rows in rows.items():
        for r in split_rows:
            if (split, r["id"]) not in done and (split, r["id"]) not in seen:
                seen.add((split, r["id"]))
                todo.append((split, r))
    if not todo:
        return done
    total = len(todo) + sum(1 for split, split_rows in rows.items() for r in split_rows if (split, r["id"]) in done)
    vlm = LocalVLM(model, device=device, role=role)  # its own, not the pipeline's shared one: closed at the end
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "a", encoding="utf-8") as f, tqdm(total=total, initial=total - len(todo), unit="row",
                                                            desc=f"{role} answers", disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                texts = vlm.generate_batch([prompt_messages(r["question"]) for _, r in batch],
                                           [[Image.open(io.BytesIO(r["image"]))] for _, r in batch],
                                           max_new_tokens=max_new_tokens)
                f.write("".join(json.dumps({"id": r["id"], "split": split, "answer": t, "model": label},
                                           ensure_ascii=False) + "\n" for (split, r), t in zip(batch, texts)))
                f.flush()
                os.fsync(f.fileno())
                done.update({(split, r["id"]): t for (split, r), t in zip(batch, texts)})
                bar.update(len(batch))
    finally:
        vlm.close()
    return done


def read_reference_file(path: str, help_rows: list[dict], *, file: str) -> dict[str, str]:
    """id → reference answer from a .jsonl of {id, answer}; every HelpEval question must have one."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"reference file not found: {path}", file=file, field="reference")
    refs = {}
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if rec.get("split", "help") == "help":
                refs[str(rec["id"])] = rec["answer"]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DataError("not a reference record {id, answer}", file=str(p), row=i) from None
        if not isinstance(rec["answer"], str):
            raise DataError("the answer must be a string", file=str(p), row=i, field="answer")
    missing = [r["id"] for r in help_rows if r["id"] not in refs]
    if missing:
        raise DataError(f"no reference answer for {len(missing)} of {len(help_rows)} HelpEval questions "
                        f"(first: {missing[0]})", file=str(p), field="id")
    return refs


# --- the whole evaluation -----------------------------------------------------------------------------
def _positive_int(value, name: str, what: str, *, optional: bool = False) -> int | None:
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"--{name} must be a positive integer ({what}), got {value!r}", field=name)
    return value


def check_options(*, limit, batch_size, max_new_tokens, seed, max_failure_rate, domains, progress) -> list[str] | None:
    """Every option of `evaluate` checked before anything is loaded; returns the domains as a list."""
    _positive_int(limit, "limit", "questions per split; leave it out for all", optional=True)
    _positive_int(batch_size, "batch_size", "answers generated at once")
    _positive_int(max_new_tokens, "max_new_tokens", "the longest answer, in tokens")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"--seed must be a non-negative integer, got {seed!r}", field="seed")
    rate = max_failure_rate
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1):
        raise DataError(f"--max_failure_rate must be a share from 0 to 1 (0.05 = 5%), got {max_failure_rate!r}",
                        field="max_failure_rate")
    if not isinstance(progress, bool):
        raise DataError(f"--progress must be true or false, got {progress!r}", field="progress")
    if isinstance(domains, str):  # "a,b" from a command line
        domains = [d.strip() for d in domains.split(",") if d.strip()]
    if domains is not None and (not isinstance(domains, (list, tuple)) or not all(isinstance(d, str) for d in domains)):
        raise DataError(f"--domains must be config names or class1 labels, comma-separated, got {domains!r}",
                        field="domains")
    return list(domains) if domains else None


def dataset_revision(dataset: str) -> dict:
    """What identifies the data: the sha256 of a folder's manifest.json, or a Hub repo's commit."""
    if os.path.isdir(dataset):
        manifest = Path(dataset) / "manifest.json"
        if manifest.is_file():
            return {"kind": "manifest_sha256", "value": file_digest(manifest)}
        return {"kind": "none", "value": None}  # a folder without a manifest (the upstream layout)
    try:
        from huggingface_hub import HfApi

        return {"kind": "hub_commit", "value": HfApi().dataset_info(dataset, timeout=30).sha}
    except Exception:  # noqa: BLE001 - the data loaded, so this is only the record of it: say unknown
        return {"kind": "hub_commit", "value": None}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name, dist in (("spa_vl", "spa-vl"), ("transformers", "transformers"), ("torch", "torch")):
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            out[name] = None
    return out


def _references(cfg: JudgeConfig, reference: str, model: str, rows: dict, answers: dict, out: Path, gen: dict):
    """(reference answers by id, the reference as metrics.json names it, the model entry that still has to answer)."""
    entry = cfg.reference_entry(reference)
    if entry:
        label = f"models.{entry}: {cfg.describe(entry)['model']}"
        done = read_answers(out / "reference_answers.jsonl", label)
        return {i: a for (s, i), a in done.items() if s == "help"}, label, entry
    if reference.endswith(".jsonl"):
        return read_reference_file(reference, rows["help"], file=cfg.file), str(Path(reference).resolve()), None
    if model_label(reference) == model_label(model):
        return {i: a for (s, i), a in answers.items() if s == "help"}, model_label(reference), None
    ref_answers = generate_answers(reference, {"help": rows["help"]}, out / "reference_answers.jsonl",
                                   role="reference", **gen)
    return {i: a for (s, i), a in ref_answers.items() if s == "help"}, model_label(reference), None


def _pick_reference(cfg: JudgeConfig, reference: str | None) -> str:
    reference = str(reference) if reference else cfg.reference
    if not reference:
        raise DataError("no HelpEval reference: set `reference:` here or pass --reference (a model entry of "
                        "`models:`, a model, or a .jsonl file of {id, answer})", file=cfg.file, field="reference")
    return reference


def _append_references(path: Path, label: str, new: dict[str, str]) -> None:
    if not new:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps({"id": i, "split": "help", "answer": a, "model": label}, ensure_ascii=False) + "\n"
                        for i, a in new.items()))


def evaluate(model: str, dataset: str, judge: str | Path, out: str | Path, *, reference: str | None = None,
             batch_size: int = 8, max_new_tokens: int = 256, limit: int | None = None,
             domains: list[str] | None = None, device: str | None = None, seed: int = 0,
             max_failure_rate: float | None = None, progress: bool = True) -> dict:
    """Generate the model's answers to test/harm and test/help, judge them, and write the metrics to
    ``out`` (see the module's docstring). Returns the metrics dict (also ``out/metrics.json``)."""
    started, clock = datetime.now(timezone.utc), time.monotonic()
    model, dataset = str(model), str(dataset)
    domains = check_options(limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens, seed=seed,
                            max_failure_rate=max_failure_rate, domains=domains, progress=progress)
    cfg = load_judge_config(judge)
    max_failure_rate = cfg.max_failure_rate if max_failure_rate is None else max_failure_rate
    reference = _pick_reference(cfg, reference)
    rows = load_test_rows(dataset, limit=limit, domains=domains)
    if reference.endswith(".jsonl") and not cfg.reference_entry(reference):  # bad input before any model loads
        read_reference_file(reference, rows["help"], file=cfg.file)
    out = Path(out)  # made when the first answers arrive: bad input or a model that fails to load leaves none

    gen = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "device": device, "progress": progress}
    answers = generate_answers(model, rows, out / "answers.jsonl", **gen)
    out.mkdir(parents=True, exist_ok=True)  # also when nothing needed generating
    refs, ref_label, ref_entry = _references(cfg, reference, model, rows, answers, out, gen)
    cache = RequestCache(out / "judge_cache.sqlite")
    router = JudgeRouter(cfg.models, cache, text_models=cfg.text_models())
    try:
        harm, help_, new_refs = asyncio.run(judge_all(router, cfg, rows, answers, refs, reference_entry=ref_entry,
                                                      max_tokens=max_new_tokens, progress=progress))
    except DataError as e:  # e.g. an endpoint's API key is not set: the judge file's field
        raise e.located(file=cfg.file) from None
    finally:
        cache.close()
    _append_references(out / "reference_answers.jsonl", ref_label, new_refs)
    harm_m, help_m = harm_metrics(harm, cfg.harm_format.scale, seed), help_metrics(help_, seed)
    metrics = {
        "model": model_label(model),
        "dataset": dataset,
        "dataset_revision": dataset_revision(dataset),
        "reference": ref_label,
        "rows": {s: len(rows[s]) for s in SPLITS},
        "limit": limit,
        "domains": domains,
        "seed": seed,
        "generation": {"max_new_tokens": max_new_tokens, "greedy": True},
        "harm": harm_m,
        "help": help_m,
        "judge_failures": failure_check(harm_m, help_m, max_failure_rate),
        "judge": cfg.record(ref_entry),
        "cost": cost(router),
        "versions": _versions(),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - clock, 1),
        "out": str(out),
    }
    category_domain = {r["class2"]: r["class1"] for s in SPLITS for r in rows[s]}
    write_outputs(out, metrics, harm + help_, category_domain)
    return metrics
