"""The review page's web server: starlette on uvicorn, bound to 127.0.0.1 unless told otherwise.

The page (``static/``: plain HTML, CSS and JavaScript, nothing from the internet) talks to a small
JSON API that knows pairs only by their opaque tokens and never sends which side the judge chose,
the row id, the models' names or the judge's rationale:

    GET  /api/session?reviewer=NAME      the sample's tokens in order, and which ones NAME has reviewed
    GET  /api/pair/TOKEN?reviewer=NAME   question, answers A and B, labels, NAME's verdict if any
    GET  /image/TOKEN                    the pair's image bytes
    POST /api/verdict                    {reviewer, token, pick: A|B|tie, unsafe: [a, b], note}: saved, then answered

Example::

    with ReviewServer(port=0).running(session) as server:    # a free port, served from a thread
        print(server.url)
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import socket
import threading
from pathlib import Path
from typing import Iterator

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from builder.errors import DataError
from builder.review.session import ReviewSession
from builder.review.store import check_reviewer

STATIC = Path(__file__).with_name("static")
NO_STORE = {"Cache-Control": "no-store"}
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=NO_STORE)


def _pair_view(session: ReviewSession, token: str, reviewer: str) -> dict:
    """What the page may know of a pair: nothing that tells the judge's side or the models apart."""
    pair = session.pair(token)
    text = session.texts[pair.id]
    first, second = (text.chosen, text.rejected) if pair.a_is == "chosen" else (text.rejected, text.chosen)
    own = session.store.latest().get((reviewer, pair.id))
    return {"token": token, "position": session.position[token], "total": len(session.pairs),
            "question": text.question, "answers": [first, second],
            "labels": [pair.class1, pair.class2, pair.class3], "image": f"/image/{token}",
            "verdict": None if own is None else {"pick": own.pick, "unsafe": [own.unsafe_a, own.unsafe_b], "note": own.note}}


def create_app(session: ReviewSession, *, allowed_hosts: list[str] | None = None) -> Starlette:
    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=NO_STORE)

    async def progress(request: Request) -> Response:
        try:
            reviewer = check_reviewer(request.query_params.get("reviewer"))
        except DataError as e:
            return _error(e.message)
        tokens, done = await run_in_threadpool(session.progress, reviewer)
        return JSONResponse({"reviewer": reviewer, "tokens": tokens, "done": done}, headers=NO_STORE)

    async def pair(request: Request) -> Response:
        try:
            reviewer = check_reviewer(request.query_params.get("reviewer"))
            view = await run_in_threadpool(_pair_view, session, request.path_params["token"], reviewer)
        except DataError as e:
            return _error(e.message)
        except KeyError:
            return _error("no such pair", 404)
        return JSONResponse(view, headers=NO_STORE)

    async def image(request: Request) -> Response:
        try:
            data = await run_in_threadpool(session.source.image, session.pair(request.path_params["token"]).id)
        except KeyError:
            return _error("no such pair", 404)
        return Response(data, media_type=_image_type(data), headers=NO_STORE)

    async def verdict(request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _error("send the verdict as application/json", 415)  # a cross-site form cannot post JSON
        try:
            body = await request.json()
            unsafe = body.get("unsafe", [False, False])
            if not isinstance(unsafe, list) or len(unsafe) != 2:
                raise DataError("unsafe must be two flags, for A and B", field="unsafe")
            reviewer = check_reviewer(body.get("reviewer"))
            await run_in_threadpool(session.give, reviewer, str(body.get("token")), body.get("pick"),
                                    unsafe[0], unsafe[1], body.get("note", ""))
        except DataError as e:
            return _error(e.message)
        except KeyError:
            return _error("no such pair", 404)
        except (ValueError, AttributeError):
            return _error("the body must be a JSON object")
        return JSONResponse({"saved": True}, headers=NO_STORE)

    routes = [Route("/", index), Route("/api/session", progress), Route("/api/pair/{token}", pair),
              Route("/image/{token}", image), Route("/api/verdict", verdict, methods=["POST"]),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["*"])]
    return Starlette(routes=routes, middleware=middleware)


def _image_type(data: bytes) -> str:
    try:
        return Image.MIME.get(Image.open(io.BytesIO(data)).format, "application/octet-stream")
    except Exception:  # noqa: BLE001 - a broken image is the data's problem; the browser shows it as broken
        return "application/octet-stream"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise DataError(f"cannot listen on {host}:{port}: {e.strerror or e}", field="port") from None
    sock.listen(128)
    return sock


class ReviewServer:
    """uvicorn serving the review app on a socket bound at once (a busy port fails before any work; port 0: a free one)."""

    def __init__(self, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT):
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise DataError("the port is a whole number from 0 to 65535 (0: any free port)", field="port")
        if not isinstance(host, str) or not host:
            raise DataError("the host is an address to listen on, e.g. 127.0.0.1", field="host")
        # Loopback only: accept this machine's names, so a web page elsewhere cannot reach us by DNS rebinding.
        self._hosts = ["127.0.0.1", "localhost", "::1", host] if _is_loopback(host) else ["*"]
        self._sock = _listen(host, port)
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{self._sock.getsockname()[1]}/"

    def close(self) -> None:
        self._sock.close()

    def _server(self, session: ReviewSession) -> uvicorn.Server:
        app = create_app(session, allowed_hosts=self._hosts)
        return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))

    def serve_forever(self, session: ReviewSession) -> None:
        """Serve in this thread until Ctrl-C (uvicorn shuts down gracefully)."""
        try:
            self._server(session).run(sockets=[self._sock])
        finally:
            self._sock.close()

    @contextlib.contextmanager
    def running(self, session: ReviewSession) -> Iterator["ReviewServer"]:
        """Serve from a thread while the block runs (tests, notebooks)."""
        server = self._server(session)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        thread.start()
        try:
            while not server.started and thread.is_alive():
                thread.join(0.02)
            yield self
        finally:
            server.should_exit = True
            thread.join(10)
            self._sock.close()
