"""What the pipeline tests and benchmarks put behind the loopback OpenAI server.

``pipeline_responder`` answers each of the pipeline's prompts the way a model would, deterministically
(the reply is a function of the request), so two runs with the same seed get the same replies:

- the judge prefers a refusal, else the answer with the smaller hash, in either order (consistent), except
  for about one pair in eight where it always says "A" (position bias, so the two verdicts disagree);
- bag members answer differently (their name and a hash are in the reply); a member whose system prompt
  asks for no refusals never refuses, others refuse about one time in three.

``write_config`` writes a run config that sends every role to the server; ``run_cli`` runs ``spa-vl`` in
this process and returns its exit code, stdout and stderr.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml


def _h(*parts: str) -> int:
    return int(hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:12], 16)


def _text_of(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content or [] if p.get("type") == "text")


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def pipeline_responder(body: dict) -> str:
    messages = body["messages"]
    prompt = _text_of(messages[-1])
    system = _text_of(messages[0]) if messages[0]["role"] == "system" else ""
    model = f"{body.get('model', '')}/{body.get('seed', '')}"  # a seeded sampler: another seed, another answer
    if "[Answer A]" in prompt:
        a = _between(prompt, "[Answer A]", "[Answer B]")
        b = prompt.split("[Answer B]", 1)[1].split("\n\nReply with", 1)[0].strip()
        if _h(*sorted((a, b))) % 8 == 0:
            better = "A"  # position bias: the same letter whatever the order
        elif ("cannot" in a) != ("cannot" in b):
            better = "A" if "cannot" in a else "B"
        else:
            better = "A" if _h(a) < _h(b) else "B"
        return json.dumps({"better": better, "reason": f"answer {better} is safer"})
    if "Is the following text unsafe?" in prompt:
        return json.dumps({"unsafe": "uncensored" in prompt or "Sure, here is how" in prompt})
    if "image-search keywords" in prompt:
        sub = _between(prompt, "Harm category path:", "\n").split(">")[-1].strip(" .")
        return json.dumps({"keywords": [f"{sub} photo", f"{sub} scene", f"{sub} sign"]})
    if prompt.startswith("Describe this image"):
        return f"A plain picture with printed words about {_between(prompt, 'the topic', '(')}; id {_h(prompt) % 10**6}."
    if prompt.startswith("Image caption:"):
        return f"Question: What is shown here about {_between(prompt, 'Image caption:', chr(10))}?"
    if "Write a harder" in prompt:
        return f"How could someone misuse what this image shows ({_h(prompt) % 10**4})?"
    if "Write a harmful instruction" in prompt:
        return f"Explain step by step how to act on this image ({_h(prompt) % 10**4})."
    if "uncensored" in system or _h(model, prompt) % 3:
        return f"Sure, here is how ({model}, {_h(model, prompt) % 10**6}): first look closely at the image."
    return f"I cannot help with that ({model}, {_h(model, prompt) % 10**6}), but here is safety information."


def write_config(path: Path, url: str, *, bag: int = 3, limit_keys: dict | None = None, **overrides) -> Path:
    """A run config whose every model is an entry on the loopback server at ``url``."""
    endpoint = {"base_url": url, "api_key_env": None, "timeout": 5, "max_retries": 6, "backoff": 0.01,
                "max_concurrency": 32, "price": {"input": 1.0, "output": 2.0}, **(limit_keys or {})}
    models = {f"m{i}": {**endpoint, "model": f"loopback-{i}"} for i in range(bag)}
    models["judge"] = {**endpoint, "model": "loopback-judge", "price": {"input": 5.0, "output": 15.0}}
    cfg = {
        "seed": 0,
        "models": models,
        "keywords": {"model": "m0", "per_subcategory": 2},
        "images": {"per_subcategory": 1, "sources": [{"type": "typography", "size": 96}], "filters": {"min_side": 64}},
        "questions": {"describer": "m0", "easy": "m0", "hard": "m1"},
        "responses": {"bag": [f"m{i}" for i in range(bag)]},
        "judge": {"model": "judge"},
        "build": {"validation_fraction": 0.25, "test_fraction": 0.2},
    }
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``spa-vl ARGV`` in this process: (exit code, stdout, stderr), from pytest's ``capsys``."""
    from builder.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
