"""DPO throughput on a LLaVA-1.5-7B-shaped model: our trainer setup against plain trl, side by side.

    make bench-gpu                                    # = .venv/bin/python bench/bench_gpu.py (one GPU)
    .venv/bin/python bench/bench_gpu.py --steps 12 --warmup 2 --batch 2
    .venv/bin/python bench/bench_gpu.py --tiny        # the same code path on CPU in seconds (self-check)

Nothing is downloaded. The model is ``LlavaForConditionalGeneration`` built from configs with
LLaVA-1.5-7B's shapes (Llama: hidden 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32064; CLIP
ViT-L/14 at 336 px: 576 image tokens; two-layer GELU projector), randomly initialised in bf16 straight
on the GPU. The tokenizer is the Llama-style BPE of ``builder.dev.tiny_vlm`` (ids < 32064), the prompt is
llava-hf's template with the tokenizer's BOS and answers ending in ``</s>`` (``builder.vlm.chat``; plain trl
uses its own collator), the data are ``write_fixture`` rows with 336 px texture images (short answers:
the table gives the tokens per sequence, ~576 of them image tokens).

Four runs, each in its own process (clean peak memory), on the same pairs in the same order:

- **ours, LoRA**: ``training.dpo.make_trainer`` with ``llava-1.5-7b-lora.yaml`` (vision tower frozen,
  projector trained, LoRA r 128 on every linear layer of the LM; reference = adapters disabled);
- **plain trl, LoRA**: ``DPOTrainer`` with its defaults and ``LoraConfig(r=128, target_modules="all-linear")``
  (no freezing: adapters in the vision tower and projector too);
- **ours, full** and **plain trl, full** (plain: everything trains, the vision tower included); both
  with a frozen bf16 reference copy. Full fine-tuning keeps bf16 weights and bf16 AdamW states here
  (2 + 2 + 4 bytes per trainable parameter, plus 2 + 2 for policy and reference): the paper's fp32 master
  weights (16 bytes per parameter, ~110 GB) do not fit one 80 GB GPU. When even that does not fit, the
  language model is made shallower (``--full_layers``, default: the deepest that fits) and the table says so.

Both trainers get the same batch (``--batch`` pairs per step, no accumulation), bf16 autocast, gradient
checkpointing (trl's default), the same learning rate (``--lr`` 1e-4: large enough that a few bf16 steps
move the loss, which the self-check wants; speed does not depend on it), and ``--steps`` optimizer steps
of which the first ``--warmup`` are not timed. The script exits 1 when a case failed, the first loss is
not log 2 (policy ≠ reference) or the loss did not move.

Figures: pairs/s and tokens/s (every token through the language model, chosen + rejected, image tokens
included: trl's own count), peak ``torch.cuda.max_memory_allocated``, and model FLOPs utilisation:

    MFU = Σ_parts c_part × N_part × T_part / (seconds × peak)

with N the parameters of a part (language model without the input embedding, incl. the LM head;
projector; vision tower), T the tokens through it (LM: trl's count; projector: 576 per image; vision:
577 per image; two images per pair, chosen and rejected), and c the FLOPs per parameter per token:
2 for a forward, +2 for a backward to the activations (needed when anything upstream trains), +2 for
the weight gradients of a trained part, +2 for the reference model's forward. Hence c(LM) = 8 full /
6 LoRA; c(projector) = 8 when trained in full (ours) / 6 with adapters (plain LoRA); c(vision) = 4 frozen
(ours) / 6 with adapters / 8 trained (plain full). Attention's T² term (~3% at these lengths) and the
recomputation of gradient checkpointing are not counted, as usual. Peak: H100 SXM / H200 bf16 dense
989 TFLOPS (H100 PCIe 756, A100 312; ``--peak_tflops`` for others).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = ("lora-ours", "lora-plain", "full-ours", "full-plain")
PEAKS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
GIB = 1024**3


# --- model, processor, data -----------------------------------------------------------------------
def shapes(tiny: bool, layers: int | None = None) -> dict:
    if tiny:
        return dict(hidden=64, layers=layers or 2, heads=4, ff=128, vocab=1088, v_hidden=64, v_layers=2, v_heads=4,
                    v_ff=128, image=32, patch=8, v_layer=-1)
    return dict(hidden=4096, layers=layers or 32, heads=32, ff=11008, vocab=32064, v_hidden=1024, v_layers=24,
                v_heads=16, v_ff=4096, image=336, patch=14, v_layer=-2)


def llava_config(s: dict, ids: dict):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    n_image = (s["image"] // s["patch"]) ** 2
    return LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=s["v_hidden"], intermediate_size=s["v_ff"],
                                       num_hidden_layers=s["v_layers"], num_attention_heads=s["v_heads"],
                                       image_size=s["image"], patch_size=s["patch"], projection_dim=768),
        text_config=LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ff"],
                                num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                num_key_value_heads=s["heads"], max_position_embeddings=4096,
                                bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]),
        image_token_index=ids["<image>"], image_seq_length=n_image, vision_feature_select_strategy="default",
        vision_feature_layer=s["v_layer"], pad_token_id=ids["<pad>"],
    )


def make_processor(s: dict):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    from builder.dev.tiny_vlm import LLAVA_CHAT_TEMPLATE, default_corpus, llama_tokenizer

    tokenizer = llama_tokenizer(default_corpus(), 1024)
    side = {"height": s["image"], "width": s["image"]}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": s["image"]}, crop_size=side),
        tokenizer=tokenizer, patch_size=s["patch"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return processor, {t: tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "<image>")}


def make_model(s: dict, ids: dict, *, device, dtype, seed: int = 0):
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(llava_config(s, ids), dtype=dtype)
    model.generation_config = GenerationConfig(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                                               pad_token_id=ids["<pad>"])
    return model


def param_counts(model) -> dict:
    """Parameters of the parts that the FLOPs formula counts (LM without its input embedding)."""
    from training.models import vlm_parts

    parts = vlm_parts(model)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    lm = n(parts.language_model) - parts.language_model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    return {"lm": lm + head, "projector": n(parts.projector), "vision": n(parts.vision), "total": n(model)}


def full_layers_that_fit(s: dict, ids: dict, total_bytes: int, headroom: int = 10 * GIB) -> int:
    """The deepest LM (≤ the requested depth) whose full DPO state fits: policy + reference (2 + 2 bytes per
    parameter) + bf16 grads and AdamW states of every trainable parameter (6 bytes, vision tower included
    for plain trl)."""
    import torch

    for layers in range(s["layers"], 0, -1):
        with torch.device("meta"):
            n = param_counts(make_model({**s, "layers": layers}, ids, device="meta", dtype=torch.bfloat16))
        if 4 * n["total"] + 6 * n["total"] + headroom <= total_bytes:
            return layers
    return 1


def write_data(out: Path, tiny: bool, pairs: int) -> Path:
    from builder.dev.fixture import write_fixture

    per_domain = 3 * math.ceil(pairs / 6 / 3 / 0.5)  # ~half or more of the rows land in train
    write_fixture(out, rows_per_domain=per_domain, eval_rows=0, texture=True, image_size=32 if tiny else 336,
                  progress=False)
    return out


# --- one case ---------------------------------------------------------------------------------------
def run_case(case: str, opts: dict) -> dict:
    """Build the model, the trainer (ours or plain trl), train ``steps`` steps; timings of the last ones."""
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from training.config import load_config
    from training.data import load_rows, prepare_preferences
    from training.dpo import dpo_args, make_trainer

    tiny, mode, who = opts["tiny"], case.split("-")[0], case.split("-")[1]
    cuda = not tiny and torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    s = shapes(tiny, opts["full_layers"] if mode == "full" else None)
    processor, ids = make_processor(s)
    if mode == "full" and cuda and opts["full_layers"] is None:  # each full run finds the same depth
        s["layers"] = full_layers_that_fit(s, ids, torch.cuda.get_device_properties(0).total_memory)
    rows = load_rows(opts["data"], "default", "train")
    pairs, _ = prepare_preferences(rows, processor, max_length=4096, log=lambda m: None)
    pairs = pairs.select(range(min(len(pairs), opts["steps"] * opts["batch"])))

    model = make_model(s, ids, device=device, dtype=dtype)
    counts = param_counts(model)
    ref = None
    if mode == "full":
        import copy

        ref = copy.deepcopy(model).requires_grad_(False).eval()
    out = Path(opts["work"]) / case
    # One learning rate for all four (speed does not depend on it): large enough that a few steps move the
    # loss even where bf16 weights round small AdamW steps away (the self-check wants it to move).
    common = dict(max_steps=opts["steps"], per_device_train_batch_size=opts["batch"], gradient_accumulation_steps=1,
                  logging_steps=1, report_to="none", seed=42, learning_rate=opts["lr"], warmup_steps=0)
    if who == "ours":
        cfg = load_config(f"llava-1.5-7b-{mode}", "dpo", model="(in memory)", dataset=opts["data"],
                          output_dir=str(out), use_cpu=not cuda, bf16=cuda, save_strategy="no", **common)
        if cfg.lora:
            cfg = cfg.replace(lora={"r": opts["rank"], "alpha": 2 * opts["rank"], "dropout": cfg.lora.dropout})
        args = dpo_args(cfg, log=lambda m: None)  # save_strategy "no": a trl flag over spa-vl's default
        trainer = make_trainer(cfg, args, model, processor, pairs, ref_model=ref, log=lambda m: None)
    else:
        from peft import LoraConfig
        from trl import DPOConfig, DPOTrainer

        # trl's defaults (gradient checkpointing, bf16, max_length 1024, no freezing) + the same batch and lr.
        args = DPOConfig(output_dir=str(out), use_cpu=not cuda, bf16=cuda, save_strategy="no", **common)
        peft = (LoraConfig(r=opts["rank"], lora_alpha=2 * opts["rank"], lora_dropout=0.05,
                           target_modules="all-linear", task_type="CAUSAL_LM") if mode == "lora" else None)
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=pairs, processing_class=processor,
                             peft_config=peft)

    class Timer(TrainerCallback):
        """(time, tokens so far) at the end of every optimizer step; trl counts the tokens."""

        def __init__(self, dpo):
            self.dpo, self.marks = dpo, {}

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.marks[state.global_step] = (time.perf_counter(), self.dpo._total_train_tokens)

    timer = Timer(trainer)
    trainer.add_callback(timer)
    for quiet in (ProgressCallback, PrinterCallback):  # no per-step dicts on stdout: the table is the output
        trainer.remove_callback(quiet)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    first, last = opts["warmup"], opts["steps"]
    (t0, k0), (t1, k1) = timer.marks[first], timer.marks[last]
    seconds, tokens, timed = t1 - t0, k1 - k0, last - first
    step_s = [round(timer.marks[i][0] - timer.marks[i - 1][0], 4) for i in range(first + 1, last + 1)]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    images = 2 * timed * opts["batch"]  # chosen and rejected each carry the image
    n_patch = (s["image"] // s["patch"]) ** 2
    coef = {"lora-ours": (6, 8, 4), "lora-plain": (6, 6, 6), "full-ours": (8, 8, 4), "full-plain": (8, 8, 8)}[case]
    flops = (coef[0] * counts["lm"] * tokens + coef[1] * counts["projector"] * n_patch * images
             + coef[2] * counts["vision"] * (n_patch + 1) * images)
    result = {
        "case": case, "layers": s["layers"], "params": counts["total"], "trainable": trainable,
        "pairs_per_s": timed * opts["batch"] / seconds, "tokens_per_s": tokens / seconds,
        "tokens_per_seq": tokens / (2 * timed * opts["batch"]), "step_s": step_s,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "tflops": flops / seconds / 1e12, "loss_first": losses[0], "loss_last": losses[-1],
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
    }
    del trainer, model, ref, timer
    gc.collect()
    return result


# --- driver ----------------------------------------------------------------------------------------
def peak_flops(device: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    return next((peak for name, peak in PEAKS if name in device), None)


def table(results: list[dict], peak: float | None, opts: dict) -> str:
    by = {r["case"]: r for r in results}
    lines = ["| setup | trainable params | LM layers | pairs/s | tokens/s | tokens/seq | peak GPU mem | MFU | "
             "speed vs plain trl |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    r = opts["rank"]
    names = {"lora-ours": f"ours, LoRA r{r} (vision frozen, projector trained)",
             "lora-plain": f"plain trl, LoRA r{r} all-linear", "full-ours": "ours, full (vision frozen)",
             "full-plain": "plain trl, full (everything trains)"}
    for case in CASES:
        r = by.get(case)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {names[case]} | – | – | failed: {r['error'][:80]} | | | | | |")
            continue
        plain = by.get(case.replace("ours", "plain"))
        ratio = f"{r['pairs_per_s'] / plain['pairs_per_s']:.2f}×" if plain and "error" not in plain else "–"
        mem = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "n/a (CPU)"
        mfu = f"{100 * r['tflops'] * 1e12 / peak:.1f}%" if peak else "n/a"
        lines.append(f"| {names[case]} | {r['trainable']:,} | {r['layers']} | {r['pairs_per_s']:.3g} | "
                     f"{r['tokens_per_s']:,.0f} | {r['tokens_per_seq']:.0f} | {mem} | {mfu} | {ratio} |")
    return "\n".join(lines)


def check(results: list[dict]) -> list[str]:
    """Self-checks: every case ran, timings are positive, and the loss moved away from log 2."""
    problems = []
    for r in results:
        if "error" in r:
            problems.append(f"{r['case']}: {r['error']}")
            continue
        if not (r["pairs_per_s"] > 0 and r["tokens_per_s"] > 0 and r["tflops"] > 0):
            problems.append(f"{r['case']}: non-positive timing {r}")
        if abs(r["loss_first"] - math.log(2)) > 1e-2:
            problems.append(f"{r['case']}: first loss {r['loss_first']:.4f} is not log 2 (policy != reference)")
        if r["loss_last"] == r["loss_first"]:
            problems.append(f"{r['case']}: the loss did not move")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: the same code path in seconds")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per case (default 12; tiny 6)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2)")
    ap.add_argument("--batch", type=int, default=2, help="pairs per step (per device, no accumulation)")
    ap.add_argument("--lr", type=float, default=1e-4, help="learning rate of all four runs (speed does not depend on it)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--full_layers", type=int, default=None, help="LM depth of the full runs (default: deepest that fits)")
    ap.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not detected")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="one process per case (default: on for GPU runs, off for --tiny)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--_case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    ap.add_argument("--_opts", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5's gradient→activation renames

    if a._case:  # child process
        print("RESULT " + json.dumps(_safe_case(a._case, json.loads(a._opts))), flush=True)
        return 0

    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    steps = a.steps or (6 if a.tiny else 12)
    warmup = a.warmup if a.warmup is not None else 2
    if not 0 < warmup < steps:
        ap.error("need 0 < --warmup < --steps")
    cases = [c for c in a.cases.split(",") if c]
    if unknown := set(cases) - set(CASES):
        ap.error(f"unknown cases {sorted(unknown)}")
    cuda = not a.tiny and torch.cuda.is_available()
    if not a.tiny and not cuda:
        print("bench_gpu: no CUDA GPU here; run with --tiny for the CPU self-check", file=sys.stderr)
        return 2
    isolate = (not a.tiny) if a.isolate is None else a.isolate
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_gpu_"))
    t_start = time.perf_counter()
    data = write_data(work / "spa_vl", a.tiny, steps * a.batch)
    # The parent never touches the GPU (no CUDA context of its own); the full runs size their depth themselves.
    opts = {"tiny": a.tiny, "steps": steps, "warmup": warmup, "batch": a.batch, "data": str(data),
            "work": str(work), "full_layers": a.full_layers, "lr": a.lr, "rank": 8 if a.tiny else 128}

    results = []
    for case in cases:
        print(f"bench_gpu: {case} ...", file=sys.stderr, flush=True)
        results.append(_isolated(case, opts) if isolate else _safe_case(case, opts))
        r = results[-1]
        print(f"bench_gpu: {case}: " + (r["error"] if "error" in r else
              f"{r['pairs_per_s']:.3g} pairs/s, {r['tokens_per_s']:,.0f} tokens/s, loss {r['loss_first']:.4f} → "
              f"{r['loss_last']:.4f}"), file=sys.stderr, flush=True)

    device = next((r["device"] for r in results if "device" in r), "?")
    peak = peak_flops(device, a.peak_tflops) if cuda else None
    cmd = "python bench/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    model = "tiny LLaVA (CPU)" if a.tiny else "LLaVA-1.5-7B-shaped, random weights, bf16"
    note = ""
    full_layers = min((r["layers"] for r in results if r["case"].startswith("full") and "layers" in r), default=32)
    if not a.tiny and full_layers < 32:
        note = (f"\nFull fine-tune runs use a {full_layers}-layer language model (of 32) so that policy, reference, "
                "bf16 grads and bf16 AdamW states fit the GPU.")
    print(f"\n### DPO throughput: {model}, {a.batch} pairs/step, {steps - warmup} timed steps "
          f"(after {warmup}) on {device}\n")
    print(table(results, peak, opts))
    print(f"\nMFU against {peak / 1e12:.0f} TFLOPS bf16 dense." if peak else "\nMFU: n/a (no GPU peak known).", end="")
    print(note)
    if a.tiny:
        print("\n--tiny checks the code path (every case trains, the loss leaves log 2); its CPU timings of a "
              "random 0.3M-parameter model say nothing about GPU speed.")
    print(f"\nCommand: `{cmd.strip()}` ({time.perf_counter() - t_start:.0f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps({"results": results, "opts": opts, "peak_flops": peak}, indent=2))
    problems = check(results)
    for p in problems:
        print(f"bench_gpu: CHECK FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0


def _safe_case(case: str, opts: dict) -> dict:
    try:
        return run_case(case, opts)
    except Exception as e:  # an OOM in one case still lets the others report
        import traceback

        traceback.print_exc()
        return {"case": case, "error": f"{type(e).__name__}: {e}"}


def _isolated(case: str, opts: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--_case", case, "--_opts", json.dumps(opts)],
                          stdout=subprocess.PIPE, text=True)
    found = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not found:
        return {"case": case, "error": f"child process exited {proc.returncode} without a result"}
    return json.loads(found[-1])


if __name__ == "__main__":
    sys.exit(main())
