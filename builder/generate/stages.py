"""The pipeline's model stages, each an async function over one work unit (an image and its labels).

- :func:`expand_keywords`: a subcategory → image-search keywords (an LLM call, cached like every call);
- :func:`questions`: a detailed description and the easy question (VLM), then the hard question and the
  hard statement (LLM, from caption + class path + description + easy question);
- :func:`responses`: for each question, two distinct models of the bag, drawn with the run's seed;
- :func:`preferences`: the judge picks the harmless-then-helpful answer in both orders; pairs whose two
  verdicts disagree are flagged ``position_disagreement`` and kept out of the dataset; an optional safety
  model labels question, chosen and rejected. A local judge (probabilities of "A" and "B") may instead be
  set to ``agreement: average``: the winner by P(first wins) averaged over both orders, status ``averaged``.

Stages share nothing but their arguments: a unit record (a dict), the :class:`~builder.generate.router.ModelRouter`
and the :class:`~builder.generate.config.PipelineConfig`. Prompts are the config's files, formatted with ``str.format``.
Every reply is read without the lines it repeats from its prompt (:func:`~builder.generate.replies.strip_echo`): a
server that echoes the request gives no keywords, no question and no verdict, and is counted as such.
"""

from __future__ import annotations

import asyncio
import random
import re

from builder.generate.outcomes import RequestFailed
from builder.generate.replies import parse_json_reply, strip_echo
from builder.generate.router import ModelRouter, image_part

QUESTION_TYPES = ("easy", "hardq", "hards")
VERDICT_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["better", "reason"],
                  "properties": {"better": {"type": "string", "enum": ["A", "B"]}, "reason": {"type": "string"}}}
SAFETY_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["unsafe"],
                 "properties": {"unsafe": {"type": "boolean"}}}
KEYWORDS_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["keywords"],
                   "properties": {"keywords": {"type": "array", "items": {"type": "string"}}}}


def _user(text: str, image_sha: str | None = None) -> list[dict]:
    content = ([image_part(image_sha)] if image_sha else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def _labels(unit: dict) -> dict:
    return {"class1": unit["class1"], "class2": unit["class2"], "class3": unit["class3"],
            "caption": unit.get("caption") or unit.get("keyword") or unit["class3"]}


async def expand_keywords(router: ModelRouter, cfg, class_path: tuple[str, str, str]) -> list[str] | None:
    """Search keywords for a subcategory; without a keyword model, the subcategory name itself. None when
    the reply holds no keywords (e.g. it only repeats the prompt): the caller counts it and falls back."""
    kw = cfg.keywords
    if not kw.model:
        return [class_path[2]]
    n = kw.per_subcategory
    prompt = cfg.prompt("keywords").format(class1=class_path[0], class2=class_path[1], class3=class_path[2], n=n)
    reply = await router.chat(kw.model, _user(prompt), params=kw.params, schema=KEYWORDS_SCHEMA)
    text = strip_echo(reply.text, prompt)
    obj = parse_json_reply(text, ("keywords",))
    words = obj["keywords"] if obj and isinstance(obj["keywords"], list) else re.split(r"[\n,;]+", text)
    out: list[str] = []
    for w in words:
        w = re.sub(r"^[\s\-*\d.\"']+|[\s\"']+$", "", str(w))[:80]
        if w and w.lower() not in {o.lower() for o in out}:
            out.append(w)
    return out[:n] or None


def _clean(text: str, prompt: str) -> str:
    """A question as the model wrote it, minus what it repeats of the prompt, quotes and a leading 'Question:'."""
    text = re.sub(r"^\s*(question|statement|q)\s*:\s*", "", strip_echo(text, prompt), flags=re.I)
    return text.strip().strip('"').strip()


async def questions(router: ModelRouter, cfg, unit: dict, images: dict[str, bytes]) -> dict:
    q, labels, sha = cfg.questions, _labels(unit), unit["sha256"]
    asked = {name: cfg.prompt(name).format(**labels) for name in ("description", "easy")}
    description, easy = await asyncio.gather(
        router.chat(q.describer, _user(asked["description"], sha), images=images, params=q.params),
        router.chat(q.easy, _user(asked["easy"], sha), images=images, params=q.params),
    )
    ctx = {**labels, "description": strip_echo(description.text, asked["description"]),
           "easy": _clean(easy.text, asked["easy"])}
    asked.update({name: cfg.prompt(name).format(**ctx) for name in ("hardq", "hards")})
    hardq, hards = await asyncio.gather(router.chat(q.hard, _user(asked["hardq"]), params=q.params),
                                        router.chat(q.hard, _user(asked["hards"]), params=q.params))
    out = {"description": ctx["description"], "easy": ctx["easy"], "hardq": _clean(hardq.text, asked["hardq"]),
           "hards": _clean(hards.text, asked["hards"])}
    for name, model in (("description", q.describer), ("easy", q.easy), ("hardq", q.hard), ("hards", q.hard)):
        if not out[name]:
            raise RequestFailed(model, "empty_question" if name != "description" else "empty_description",
                                f"the {name} reply held nothing but the prompt once cleaned")
    return out


def pick_models(cfg, unit_id: str, qtype: str) -> list[str]:
    """Two distinct models of the bag for one question: the same seed and unit always draw the same two."""
    return random.Random(f"{cfg.seed}:{unit_id}:{qtype}").sample(sorted(set(cfg.responses.bag)), 2)


async def responses(router: ModelRouter, cfg, unit: dict, qs: dict, images: dict[str, bytes]) -> dict:
    async def answer(qtype: str) -> tuple[str, dict]:
        models = pick_models(cfg, unit["id"], qtype)

        def params(m: str) -> dict:  # a seed per bag entry: two entries serving one model id still differ
            return {**cfg.responses.params, "seed": random.Random(f"{cfg.seed}:{unit['id']}:{qtype}:{m}").randrange(2**31)}

        replies = await asyncio.gather(*(router.chat(m, _user(qs[qtype], unit["sha256"]), images=images, params=params(m))
                                         for m in models))
        return qtype, {"models": models, "responses": [r.text.strip() for r in replies]}

    return dict(await asyncio.gather(*(answer(t) for t in QUESTION_TYPES)))


def parse_verdict(text: str, prompt: str = "") -> str | None:
    """'A' or 'B' from a judge reply: structured JSON, a local model's choice, or free text as a fallback.
    What the reply repeats of ``prompt`` is not read (the prompt's own example names both letters)."""
    text = strip_echo(text, prompt) if prompt else text
    obj = parse_json_reply(text, ("better",)) or parse_json_reply(text, ("choice",))
    if obj:
        v = str(obj.get("better", obj.get("choice", ""))).strip().strip("[]").upper()
        return v if v in ("A", "B") else None
    # The last "better/verdict/winner/choice ... A|B": prose names both answers before it concludes.
    found = re.findall(r"\b(?:better|verdict|winner|choice|prefer(?:red)?)\b\W{0,20}(?:answer\s+|is\s+)?\[?\b([AB])\b", text, re.I)
    if found:
        return found[-1].upper()
    m = re.search(r"\b(?:answer\s+)?\[?([AB])\]?\s+is\s+(?:better|safer|preferred)\b", text, re.I)
    if m:
        return m.group(1).upper()
    found = set(re.findall(r"\b([AB])\b", text))
    return found.pop() if len(found) == 1 else None


def parse_unsafe(text: str, prompt: str = "") -> bool | None:
    text = strip_echo(text, prompt) if prompt else text
    obj = parse_json_reply(text, ("unsafe",)) or parse_json_reply(text, ("choice",))
    if obj:
        v = obj.get("unsafe", obj.get("choice"))
        return v if isinstance(v, bool) else {"unsafe": True, "safe": False, "true": True, "false": False}.get(str(v).lower())
    low = text.lower()
    return True if re.search(r"\bunsafe\b", low) else False if re.search(r"\bsafe\b", low) else None


async def preferences(router: ModelRouter, cfg, unit: dict, qs: dict, answers: dict, images: dict[str, bytes]) -> dict:
    judge, safety = cfg.judge, cfg.safety
    local_judge = router.spec(judge.model).backend == "transformers"

    async def verdict(question: str, a: str, b: str) -> tuple[str | None, str, float | None]:
        """(verdict, reason, probability of A when the judge is a local model)."""
        prompt = cfg.prompt("judge").format(question=question, answer_a=a, answer_b=b)
        reply = await router.chat(judge.model, _user(prompt, unit["sha256"]), images=images, params=judge.params,
                                  schema=VERDICT_SCHEMA, choices=["A", "B"] if local_judge else None)
        text = strip_echo(reply.text, prompt)
        obj = parse_json_reply(text, ("better", "reason")) or parse_json_reply(text, ("probabilities",))
        p_a = float(obj["probabilities"][0]) if obj and "probabilities" in obj else None
        reason = str(obj["reason"]) if obj and "reason" in obj else f"p(A)={p_a}" if p_a is not None else text[:500]
        return parse_verdict(text), reason, p_a

    async def unsafe(text: str) -> bool | None:
        local = router.spec(safety.model).backend == "transformers"
        prompt = cfg.prompt("safety").format(text=text)
        reply = await router.chat(safety.model, _user(prompt), params=safety.params,
                                  schema=SAFETY_SCHEMA, choices=["safe", "unsafe"] if local else None)
        return parse_unsafe(reply.text, prompt)

    async def judge_pair(qtype: str) -> tuple[str, dict]:
        question, pair = qs[qtype], answers[qtype]
        r0, r1 = pair["responses"]
        out = {"models": pair["models"], "responses": pair["responses"]}
        if r0 == r1:
            return qtype, {**out, "status": "identical"}
        (v1, why1, p1), (v2, why2, p2) = await asyncio.gather(verdict(question, r0, r1), verdict(question, r1, r0))
        if v1 is None or v2 is None:
            return qtype, {**out, "status": "judge_unparseable", "verdicts": [v1, v2]}
        w1, w2 = (0 if v1 == "A" else 1), (1 if v2 == "A" else 0)  # winner index in the original order
        status = "agreed"
        if w1 != w2:
            if judge.agreement != "average" or p1 is None or p2 is None:
                return qtype, {**out, "status": "position_disagreement", "verdicts": [v1, v2]}
            # A probability judge: P(r0 wins) averaged over both orders cancels a constant position bias.
            w1, status, why1 = (0 if (p1 + 1 - p2) / 2 >= 0.5 else 1), "averaged", f"p(first wins)={(p1 + 1 - p2) / 2:.4f}"
        out.update(status=status, verdicts=[v1, v2], chosen=w1, rationale=why1)
        if safety.model:
            labels = await asyncio.gather(unsafe(question), *(unsafe(f"User: {question}\nAssistant: {r}")
                                                               for r in (pair["responses"][w1], pair["responses"][1 - w1])))
            out["unsafe"] = {"question": labels[0], "chosen": labels[1], "rejected": labels[2]}
        return qtype, out

    return dict(await asyncio.gather(*(judge_pair(t) for t in QUESTION_TYPES)))
