"""The model-access layer: cache keys, limits, retries, structured output and the local backend."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from openai_server import OpenAIServer, generic_responder, masked_key

from builder.errors import DataError
from builder.generate import outcomes, rate_limit
from builder.generate.model_spec import Endpoint, ModelSpec, resolve_endpoints
from builder.generate.outcomes import RequestFailed
from builder.generate.request_cache import RequestCache
from builder.generate.router import ModelRouter, image_part
from builder.generate.stages import parse_unsafe, parse_verdict


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
    monkeypatch.setattr(rate_limit.time, "monotonic", lambda: now[0])
    bucket = rate_limit._Bucket(per_minute=600, capacity=600 * (1 - rate_limit.RATE_MARGIN))  # 9.9/s, burst of 6
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
    from builder.dev.tiny_vlm import build_tiny_llava

    path = build_tiny_llava(tmp_path / "tiny")
    spec = ModelSpec.from_config("local", {"backend": "transformers", "path": str(path),
                                           "params": {"max_tokens": 8, "temperature": 0.7}})
    router = ModelRouter({"local": spec}, RequestCache(tmp_path / "cache.sqlite"))
    from builder.generate.image_sources import render_typography

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
        # a re-run (a fresh router on the same store) knows, and gets both from the cache
        router = _router(srv.url, tmp_path, max_retries=3)
        assert _ask(router, "one", schema=schema).cached and _ask(router, "two", schema=schema).cached
        _ask(router, "three", schema=schema)
        assert srv.stats()["errors"] == 1 and srv.stats()["ok"] == 3  # the store remembered: no second 400


def test_one_rejected_response_format_per_endpoint_however_many_calls_wait(tmp_path):
    """40 calls with a schema at once to a server without json_schema: the first one asks alone, is
    refused, and every other call (queued behind it) goes out as free text: exactly one 400."""
    schema = {"type": "object", "required": ["better"], "properties": {"better": {"type": "string"}}}
    with OpenAIServer(json_schema=False, latency=0.05) as srv:
        router = _router(srv.url, tmp_path, max_concurrency=16)

        async def many():
            msgs = [[{"role": "user", "content": [{"type": "text", "text": f"q{i}"}]}] for i in range(40)]
            try:
                return await asyncio.gather(*(router.chat("m", m, schema=schema) for m in msgs))
            finally:
                await router.aclose()

        replies = asyncio.run(many())
        stats = srv.stats()
    assert stats["errors"] == 1 and stats["ok"] == 40 and all(r.text for r in replies)
    assert router.meters["m"].failed == 0


def test_a_server_with_json_schema_is_asked_with_it_at_full_concurrency(tmp_path):
    rec = Recorder()
    schema = {"type": "object", "required": ["better"], "properties": {"better": {"type": "string"}}}
    with OpenAIServer(rec, latency=0.2) as srv:
        router = _router(srv.url, tmp_path, max_concurrency=8)

        async def many():
            try:
                return await asyncio.gather(*(router.chat("m", [{"role": "user", "content": f"q{i}"}], schema=schema)
                                              for i in range(16)))
            finally:
                await router.aclose()

        asyncio.run(many())
        assert srv.stats()["max_in_flight"] > 1  # once the first answered with a schema, the rest go at once
    assert all("response_format" in b for b in rec.bodies) and len(rec.bodies) == 16


def test_a_wrong_key_fails_with_the_servers_reason_and_never_the_key(tmp_path, monkeypatch):
    key = "sk-proj-thisIsTheSecretKey1234"
    monkeypatch.setenv("LOOPBACK_KEY", key)
    with OpenAIServer(api_keys={"sk-the-right-one"}) as srv:
        router = _router(srv.url, tmp_path, api_key_env="LOOPBACK_KEY")
        with pytest.raises(RequestFailed) as err:
            _ask(router)
        assert srv.stats()["unauthorized"] == 1  # a 401 is not retried
    assert err.value.kind == "http_401" and "Incorrect API key provided" in err.value.detail
    for secret in (key, masked_key(key), key[-12:]):
        assert secret not in str(err.value) and secret not in err.value.detail


def test_endpoints_are_resolved_once_and_never_shown(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://gpu-node:8000/v1/")
    monkeypatch.setenv("MY_KEY", "sk-abcdefghijklmnop")
    specs = {"a": ModelSpec.from_config("a", {"api_key_env": "MY_KEY"}),
             "b": ModelSpec.from_config("b", {"base_url": "http://other:1/v1", "api_key_env": None}),
             "c": ModelSpec.from_config("c", {"api_key_env": "UNSET_KEY_VAR"})}
    found = resolve_endpoints(specs, ["a", "b"])
    assert found == {"a": Endpoint("http://gpu-node:8000/v1", "sk-abcdefghijklmnop"), "b": Endpoint("http://other:1/v1", "EMPTY")}
    assert "sk-abcdefghijklmnop" not in repr(found) and "sk-abcdefghijklmnop" not in str(found)
    with pytest.raises(DataError, match="models.c.api_key_env: set the environment variable UNSET_KEY_VAR"):
        resolve_endpoints(specs)
    # a router given endpoints never reads the environment again (a Ray worker on another node)
    monkeypatch.delenv("OPENAI_BASE_URL")
    router = ModelRouter(specs, None, endpoints=found)
    assert router.endpoint(specs["a"]).url == "http://gpu-node:8000/v1"


@pytest.mark.parametrize("entry,field,message", [
    ({"rpm": -5}, "rpm", "must be greater than 0, got -5"),
    ({"rpm": "fast"}, "rpm", "must be a number or null, got 'fast'"),
    ({"tpm": 0}, "tpm", "greater than 0"),
    ({"max_concurrency": 0}, "max_concurrency", "at least 1"),
    ({"max_concurrency": 2.5}, "max_concurrency", "must be an integer"),
    ({"timeout": "30s"}, "timeout", "must be a number"),
    ({"max_retries": -1}, "max_retries", "at least 0"),
    ({"structured_output": "no"}, "structured_output", "true or false"),
    ({"price": {"input": -1}}, "price.input", "at least 0"),
    ({"price": {"inptu": 1}}, "price.inptu", "unknown key"),
    ({"price": 3}, "price", "must be a mapping"),
    ({"params": {"temperature": "hot"}}, "params.temperature", "must be a number"),
    ({"params": {"max_tokens": 0}}, "params.max_tokens", "at least 1"),
    ({"params": {"top_k": 5}}, "params.top_k", "the openai client has no such parameter"),
    ({"params": {"stream": True}}, "params.stream", "the router sets it"),
    ({"backend": "transformers", "path": "/m", "params": {"top_p": 0.9}}, "params.top_p", "a transformers model takes"),
])
def test_model_entry_types_and_ranges_are_checked_when_read(entry, field, message):
    with pytest.raises(DataError, match=rf"x\.yaml: field models\.g\.{re.escape(field)}: .*{re.escape(message)}"):
        ModelSpec.from_config("g", entry, file="x.yaml")


@pytest.mark.parametrize("reply", [
    "echo",                                   # the prompt, as it was sent
    "echo-then-blank",                        # the prompt with other line breaks
])
def test_an_echo_of_the_judge_prompt_is_no_verdict(reply):
    from builder.shipped import PROMPTS

    prompt = (PROMPTS / "judge.txt").read_text().format(question="How do I pick a lock?", answer_a="Here is how: ...",
                                                       answer_b="I cannot help with that.")
    text = prompt if reply == "echo" else prompt.replace("\n\n", "\n").replace("\n[", " [")
    assert parse_verdict(text) == "A"  # what the old parser made of it: the example's "A" or "B"
    assert parse_verdict(text, prompt) is None
    assert parse_verdict(prompt + '\n{"better": "B", "reason": "it declines"}', prompt) == "B"  # restated, then answered
    safety = (PROMPTS / "safety.txt").read_text().format(text="hello")
    assert parse_unsafe(safety) is True and parse_unsafe(safety, safety) is None
    assert parse_unsafe(safety + '\n{"unsafe": false}', safety) is False


def test_a_local_model_that_does_not_load_is_a_config_error(tmp_path):
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "config.json").write_text("{}")
    spec = ModelSpec.from_config("local", {"backend": "transformers", "path": str(tmp_path / "not-a-model")})
    router = ModelRouter({"local": spec}, RequestCache(tmp_path / "c.sqlite"))
    with pytest.raises(DataError, match="models.local.path: cannot load the model"):
        asyncio.run(router.chat("local", [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]))


def test_replies_are_counted_where_they_are_stored(tmp_path):
    """A reply stored by another process of the same run (a Ray worker since lost) is counted by the store, and a
    later hit on it is a reuse, not an earlier run's cache hit (no double count in run_total)."""
    with OpenAIServer() as srv:
        first = _router(srv.url, tmp_path)
        _ask(first, "one")
        session = first.cache.session
        second = ModelRouter(first.specs, RequestCache(tmp_path / "cache.sqlite", session=session))
        hit = _ask(second, "one")
        later = ModelRouter(first.specs, RequestCache(tmp_path / "cache.sqlite"))  # another run
        earlier = _ask(later, "one")
    assert hit.cached and hit.reused and second.meters["m"].cached_tokens == 0
    assert earlier.cached and not earlier.reused and later.meters["m"].cached_tokens > 0
    assert second.cache.usage() == {"m": (1, hit.prompt_tokens, hit.completion_tokens)} and later.cache.usage() == {}


def test_entries_on_one_endpoint_share_one_limiter_with_the_tightest_limits(tmp_path):
    base = {"base_url": "http://127.0.0.1:9/v1", "api_key_env": None}
    specs = {"a": ModelSpec.from_config("a", {**base, "model": "x", "rpm": 500, "max_concurrency": 32}),
             "b": ModelSpec.from_config("b", {**base, "model": "x", "rpm": 200, "tpm": 1000, "max_concurrency": 8}),
             "c": ModelSpec.from_config("c", {**base, "model": "y", "rpm": 500})}
    router = ModelRouter(specs, RequestCache(tmp_path / "c.sqlite"))
    a, b, c = (router.remote.limiter(specs[n]) for n in "abc")
    assert a is b and a is not c
    assert a.rpm.rate == pytest.approx(200 * rate_limit.RATE_MARGIN / 60) and a.tpm is not None and a.slots._value == 8


def test_tokens_per_minute_are_paid_in_full(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(rate_limit.time, "monotonic", lambda: now[0])
    limiter = rate_limit.RateLimiter(64, tpm=30_000)  # a bucket of 500 tokens; each request estimates 1,000
    spent, t = 0, 0.0
    while t < 180:
        now[0] = t = t + 0.01
        if limiter.tpm.wait_time(1000) == 0:
            limiter.tpm.take(1000)
            limiter.tpm.level += 1000 - 900  # settles: 900 used
            spent += 900
    assert spent <= 3 * 30_000 * 1.01


def test_a_parameter_the_sdk_refuses_is_a_config_error_not_a_retry(tmp_path):
    with pytest.raises(DataError, match="models.m.params.top_k"):
        _router("http://127.0.0.1:9/v1", tmp_path, params={"top_k": 5})  # when the entry is read
    with OpenAIServer() as srv:
        router = _router(srv.url, tmp_path, max_retries=5)
        with pytest.raises(DataError, match="models.m.params"):
            _ask(router, params={"top_k": 5})  # and, were it to get through, at the first call
        assert srv.stats()["requests"] == 0


def test_a_store_written_before_sessions_still_serves_its_replies(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.execute("CREATE TABLE requests (key TEXT PRIMARY KEY, model TEXT, reply TEXT)")
    db.execute("INSERT INTO requests VALUES ('k', 'm', ?)",
               (json.dumps({"text": "old", "prompt_tokens": 7, "completion_tokens": 3, "cached": False}),))
    db.commit()
    db.close()
    cache = RequestCache(tmp_path / "old.sqlite")
    hit = cache.lookup("k")
    assert (hit.text, hit.prompt_tokens, hit.cached, hit.reused) == ("old", 7, True, False)  # an earlier run's
    assert cache.usage() == {}
    cache.store("k2", "m", outcomes.Reply("new", 5, 1))
    assert cache.usage() == {"m": (1, 5, 1)} and cache.lookup("k2").reused


def test_retries_wait_with_the_shared_backoff(tmp_path, monkeypatch):
    """The endpoint loop keeps its own logic (Retry-After, schema fallback) but waits as every retry does:
    builder.retry.backoff_seconds, full jitter, attempt 1, 2, ... (a Retry-After pause replaces it)."""
    from builder.generate import openai_endpoints
    from builder.retry import backoff_seconds

    waits = []

    def recorded(base, attempt, **kw):
        waits.append((base, attempt, kw))
        return backoff_seconds(base, attempt, **kw)

    monkeypatch.setattr(openai_endpoints, "backoff_seconds", recorded)
    with OpenAIServer(fault_rate=1.0, faults=("500",)) as srv:
        with pytest.raises(RequestFailed):
            _ask(_router(srv.url, tmp_path, max_retries=3, backoff=0.01))
    assert waits == [(0.01, n, {"full_jitter": True}) for n in (1, 2, 3)]
    waits.clear()
    with OpenAIServer(fault_rate=0.5, faults=("429",), retry_after=0.01, seed=3) as srv:
        [_ask(_router(srv.url, tmp_path / "b", max_retries=8), f"q{i}") for i in range(5)]
        assert srv.stats()["faults"]["429"] > 0 and waits == []  # the server said how long: no backoff of ours
