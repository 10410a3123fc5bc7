"""A loopback OpenAI-compatible chat server for tests and benchmarks, with deterministic faults.

The real ``openai.OpenAI`` / ``openai.AsyncOpenAI`` clients (HTTP through ``httpx2``) talk to it over
real HTTP exactly as they talk to api.openai.com; nothing is mocked::

    with OpenAIServer(fault_rate=0.2, faults=("429", "500"), retry_after=0.05) as server:
        client = openai.OpenAI(base_url=server.url, api_key="test", max_retries=5)
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        reply.choices[0].message.content   # generic_responder's text: "loopback reply 1a2b3c4d to: hi"
        server.stats()                     # {"requests": 2, "ok": 1, "faults": {"429": 1, "500": 0}, ...}
        server.served()                    # Counter({request_key(body): 1})

    with spawn_server(latency=0.05) as server:   # the same server in a child process (benchmarks), whose
        server.url, server.stats()                # counters are read over the admin routes

``POST /v1/chat/completions`` goes through, in order: the ``api_keys`` check (when given, a request whose
``Authorization: Bearer`` key is not one of them gets OpenAI's 401 ``invalid_api_key``, which quotes the key
masked as OpenAI does, counted in ``unauthorized``), the ``rpm_limit`` limiter (a sliding 60 s window of
accepted requests; past it a 429 with ``Retry-After`` = seconds until a slot frees, counted in
``rate_limited``), fault injection, the ``pause_after`` hold, ``latency``, then ``responder(body)`` (a str;
``generic_responder`` by default) becomes a ``chat.completion`` with usage at ~4 characters per token.
``GET /v1/models`` lists ``loopback``. Admin: ``GET /_stats``, ``GET /_served``, ``POST /_reset``,
``POST /_resume``. Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.

Faults are deterministic: the n-th arrival (n = 0, 1, ...) of a body is faulty iff the first 8 bytes of
``sha256(f"{seed}:{request_key(body)}:{n}")``, as a fraction of 2**64, are below ``fault_rate``; more
bytes of that hash pick the kind from ``faults``. A retry of the same body draws afresh, so retries
succeed in the end, and servers with the same seed fault the same attempts. ``"429"``: ``Retry-After:
retry_after``. ``"500"``: 500, 502 or 503. ``"hang"``: no reply for ``hang_seconds`` (or until close),
then the connection drops; the client's timeout fires first. ``"malformed"``: a 200 JSON body cut short
(openai 3.x raises ``json.JSONDecodeError`` for it, unwrapped and not retried). Only well-formed 200
replies written to the socket count as ``ok`` and in ``served()``.

``pause_after=N``: the first N requests through the hold go on, later ones wait for ``resume()`` (or
close, which drops them), so a test can kill its client knowing every reply sent was received.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

FAULT_KINDS = ("429", "500", "hang", "malformed")
WINDOW = 60.0  # seconds: the rpm_limit sliding window
MALFORMED = b'{"id": "chatcmpl-x", "object": "chat.completion", "choices": ['


def request_key(body: dict) -> str:
    """sha256 hex of a request body's canonical JSON: what fault draws and ``served()`` are keyed by."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- the default responder -------------------------------------------------------------------------
IMAGE_TOKENS = 85  # what OpenAI bills a low-detail image; a data URL's base64 is not text tokens


def _prompt_tokens(messages: list) -> int:
    """~4 characters per token of text, plus IMAGE_TOKENS per image part."""
    chars, images = 0, 0
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        parts = content if isinstance(content, list) else [{"type": "text", "text": str(content or "")}]
        for part in parts:
            if isinstance(part, dict) and part.get("type") == "image_url":
                images += 1
            else:
                chars += len(json.dumps(part))
    return max(1, chars // 4 + IMAGE_TOKENS * images)


def generic_responder(body: dict) -> str:
    """Deterministic text: JSON fitting a ``json_schema`` response format, else a sentence quoting the user."""
    messages = body.get("messages") or []
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") or {}
        return json.dumps(_example(schema, schema, json.dumps(messages, sort_keys=True)))
    text = ""
    for m in reversed(messages):  # the last user message; content is a str or a list of parts
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            parts = content if isinstance(content, list) else [{"type": "text", "text": str(content or "")}]
            text = " ".join(p.get("text", "") for p in parts if isinstance(p, dict) and p.get("type") == "text")
            break
    return f"loopback reply {request_key(body)[:8]} to: {text[:60]}"


def echo_responder(body: dict) -> str:
    """The text of the last user message, as it came: a server (or a broken model) that repeats the prompt."""
    for m in reversed(body.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            parts = content if isinstance(content, list) else [{"type": "text", "text": str(content or "")}]
            return "\n".join(p.get("text", "") for p in parts if isinstance(p, dict) and p.get("type") == "text")
    return ""


def masked_key(key: str) -> str:
    """How OpenAI's 401 quotes a wrong key: its first 8 and last 4 characters around asterisks."""
    return f"{key[:8]}{'*' * max(4, len(key) - 12)}{key[-4:]}" if len(key) > 12 else "*" * len(key)


def _example(schema: dict, root: dict, salt: str):
    """A value satisfying the subset of JSON Schema that structured outputs use, chosen by ``salt``."""
    pick = int(hashlib.sha256(salt.encode()).hexdigest()[:12], 16)
    if "$ref" in schema:  # "#/$defs/Name", as pydantic writes them
        target = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return _example(target, root, salt)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][pick % len(schema["enum"])]
    for combinator in ("anyOf", "oneOf", "allOf"):
        if combinator in schema:
            options = [s for s in schema[combinator] if s.get("type") != "null"] or schema[combinator]
            return _example(options[0], root, salt)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return {name: _example(sub, root, f"{salt}/{name}") for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        n = max(schema.get("minItems", 0), min(1, schema.get("maxItems", 1)))
        return [_example(schema.get("items", {}), root, f"{salt}/{i}") for i in range(n)]
    lo, hi = schema.get("minimum", 0), schema.get("maximum", schema.get("minimum", 0) + 100)
    if kind == "integer":
        return int(lo) + pick % (int(hi) - int(lo) + 1)
    if kind == "number":
        return lo + (hi - lo) * (pick % 1000) / 1000
    if kind in ("boolean", "null"):
        return bool(pick & 1) if kind == "boolean" else None
    return f"loopback {pick:012x}"[: schema.get("maxLength", 1000)].ljust(schema.get("minLength", 0), "x")


# --- the server ------------------------------------------------------------------------------------
class OpenAIServer:
    """An OpenAI-compatible chat server in a background thread; a context manager, or ``start()`` and
    ``close()``. ``url`` is the client's ``base_url``."""

    def __init__(self, responder: Callable[[dict], str] | None = None, *, latency: float = 0.0,
                 fault_rate: float = 0.0, faults=FAULT_KINDS, retry_after: float = 0.2,
                 hang_seconds: float = 30.0, rpm_limit: int | None = None, seed: int = 0,
                 pause_after: int | None = None, json_schema: bool = True, api_keys=None, host: str = "127.0.0.1",
                 port: int = 0):
        faults = tuple(faults)
        if set(faults) - set(FAULT_KINDS) or (fault_rate > 0 and not faults):
            raise ValueError(f"faults must be a non-empty subset of {FAULT_KINDS}, got {faults}")
        self.responder = responder or generic_responder
        self.latency, self.fault_rate, self.faults, self.retry_after = latency, fault_rate, faults, retry_after
        self.hang_seconds, self.rpm_limit, self.seed, self.pause_after = hang_seconds, rpm_limit, seed, pause_after
        self.host, self.port, self.json_schema = host, port, json_schema  # False: 400 on response_format, as older servers
        self.api_keys = set(api_keys) if api_keys is not None else None  # None: no auth, as a local vLLM
        self._cond = threading.Condition()  # guards the counters; notified on each ok reply
        self._closing = threading.Event()  # wakes hung, held and sleeping requests at close
        self._resumed = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stats = {"in_flight": 0}
        self.reset()

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not running; use it as a context manager")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> Self:
        if self._httpd is None:
            self._closing.clear()
            self._httpd = _HTTPServer((self.host, self.port), type("BoundHandler", (_Handler,), {"api": self}))
            # A short poll interval: `shutdown()` waits for the loop to notice, and tests start many servers.
            self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="openai-server", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving; hung and held requests, and idle keep-alive connections, are dropped."""
        with self._cond:  # close() may race with itself (a test's thread, then __exit__)
            httpd, thread, self._httpd, self._thread = self._httpd, self._thread, None, None
        if httpd is not None:
            self._closing.set()
            self._resumed.set()
            httpd.shutdown()
            httpd.close_connections()
            httpd.server_close()
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        """requests, ok, faults (kind → count), rate_limited (by rpm_limit), unauthorized (a key not in
        api_keys), errors (bad body, responder
        failure), dropped (the client left before its reply was ready: timed out, killed), held (waiting
        on pause_after now), in_flight and max_in_flight (chat requests)."""
        with self._cond:
            return {**self._stats, "faults": dict(self._stats["faults"])}

    def served(self) -> collections.Counter:
        """request_key(body) → number of ok replies sent for it."""
        with self._cond:
            return collections.Counter(self._served)

    def reset(self) -> None:
        """Back to the just-started state: counters, fault attempts, the rpm window and the pause."""
        with self._cond:
            busy = self._stats["in_flight"]
            self._stats = {"requests": 0, "ok": 0, "faults": dict.fromkeys(self.faults, 0), "rate_limited": 0,
                           "unauthorized": 0, "errors": 0, "dropped": 0, "held": 0, "in_flight": busy, "max_in_flight": busy}
            self._served, self._attempts = collections.Counter(), collections.Counter()
            self._window: collections.deque[float] = collections.deque()  # times of accepted requests
            self._admitted = 0  # requests through the pause_after hold
            self._held_peers: list[tuple] = getattr(self, "_held_peers", [])  # kept: requests may be waiting
            self._resumed.clear()

    def resume(self) -> None:
        """Release the requests held by ``pause_after``; later ones are not held (until ``reset()``)."""
        self._resumed.set()

    def wait_for_ok(self, n: int, timeout: float) -> bool:
        """Block until at least ``n`` ok replies were sent; False if ``timeout`` seconds pass first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._stats["ok"] >= n, timeout)

    # --- the stages of a chat request, in order ------------------------------------------------------
    def _count(self, delta: int = 1, *names: str) -> None:
        with self._cond:
            for name in names:
                self._stats[name] += delta
            self._stats["max_in_flight"] = max(self._stats["max_in_flight"], self._stats["in_flight"])

    def _rate_wait(self) -> float | None:
        """None if the request fits in the rpm window (taking a slot), else seconds until a slot frees."""
        if self.rpm_limit is None:
            return None
        now = time.monotonic()
        with self._cond:
            while self._window and self._window[0] <= now - WINDOW:
                self._window.popleft()
            if len(self._window) < self.rpm_limit:
                self._window.append(now)
                return None
            self._stats["rate_limited"] += 1
            return max(0.001, self._window[0] + WINDOW - now)

    def _draw(self, key: str) -> tuple[str | None, bytes]:
        """This attempt's fault kind (None: no fault) and the hash it was drawn from."""
        with self._cond:
            n = self._attempts[key]
            self._attempts[key] += 1
        h = hashlib.sha256(f"{self.seed}:{key}:{n}".encode()).digest()
        if int.from_bytes(h[:8], "big") / 2**64 >= self.fault_rate:
            return None, h
        kind = self.faults[int.from_bytes(h[8:12], "big") % len(self.faults)]
        with self._cond:
            self._stats["faults"][kind] += 1
        return kind, h

    def _through_hold(self, peer: tuple) -> bool:
        """The pause_after hold: True to go on, False if the server closed while the request waited."""
        if self.pause_after is None:
            return True
        with self._cond:
            if self._resumed.is_set() or self._admitted < self.pause_after:
                self._admitted += 1
                return True
            self._stats["held"] += 1
            self._held_peers.append(peer)
        self._resumed.wait()
        with self._cond:
            self._held_peers.remove(peer)
        self._count(-1, "held")
        return not self._closing.is_set()

    def held_peers(self) -> list[tuple]:
        """The client addresses (host, port) of the requests the pause_after hold keeps waiting now."""
        with self._cond:
            return list(self._held_peers)

    def _finished(self, key: str | None) -> None:
        """A chat request is over: answered ok (``key``), or with an error, or dropped (None)."""
        with self._cond:
            self._stats["in_flight"] -= 1
            if key is not None:
                self._stats["ok"] += 1
                self._served[key] += 1
                self._cond.notify_all()


class _HTTPServer(ThreadingHTTPServer):
    """Threaded (daemon threads), a deep accept queue, open connections tracked so close() can drop them."""

    allow_reuse_address = True
    request_queue_size = 512  # 64+ clients connecting at once are never refused

    def __init__(self, *args):
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(*args)

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client that went away (killed, timed out) while its connection idled: not the server's error
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:  # wakes the threads blocked reading idle keep-alive connections
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    api: OpenAIServer  # set on the subclass that OpenAIServer builds
    chat = False  # a chat request is being handled and api._finished was not called for it yet

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def log_message(self, format, *args):  # quiet: stats() is the log
        pass

    def _dispatch(self, method: str) -> None:
        route = (method, urlsplit(self.path).path.rstrip("/"))
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))  # keeps the connection in sync
        api = self.api
        if route == ("POST", "/v1/chat/completions"):
            api._count(1, "requests", "in_flight")
            self.chat = True
            try:
                self._chat(raw)
            finally:
                if self.chat:  # dropped, or the client went away
                    api._finished(None)
        elif route == ("GET", "/v1/models"):
            self._json(200, {"object": "list", "data": [{"id": "loopback", "object": "model", "created": 0, "owned_by": "loopback"}]})
        elif route == ("GET", "/_stats"):
            self._json(200, api.stats())
        elif route == ("GET", "/_served"):
            self._json(200, dict(api.served()))
        elif route in (("POST", "/_reset"), ("POST", "/_resume")):
            api.reset() if route[1] == "/_reset" else api.resume()
            self._json(200, {"ok": True})
        else:
            self._error(404, f"no route for {method} {route[1]}", "invalid_request_error", "not_found")

    def _chat(self, raw: bytes) -> None:
        api = self.api
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise TypeError("not a JSON object")
        except (ValueError, TypeError) as e:
            api._count(1, "errors")
            return self._error(400, f"bad request body: {e}", "invalid_request_error")
        key = request_key(body)
        given = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if api.api_keys is not None and given not in api.api_keys:
            api._count(1, "unauthorized")
            return self._error(401, f"Incorrect API key provided: {masked_key(given)}. You can find your API key at "
                               "https://platform.openai.com/account/api-keys.", "invalid_request_error", "invalid_api_key")
        if not api.json_schema and "response_format" in body:
            api._count(1, "errors")
            return self._error(400, "response_format is not supported by this server", "invalid_request_error")
        if (wait := api._rate_wait()) is not None:
            return self._error(429, f"rpm_limit of {api.rpm_limit} reached", "rate_limit_exceeded",
                               "rate_limit_exceeded", {"Retry-After": f"{wait:.3f}"})
        kind, h = api._draw(key)
        if kind == "429":
            return self._error(429, "Rate limit reached (injected fault)", "rate_limit_exceeded",
                               "rate_limit_exceeded", {"Retry-After": f"{api.retry_after:g}"})
        if kind == "500":
            return self._error((500, 502, 503)[h[12] % 3], "The server had an error (injected fault)", "server_error")
        if kind == "malformed":
            return self._send(200, MALFORMED)
        if kind == "hang":
            api._closing.wait(api.hang_seconds)
        if kind == "hang" or not api._through_hold(self.client_address[:2]) or (api.latency and api._closing.wait(api.latency)):
            self.close_connection = True  # dropped without a reply: a hang, or the server closing
            return
        try:
            text = api.responder(body)
            if not isinstance(text, str):
                raise TypeError(f"the responder returned {type(text).__name__}, not str")
        except Exception as e:  # noqa: BLE001 -- any responder failure is the client's 500
            api._count(1, "errors")
            return self._error(500, f"responder failed: {e}", "server_error")
        prompt, completion = _prompt_tokens(body.get("messages", [])), max(1, len(text) // 4)
        reply = {
            "id": f"chatcmpl-{key[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "loopback"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }
        if self._peer_gone():  # it timed out or was killed meanwhile: the reply would go nowhere
            api._count(1, "dropped")
            self.close_connection = True
            return
        self._json(200, reply, ok_key=key)

    def _peer_gone(self) -> bool:
        try:  # b"" is end of stream; no data yet raises BlockingIOError
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:  # reset by the peer
            return True

    def _error(self, status: int, message: str, kind: str, code: str | None = None, headers: dict | None = None):
        return self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": code}}, headers)

    def _json(self, status: int, payload, headers: dict | None = None, ok_key: str | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers, ok_key)

    def _send(self, status: int, body: bytes, headers: dict | None = None, ok_key: str | None = None) -> None:
        """Write a whole response. The last byte goes out under the counters' lock, with the counting, so
        whoever has read a reply (a client, then ``stats()``) sees it counted, and nothing unsent is."""
        try:
            self.send_response(status, HTTPStatus(status).phrase)
            for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[:-1])
            with self.api._cond:
                self.wfile.write(body[-1:])
                if self.chat:
                    self.chat = False
                    self.api._finished(ok_key)
        except OSError:
            self.close_connection = True
            if self.chat:
                self.api._count(1, "dropped")


# --- the same server in a child process -------------------------------------------------------------
class ServerProcess:
    """An OpenAIServer in a child process (``spawn_server``); counters come over the admin routes."""

    def __init__(self, process: subprocess.Popen, url: str):
        self.process, self.url = process, url

    def _call(self, method: str, path: str):
        parts = urlsplit(self.url)
        http = HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            http.request(method, path, body=b"" if method == "POST" else None)
            return json.loads(http.getresponse().read())
        finally:
            http.close()

    def stats(self) -> dict:
        return self._call("GET", "/_stats")

    def served(self) -> collections.Counter:
        return collections.Counter(self._call("GET", "/_served"))

    def reset(self) -> None:
        self._call("POST", "/_reset")

    def resume(self) -> None:
        self._call("POST", "/_resume")

    def wait_for_ok(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.stats()["ok"] < n:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()  # the child closes its server and exits
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def spawn_server(**kwargs) -> ServerProcess:
    """``OpenAIServer(**kwargs)`` in a child Python process, so its CPU is not the caller's. The kwargs
    travel pickled: a ``responder`` must be a function the child can import (not one in ``__main__``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    module = __name__ if __name__ != "__main__" else "openai_server"
    code = f"import sys; sys.path[:0] = {[here, *sys.path]!r}; import {module} as m; m._serve_stdin()"
    args = pickle.dumps(kwargs)  # fails here, before a process exists, if something cannot be pickled
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    process.stdin.write(args)
    process.stdin.flush()
    url = process.stdout.readline().decode().strip()  # "" if the child died
    if not url.startswith("http://"):
        process.kill()
        process.wait()
        raise RuntimeError(f"the server process failed to start (exit code {process.returncode})")
    return ServerProcess(process, url)


def _serve_stdin() -> None:
    """The child's side: kwargs from stdin, the url to stdout, then serve until stdin closes."""
    server = OpenAIServer(**pickle.load(sys.stdin.buffer)).start()
    print(server.url, flush=True)
    os.dup2(2, 1)  # later prints (a responder's) go to stderr, not into a pipe nobody reads
    sys.stdin.buffer.read()  # EOF: the parent closed the pipe, or died
    server.close()
