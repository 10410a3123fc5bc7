"""The model-access layer: cache keys, limits, retries, structured output and the local backend."""

from __future__ import annotations

import asyncio
import json

import pytest
from openai_server import OpenAIServer, generic_responder

from builder import llm
from builder.errors import DataError
from builder.llm import ModelRouter, ModelSpec, RequestCache, RequestFailed, image_part
from builder.stages import parse_unsafe, parse_verdict


def _router(url: str, tmp_path, **spec) -> ModelRouter:
    cfg = {"base_url": url, "api_key_env": None, "backoff": 0.01, "timeout": 5, **spec}
    return ModelRouter({"m": ModelSpec.from_config("m", cfg)}, RequestCache(tmp_path / "cache.sqlite"))


def _ask(router, text="hello", **kw):
    return asyncio.run(router.chat("m", [{"role": "user", "content": [{"type": "text", "text": text}]}], **kw))


class Recorder:
    """A responder that keeps every request body it answered."""

    def __init__(self):
        self.bodies = []

    def __call__(self, body):
        self.bodies.append(body)
        return generic_responder(body)


def test_cache_key_covers_model_messages_images_and_params(tmp_path):
    with OpenAIServer() as srv:
        router = _router(srv.url, tmp_path)
        first = _ask(router)
        again = _ask(router)
        assert not first.cached and again.cached and again.text == first.text
        _ask(router, params={"temperature": 0.3})  # a parameter that changes the output: a new request
        img = {"a" * 64: b"\x89PNG\r\n\x1a\nfake-a", "b" * 64: b"\x89PNG\r\n\x1a\nfake-b"}
        for sha in img:  # same text, other image: a new request; the key holds the hash, not the pixels
            asyncio.run(router.chat("m", [{"role": "user", "content": [image_part(sha), {"type": "text", "text": "hi"}]}],
                                    images=img))
        assert srv.stats()["ok"] == 4
    m = router.meters["m"]
    assert (m.requests, m.cached) == (4, 1)
    # a new router on the same file (a re-run) gets everything from the cache
    with OpenAIServer() as srv2:
        router2 = _router(srv2.url, tmp_path)
        assert _ask(router2).cached and srv2.stats()["requests"] == 0


def test_images_go_out_as_data_urls(tmp_path):
    rec = Recorder()
    with OpenAIServer(rec) as srv:
        router = _router(srv.url, tmp_path)
        sha = "c" * 64
        asyncio.run(router.chat("m", [{"role": "user", "content": [image_part(sha), {"type": "text", "text": "x"}]}],
                                images={sha: b"\xff\xd8\xff\xe0jpeg"}))
    part = rec.bodies[0]["messages"][0]["content"][0]
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/jpeg;base64,")


def test_retry_after_is_honoured_and_retries_are_counted(tmp_path):
    with OpenAIServer(fault_rate=0.5, faults=("429",), retry_after=0.05, seed=3) as srv:
        router = _router(srv.url, tmp_path, max_retries=8)
        replies = [_ask(router, f"q{i}") for i in range(20)]
        faults = srv.stats()["faults"]["429"]
    assert all(r.text for r in replies) and faults > 0
    assert router.meters["m"].retries == faults and router.meters["m"].failed == 0


@pytest.mark.parametrize("fault,kind", [("500", "http_5"), ("malformed", "malformed_reply"), ("hang", "timeout")])
def test_a_request_that_keeps_failing_raises_with_its_reason(tmp_path, fault, kind):
    with OpenAIServer(fault_rate=1.0, faults=(fault,), hang_seconds=5) as srv:
        router = _router(srv.url, tmp_path, max_retries=2, timeout=0.3)
        with pytest.raises(RequestFailed) as err:
            _ask(router)
    assert err.value.kind.startswith(kind) and err.value.model == "m"
    assert router.meters["m"].retries == 2 and router.meters["m"].failed == 1
    assert RequestCache(tmp_path / "cache.sqlite").lookup("x") is None  # failures are never cached


def test_client_errors_are_not_retried(tmp_path):
    with OpenAIServer() as srv:
        router = _router(srv.url.replace("/v1", "/nope"), tmp_path, max_retries=5)
        with pytest.raises(RequestFailed, match="http_404"):
            _ask(router)
    assert router.meters["m"].retries == 0


def test_structured_output_and_its_switch(tmp_path):
    rec = Recorder()
    schema = {"type": "object", "required": ["better"], "properties": {"better": {"type": "string", "enum": ["A", "B"]}}}
    with OpenAIServer(rec) as srv:
        reply = _ask(_router(srv.url, tmp_path), schema=schema)
        _ask(_router(srv.url, tmp_path / "x", structured_output=False), schema=schema)
    assert rec.bodies[0]["response_format"]["json_schema"]["schema"] == schema
    assert json.loads(reply.text)["better"] in ("A", "B")
    assert "response_format" not in rec.bodies[1]


def test_system_prompt_and_model_id(tmp_path):
    rec = Recorder()
    with OpenAIServer(rec) as srv:
        _ask(_router(srv.url, tmp_path, system="Answer everything.", model="served-id"))
    assert rec.bodies[0]["model"] == "served-id"
    assert rec.bodies[0]["messages"][0] == {"role": "system", "content": "Answer everything."}


def test_token_bucket_spaces_sends_and_never_exceeds_a_window(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(llm.time, "monotonic", lambda: now[0])
    bucket = llm._Bucket(per_minute=600, capacity=600 * (1 - llm.RATE_MARGIN))  # 9.9/s, burst of 6
    sends = []
    for _ in range(18000):  # three simulated minutes in steps of 10 ms, sending whenever allowed
        now[0] += 0.01
        if bucket.wait_time(1) == 0:
            bucket.take(1)
            sends.append(now[0])
    assert len(sends) >= 0.95 * 1800  # at least 95% of the limit
    i = 0
    for j, t in enumerate(sends):  # no sliding 60 s window holds more than the limit
        while sends[i] <= t - 60:
            i += 1
        assert j - i + 1 <= 600


def test_model_spec_errors_name_the_field():
    with pytest.raises(DataError, match="models.x.rpmm: unknown key"):
        ModelSpec.from_config("x", {"rpmm": 5})
    with pytest.raises(DataError, match="models.x.path"):
        ModelSpec.from_config("x", {"backend": "transformers"})
    with pytest.raises(DataError, match="models.x.backend"):
        ModelSpec.from_config("x", {"backend": "grpc"})


@pytest.mark.parametrize("text,verdict", [
    ('{"better": "B", "reason": "safer"}', "B"),
    ('```json\n{"better": "A", "reason": "x"}\n```', "A"),
    ("After weighing both, the better answer is [B] because it declines.", "B"),
    ("Verdict: A", "A"),
    ("Both answers are fine.", None),
    ('{"choice": "B", "probabilities": [0.4, 0.6]}', "B"),
])
def test_tolerant_verdict_parser(text, verdict):
    assert parse_verdict(text) == verdict


def test_unsafe_parser():
    assert parse_unsafe('{"unsafe": true}') is True
    assert parse_unsafe("This text is safe.") is False
    assert parse_unsafe("UNSAFE") is True
    assert parse_unsafe('{"choice": "safe", "probabilities": [0.7, 0.3]}') is False


def test_local_backend_answers_and_judges_by_probability(tmp_path):
    from builder.tiny_vlm import build_tiny_llava

    path = build_tiny_llava(tmp_path / "tiny")
    spec = ModelSpec.from_config("local", {"backend": "transformers", "path": str(path),
                                           "params": {"max_tokens": 8, "temperature": 0.7}})
    router = ModelRouter({"local": spec}, RequestCache(tmp_path / "cache.sqlite"))
    from builder.images import render_typography

    img = render_typography("weapon", size=64)
    sha = "d" * 64
    msgs = [{"role": "user", "content": [image_part(sha), {"type": "text", "text": "What is this?"}]}]
    reply = asyncio.run(router.chat("local", msgs, images={sha: img}, params={"seed": 1}))
    assert reply.text and reply.completion_tokens > 0 and reply.prompt_tokens > 0
    again = asyncio.run(router.chat("local", msgs, images={sha: img}, params={"seed": 1}))
    assert again.cached and again.text == reply.text
    choice = json.loads(asyncio.run(router.chat("local", msgs, images={sha: img}, choices=["A", "B"])).text)
    assert choice["choice"] in ("A", "B") and sum(choice["probabilities"]) == pytest.approx(1, abs=1e-4)


def test_a_server_without_json_schema_gets_free_text_from_then_on(tmp_path):
    rec = Recorder()
    schema = {"type": "object", "required": ["better"], "properties": {"better": {"type": "string"}}}
    with OpenAIServer(rec, json_schema=False) as srv:
        router = _router(srv.url, tmp_path, max_retries=3)
        first = _ask(router, "one", schema=schema)
        _ask(router, "two", schema=schema)
        errors = srv.stats()["errors"]
    assert first.text and errors == 1  # one 400, then the same request without response_format
    assert all("response_format" not in b for b in rec.bodies) and len(rec.bodies) == 2
    assert router.specs["m"].structured_output is False
    # a re-run (a fresh router that tries json_schema again) gets both from the cache
    with OpenAIServer(rec, json_schema=False) as srv:
        router = _router(srv.url, tmp_path, max_retries=3)
        assert _ask(router, "one", schema=schema).cached and _ask(router, "two", schema=schema).cached
        assert srv.stats()["requests"] == 0


def test_entries_on_one_endpoint_share_one_limiter_with_the_tightest_limits(tmp_path):
    base = {"base_url": "http://127.0.0.1:9/v1", "api_key_env": None}
    specs = {"a": ModelSpec.from_config("a", {**base, "model": "x", "rpm": 500, "max_concurrency": 32}),
             "b": ModelSpec.from_config("b", {**base, "model": "x", "rpm": 200, "tpm": 1000, "max_concurrency": 8}),
             "c": ModelSpec.from_config("c", {**base, "model": "y", "rpm": 500})}
    router = ModelRouter(specs, RequestCache(tmp_path / "c.sqlite"))
    a, b, c = (router._limiter(specs[n]) for n in "abc")
    assert a is b and a is not c
    assert a.rpm.rate == pytest.approx(200 * llm.RATE_MARGIN / 60) and a.tpm is not None and a.slots._value == 8


def test_tokens_per_minute_are_paid_in_full(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(llm.time, "monotonic", lambda: now[0])
    limiter = llm.RateLimiter(64, tpm=30_000)  # a bucket of 500 tokens; each request estimates 1,000
    spent, t = 0, 0.0
    while t < 180:
        now[0] = t = t + 0.01
        if limiter.tpm.wait_time(1000) == 0:
            limiter.tpm.take(1000)
            limiter.tpm.level += 1000 - 900  # settles: 900 used
            spent += 900
    assert spent <= 3 * 30_000 * 1.01


def test_a_parameter_the_sdk_refuses_is_a_config_error_not_a_retry(tmp_path):
    with OpenAIServer() as srv:
        router = _router(srv.url, tmp_path, params={"top_k": 5}, max_retries=5)
        with pytest.raises(DataError, match="models.m.params"):
            _ask(router)
        assert srv.stats()["requests"] == 0
