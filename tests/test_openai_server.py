"""The loopback OpenAI server, driven by the real openai clients over HTTP."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.client import HTTPConnection
from urllib.parse import urlsplit

import openai
import pytest
from openai_server import (
    IMAGE_TOKENS,
    OpenAIServer,
    _prompt_tokens,
    echo_responder,
    generic_responder,
    masked_key,
    request_key,
    spawn_server,
)


def _body(text: str = "hi", **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


def _client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="test", **({"max_retries": 0} | kw))


def _get(url: str, path: str) -> tuple[int, dict]:
    parts = urlsplit(url)
    http = HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        http.request("GET", path)
        r = http.getresponse()
        return r.status, json.loads(r.read())
    finally:
        http.close()


def test_round_trip_returns_the_responders_text_and_usage():
    with OpenAIServer(responder=lambda body: "x" * 40) as server, _client(server) as client:
        reply = client.chat.completions.create(**_body("hello"))
        assert reply.object == "chat.completion" and reply.model == "m"
        assert reply.choices[0].message.content == "x" * 40 and reply.choices[0].finish_reason == "stop"
        prompt = _prompt_tokens(_body("hello")["messages"])
        assert prompt > 0
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (prompt, 10, prompt + 10)
        assert [m.id for m in client.models.list()] == ["loopback"]
        assert server.served() == {request_key(_body("hello")): 1}
        assert server.stats()["ok"] == server.stats()["requests"] == 1


def test_generic_responder_is_deterministic_and_reads_text_parts():
    image = {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}
    body = {"model": "m", "messages": [{"role": "user", "content": [image, {"type": "text", "text": "what is shown?"}]}]}
    text = generic_responder(body)
    assert text == generic_responder(json.loads(json.dumps(body))) and text.endswith("to: what is shown?")
    assert text.startswith(f"loopback reply {request_key(body)[:8]}")


SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["safe", "unsafe", "unclear"]},
        "reason": {"type": "string"},
        "flagged": {"type": "boolean"},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "detail": {"$ref": "#/$defs/Detail"},
    },
    "required": ["label", "reason", "flagged", "score", "confidence", "tags", "detail"],
    "additionalProperties": False,
    "$defs": {"Detail": {"type": "object", "properties": {"note": {"type": ["string", "null"]}}, "required": ["note"]}},
}


def test_json_schema_responses_parse_and_satisfy_the_schema():
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    with OpenAIServer() as server, _client(server) as client:
        labels = set()
        for i in range(12):
            reply = client.chat.completions.create(**_body(f"question {i}"), response_format=fmt)
            value = json.loads(reply.choices[0].message.content)
            jsonschema.validate(value, SCHEMA)
            labels.add(value["label"])
        assert len(labels) > 1  # the enum value depends on the messages


def test_injected_429_is_a_rate_limit_error_with_retry_after():
    with OpenAIServer(fault_rate=1.0, faults=("429",), retry_after=0.2) as server, _client(server) as client:
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(**_body())
        assert err.value.response.headers["retry-after"] == "0.2"
        assert err.value.body["type"] == "rate_limit_exceeded"
        assert server.stats()["faults"]["429"] == 1 and server.stats()["rate_limited"] == 0 and not server.served()


def test_injected_500_is_an_internal_server_error():
    with OpenAIServer(fault_rate=1.0, faults=("500",)) as server, _client(server) as client:
        for i in range(6):
            with pytest.raises(openai.InternalServerError) as err:
                client.chat.completions.create(**_body(f"q{i}"))
            assert err.value.status_code in (500, 502, 503)
        assert server.stats()["faults"]["500"] == 6 and server.stats()["ok"] == 0


def test_malformed_reply_makes_the_client_raise_a_json_decode_error():
    # openai 3.x parses a 200 application/json body with response.json() and does not wrap the error.
    with OpenAIServer(fault_rate=1.0, faults=("malformed",)) as server, _client(server) as client:
        with pytest.raises(json.JSONDecodeError):
            client.chat.completions.create(**_body())
        assert server.stats()["faults"]["malformed"] == 1 and server.stats()["ok"] == 0


def test_hang_runs_into_the_client_timeout():
    with OpenAIServer(fault_rate=1.0, faults=("hang",)) as server, _client(server, timeout=0.5) as client:
        start = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(**_body())
        assert time.monotonic() - start < 5
    # close() woke the hung thread and returned at once (the `with` above would otherwise take 30 s)


def test_retries_of_the_same_body_get_fresh_draws_and_succeed():
    with OpenAIServer(fault_rate=0.5, faults=("429", "500"), retry_after=0.01) as server, _client(server) as client:
        for i in range(10):
            reply = None
            for _attempt in range(30):
                try:
                    reply = client.chat.completions.create(**_body(f"q{i}"))
                    break
                except (openai.RateLimitError, openai.InternalServerError):
                    pass
            assert reply is not None
        stats = server.stats()
        assert stats["ok"] == 10 and stats["requests"] == 10 + sum(stats["faults"].values())
        assert sum(stats["faults"].values()) > 0
    # The real client's own retries (honouring Retry-After) get through as well.
    with OpenAIServer(fault_rate=0.5, faults=("429",), retry_after=0.01) as server, _client(server, max_retries=20) as client:
        for i in range(10):
            client.chat.completions.create(**_body(f"q{i}"))
        assert server.stats()["ok"] == 10 and server.stats()["faults"]["429"] > 0


def _faulted_keys(seed: int) -> set[str]:
    faults = ("429", "500", "malformed")
    with OpenAIServer(fault_rate=0.2, faults=faults, seed=seed) as server, _client(server) as client:
        for i in range(200):
            try:
                client.chat.completions.create(**_body(f"prompt {i}"))
            except (openai.APIStatusError, json.JSONDecodeError):
                pass
        stats = server.stats()
        assert stats["requests"] == 200 and stats["ok"] + sum(stats["faults"].values()) == 200
        return {request_key(_body(f"prompt {i}")) for i in range(200)} - set(server.served())


def test_fault_fraction_is_about_the_rate_and_deterministic_per_seed():
    first, again, other = _faulted_keys(0), _faulted_keys(0), _faulted_keys(1)
    assert 0.1 <= len(first) / 200 <= 0.3
    assert first == again and first != other


def test_rpm_limit_answers_429_past_the_limit():
    with OpenAIServer(rpm_limit=5) as server, _client(server) as client:
        for i in range(5):
            client.chat.completions.create(**_body(f"q{i}"))
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(**_body("q5"))
        assert 59 < float(err.value.response.headers["retry-after"]) <= 60  # the first slot frees in a minute
        stats = server.stats()
        assert stats["rate_limited"] == 1 and stats["ok"] == 5 and stats["faults"]["429"] == 0
        assert request_key(_body("q5")) not in server.served()
        server.reset()  # empties the window
        client.chat.completions.create(**_body("q5"))
        assert server.stats()["ok"] == 1


def test_pause_after_holds_requests_until_resume():
    async def scenario(server):
        async with openai.AsyncOpenAI(base_url=server.url, api_key="test", max_retries=0) as client:
            tasks = [asyncio.create_task(client.chat.completions.create(**_body(f"q{i}"))) for i in range(8)]
            assert await asyncio.to_thread(server.wait_for_ok, 3, 5)
            await asyncio.sleep(0.3)
            stats = server.stats()
            assert stats["ok"] == 3 and stats["held"] == 5 and sum(t.done() for t in tasks) == 3
            assert not server.wait_for_ok(4, 0.1)
            server.resume()
            replies = await asyncio.gather(*tasks)
            assert len(replies) == 8 and server.stats()["held"] == 0

    with OpenAIServer(pause_after=3) as server:
        asyncio.run(scenario(server))
        assert server.stats()["ok"] == 8 and sum(server.served().values()) == 8


def test_close_drops_held_requests():
    with OpenAIServer(pause_after=0) as server, _client(server, timeout=5) as client:
        start = time.monotonic()

        def close_soon():
            time.sleep(0.3)
            server.close()

        threading.Thread(target=close_soon).start()
        with pytest.raises(openai.APIConnectionError):
            client.chat.completions.create(**_body())
        assert time.monotonic() - start < 3


def _until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_replies_for_clients_that_left_are_dropped_not_counted():
    # A client that timed out during the latency gets no reply, and it is not counted as served.
    with OpenAIServer(latency=0.6) as server, _client(server, timeout=0.2) as client:
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(**_body())
        assert _until(lambda: server.stats()["dropped"] == 1)
        assert server.stats()["ok"] == 0 and not server.served() and server.stats()["in_flight"] == 0
    # A held request whose client is gone (killed) is dropped on resume().
    with OpenAIServer(pause_after=0) as server:
        parts = urlsplit(server.url)
        http = HTTPConnection(parts.hostname, parts.port, timeout=5)
        http.request("POST", "/v1/chat/completions", body=json.dumps(_body()), headers={"Content-Type": "application/json"})
        assert _until(lambda: server.stats()["held"] == 1)
        http.close()
        server.resume()
        assert _until(lambda: server.stats()["dropped"] == 1)
        assert server.stats()["ok"] == 0 and server.stats()["held"] == 0


def test_admin_routes_and_openai_error_shape():
    with OpenAIServer() as server, _client(server) as client:
        client.chat.completions.create(**_body())
        base = server.url.removesuffix("/v1")
        status, stats = _get(base, "/_stats")
        assert status == 200 and stats["ok"] == 1 and stats["requests"] == 1
        assert _get(base, "/_served") == (200, {request_key(_body()): 1})
        status, error = _get(base, "/v1/nope")
        assert status == 404 and set(error["error"]) >= {"message", "type", "code"}


def test_concurrent_requests_are_handled_at_once():
    async def burst(server):
        async with openai.AsyncOpenAI(base_url=server.url, api_key="test", max_retries=0) as client:
            return await asyncio.gather(*(client.chat.completions.create(**_body(f"q{i}")) for i in range(32)))

    with OpenAIServer(latency=0.3) as server:
        start = time.monotonic()
        replies = asyncio.run(burst(server))
        elapsed = time.monotonic() - start
        assert len(replies) == 32 and server.stats()["max_in_flight"] >= 32 and server.stats()["in_flight"] == 0
        assert elapsed < 2.0  # 32 × 0.3 s one after another would be 9.6 s


def test_spawn_server_runs_in_its_own_process():
    with spawn_server(responder=generic_responder, latency=0.01, rpm_limit=100) as server:
        assert server.process.poll() is None
        with _client(server) as client:
            for i in range(3):
                client.chat.completions.create(**_body(f"q{i}"))
        assert server.stats()["ok"] == 3 and server.wait_for_ok(3, 1)
        assert server.served() == {request_key(_body(f"q{i}")): 1 for i in range(3)}
        server.reset()
        assert server.stats()["ok"] == 0 and not server.served()
    assert server.process.returncode == 0


def test_an_image_costs_fixed_tokens_whatever_its_data_url_size():
    def image(n):
        url = "data:image/png;base64," + "A" * n
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]

    text_only = _prompt_tokens([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert _prompt_tokens(image(100)) == _prompt_tokens(image(100_000)) == text_only + IMAGE_TOKENS


def test_api_keys_answer_a_wrong_key_as_openai_does():
    with OpenAIServer(api_keys={"sk-right-key-0001"}) as server:
        with openai.OpenAI(base_url=server.url, api_key="sk-wrong-key-123456", max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError) as err:
                client.chat.completions.create(**_body())
        with _client(server) as client:  # api_key="test"
            with pytest.raises(openai.AuthenticationError):
                client.chat.completions.create(**_body())
        with openai.OpenAI(base_url=server.url, api_key="sk-right-key-0001", max_retries=0) as client:
            assert client.chat.completions.create(**_body()).choices[0].message.content
        stats = server.stats()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    assert f"Incorrect API key provided: {masked_key('sk-wrong-key-123456')}." in err.value.message
    assert "sk-wrong-key-123456" not in err.value.message and masked_key("sk-wrong-key-123456").startswith("sk-wrong")
    assert (stats["unauthorized"], stats["ok"]) == (2, 1)


def test_echo_responder_repeats_the_prompt():
    body = {"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}},
                                                                    {"type": "text", "text": "line one\nline two"}]}]}
    with OpenAIServer(echo_responder) as server, _client(server) as client:
        reply = client.chat.completions.create(**body)
    assert reply.choices[0].message.content == "line one\nline two"
