"""The judge calls of `spa-vl evaluate`: one verdict per HarmEval row and two per HelpEval question.

Every call goes through :class:`JudgeRouter`, a :class:`builder.generate.router.ModelRouter` (cache, limits,
retries, cost meters) whose in-process text judges (an MD-Judge harm judge, ``backend: transformers``)
are causal LMs read by :mod:`training.text_judge` instead of VLMs. HelpEval reference answers named by
a model entry of the judge file are written through the same router (cached and costed too).

Each result is a dict with ``id``, ``split``, ``class1``, ``class2`` and either the verdict or
``failed`` (why, one line) and ``failure`` (``request_failed``, ``unparseable``, ``out_of_range`` or
``reference_failed``).
"""

from __future__ import annotations

import asyncio
import json

from tqdm.auto import tqdm

from builder.generate.outcomes import Reply, RequestFailed
from builder.generate.router import ModelRouter, image_part
from training.judge_config import JudgeConfig
from training.judge_formats import HELP_CHOICES, HELP_SCHEMA, JudgeReplyError, parse_winner

OUTCOME_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}
JSON_CHOICES = ("safe", "unsafe")  # a local VLM judge of the json format scores these


class JudgeRouter(ModelRouter):
    """A ModelRouter whose in-process entries named in ``text_models`` are text-only causal LMs."""

    def __init__(self, specs, cache, *, text_models=()):
        super().__init__(specs, cache)
        self.text_models = set(text_models)

    async def _local_call(self, spec, messages, images, params) -> Reply:
        if spec.name not in self.text_models:
            return await super()._local_call(spec, messages, images, params)
        from training.text_judge import load_text_judge

        if "choices" not in params:
            raise RequestFailed(spec.name, "unsupported", "an in-process text judge only scores choices")
        text = "\n".join(p["text"] for m in messages if isinstance(m["content"], list)
                         for p in m["content"] if p.get("type") == "text")
        judge = await asyncio.to_thread(load_text_judge, spec.path)
        probs, n_prompt = await asyncio.to_thread(judge.choice_probabilities, text, params["choices"])
        best = max(range(len(probs)), key=probs.__getitem__)
        reply = {"choice": params["choices"][best], "probabilities": [round(p, 6) for p in probs]}
        return Reply(json.dumps(reply), prompt_tokens=n_prompt, completion_tokens=1)


def _messages(text: str, sha: str | None) -> list[dict]:
    return [{"role": "user", "content": ([image_part(sha)] if sha else []) + [{"type": "text", "text": text}]}]


def _base(row: dict, split: str) -> dict:
    return {"id": row["id"], "split": split, "class1": row["class1"], "class2": row["class2"]}


def _request_failure(out: dict, e: RequestFailed, kind: str = "request_failed") -> dict:
    return {**out, "failed": f"{e.kind}: {e.detail}"[:300], "failure": kind}


async def judge_harm(router: ModelRouter, cfg: JudgeConfig, row: dict, answer: str) -> dict:
    """One HarmEval verdict: ``unsafe``, ``harm_score`` (None when the format has no score), and for
    MD-Judge the ``category``, for an in-process judge ``p_unsafe``."""
    out = _base(row, "harm")
    fmt, name = cfg.harm_format, cfg.harm_judge
    prompt = cfg.prompts["harm_judge"].format(question=row["question"], answer=answer, class1=row["class1"],
                                              class2=row["class2"], class3=row["class3"])
    sha = row["sha256"] if fmt.sees_image and cfg.send_image else None
    local = router.spec(name).backend == "transformers"
    choices = list(fmt.local_choices if fmt.text_model else JSON_CHOICES) if local else None
    try:
        reply = await router.chat(name, _messages(prompt, sha), images={sha: row["image"]} if sha else None,
                                  params=cfg.params, schema=fmt.schema, choices=choices)
    except RequestFailed as e:
        return _request_failure(out, e)
    try:
        verdict = fmt.parse(reply.text)
    except JudgeReplyError as e:
        return {**out, "failed": str(e)[:300], "failure": e.kind, "reply": reply.text[:300]}
    return {**out, **{k: v for k, v in verdict.items() if v is not None or k == "harm_score"}}


async def reference_answer(router: ModelRouter, entry: str, row: dict, max_tokens: int) -> str:
    """A reference model entry's answer to a HelpEval question (image and question, greedy)."""
    reply = await router.chat(entry, _messages(row["question"], row["sha256"]), images={row["sha256"]: row["image"]},
                              params={"temperature": 0.0, "max_tokens": max_tokens})
    return reply.text.strip()


async def judge_help(router: ModelRouter, cfg: JudgeConfig, row: dict, answer: str, reference: str) -> dict:
    """One HelpEval question, judged in both orders (the model's answer as A, then as B)."""
    out = _base(row, "help")
    if answer.strip() == reference.strip():
        return {**out, "verdicts": ["tie", "tie"], "outcomes": ["tie", "tie"], "score": 0.5, "identical": True}
    local = router.spec(cfg.help_judge).backend == "transformers"
    sha = row["sha256"] if cfg.send_image else None

    async def one(a: str, b: str):
        prompt = cfg.prompts["help_judge"].format(question=row["question"], answer_a=a, answer_b=b,
                                                  class1=row["class1"], class2=row["class2"], class3=row["class3"])
        try:
            reply = await router.chat(cfg.help_judge, _messages(prompt, sha), params=cfg.params, schema=HELP_SCHEMA,
                                      images={sha: row["image"]} if sha else None,
                                      choices=list(HELP_CHOICES) if local else None)
        except RequestFailed as e:
            return None, f"{e.kind}: {e.detail}"[:300], "request_failed"
        winner = parse_winner(reply.text)
        return winner, None if winner else f"unparseable: {reply.text[:300]}", None if winner else "unparseable"

    (v1, why1, kind1), (v2, why2, kind2) = await asyncio.gather(one(answer, reference), one(reference, answer))
    if v1 is None or v2 is None:
        return {**out, "verdicts": [v1, v2], "failed": why1 or why2, "failure": kind1 or kind2}
    outcomes = [("win" if v == mine else "tie" if v == "tie" else "loss") for v, mine in ((v1, "A"), (v2, "B"))]
    return {**out, "verdicts": [v1, v2], "outcomes": outcomes,
            "score": (OUTCOME_SCORE[outcomes[0]] + OUTCOME_SCORE[outcomes[1]]) / 2}


async def judge_all(router: ModelRouter, cfg: JudgeConfig, rows: dict, answers: dict, refs: dict[str, str], *,
                    reference_entry: str | None = None, max_tokens: int = 256,
                    progress: bool = True) -> tuple[list[dict], list[dict], dict[str, str]]:
    """(harm results, help results, new reference answers). A help question without a reference in
    ``refs`` asks ``reference_entry`` for one first."""
    gate = asyncio.Semaphore(cfg.in_flight)
    bar = tqdm(total=len(rows["harm"]) + len(rows["help"]), unit="row", desc="judge", disable=not progress)
    new_refs: dict[str, str] = {}

    async def bounded(coro):
        async with gate:
            result = await coro
        bar.update(1)
        return result

    async def help_row(row: dict) -> dict:
        ref = refs.get(row["id"])
        if ref is None:
            try:
                ref = new_refs[row["id"]] = await reference_answer(router, reference_entry, row, max_tokens)
            except RequestFailed as e:
                return _request_failure(_base(row, "help"), e, "reference_failed")
        return await judge_help(router, cfg, row, answers[("help", row["id"])], ref)

    try:
        harm = [bounded(judge_harm(router, cfg, r, answers[("harm", r["id"])])) for r in rows["harm"]]
        help_ = [bounded(help_row(r)) for r in rows["help"]]
        results = await asyncio.gather(*harm, *help_)
    finally:
        bar.close()
        await router.aclose()
    return results[:len(harm)], results[len(harm):], new_refs
