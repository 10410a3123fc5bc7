"""Benchmark the model-access layer and the pipeline against the loopback OpenAI-compatible server.

    make bench                                          # runs this after bench_dataset.py
    .venv/bin/python bench/bench_generate.py --requests 3000 --concurrency 64 --latency 0.5

The server runs in a child process (``tests/openai_server.spawn_server``), so the CPU time measured
here (``time.process_time`` of this process) is the client's alone. Side by side, in one run:

1. **Throughput at a concurrency limit.** ``--requests`` distinct chat requests, ``--latency`` seconds
   each at the server, ``max_concurrency = --concurrency``: wall time against the latency bound
   (requests × latency / concurrency), and client CPU ms per request, through ``ModelRouter`` (cache,
   limiter, retries, accounting) and through the bare ``openai.AsyncOpenAI`` client with a semaphore.
2. **Requests per minute.** The server enforces ``--rpm`` (a sliding 60 s window, 429 past it) and the
   client is configured with the same ``rpm``: the sustained rate over ``--rpm_requests`` requests, as a
   share of the limit, and how many 429s our client provoked.
3. **Cached re-run.** ``generate`` on a config whose every model is on the server (``--units`` work units,
   server latency ``--pipeline_latency``), then the same command again: the second run's wall time as a
   share of the first's.

The last lines are a markdown table for the README. Exit status 0 when every measurement ran.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the project and its test doubles (the loopback server)

from openai_server import spawn_server  # noqa: E402

from builder.generate.model_spec import ModelSpec  # noqa: E402
from builder.generate.request_cache import RequestCache  # noqa: E402
from builder.generate.router import ModelRouter  # noqa: E402


def _messages(i: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": f"bench request {i}: describe a harmless picture."}]}]


async def _router_run(url: str, n: int, concurrency: int, cache_path: Path, rpm: float | None = None) -> dict:
    spec = ModelSpec.from_config("bench", {"base_url": url, "api_key_env": None, "max_concurrency": concurrency,
                                           "rpm": rpm, "timeout": 30, "params": {"max_tokens": 32}})
    cache = RequestCache(cache_path)
    router = ModelRouter({"bench": spec}, cache)
    sends: list[float] = []

    async def one(i: int):
        await router.chat("bench", _messages(i))
        sends.append(time.perf_counter())

    # Every request is a task at once, as a big run's units are: the limiter alone keeps the pace.
    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    await router.aclose()
    cache.close()
    m = router.meters["bench"]
    return {"wall": wall, "cpu_ms": cpu * 1000 / n, "retries": m.retries, "failed": m.failed, "done": sends}


async def _sdk_run(url: str, n: int, concurrency: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=30)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int):
        async with gate:
            await client.chat.completions.create(model="bench", messages=_messages(i), max_tokens=32)

    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    await client.close()
    return {"wall": wall, "cpu_ms": cpu * 1000 / n}


def bench_concurrency(args, work: Path) -> list[tuple[str, str, str]]:
    bound = args.requests * args.latency / args.concurrency
    with spawn_server(latency=args.latency) as server:
        ours = asyncio.run(_router_run(server.url, args.requests, args.concurrency, work / "c.sqlite"))
        in_flight = server.stats()["max_in_flight"]
        server.reset()
        sdk = asyncio.run(_sdk_run(server.url, args.requests, args.concurrency))
    print(f"[1] {args.requests} requests, concurrency {args.concurrency}, latency {args.latency}s: bound {bound:.1f}s; "
          f"ModelRouter {ours['wall']:.1f}s ({ours['wall'] / bound:.3f}x bound, {ours['cpu_ms']:.2f} CPU ms/req, "
          f"server saw {in_flight} at once); bare openai client {sdk['wall']:.1f}s ({sdk['cpu_ms']:.2f} CPU ms/req)")
    ratio = ours["wall"] / bound
    return [
        (f"{args.requests:,} requests, concurrency {args.concurrency}, {args.latency * 1000:.0f} ms latency: wall / bound "
         f"({bound:.1f} s)", f"{ours['wall']:.1f} s = **{ratio:.3f}×** (bare openai client {sdk['wall'] / bound:.3f}×)",
         "≤ 1.15× " + ("✓" if ratio <= 1.15 else "✗")),
        ("client CPU per request", f"**{ours['cpu_ms']:.2f} ms** (bare openai client {sdk['cpu_ms']:.2f} ms; ours adds "
         f"{ours['cpu_ms'] - sdk['cpu_ms']:.2f} ms: cache, limiter, accounting)", "small beside the SDK"),
    ]


def bench_rpm(args, work: Path) -> list[tuple[str, str, str]]:
    with spawn_server(latency=args.rpm_latency, rpm_limit=args.rpm) as server:
        ours = asyncio.run(_router_run(server.url, args.rpm_requests, args.concurrency, work / "r.sqlite", rpm=args.rpm))
        provoked = server.stats()["rate_limited"]
    done = sorted(ours["done"])
    # Sustained rate: completions per minute between the first and the last, in steady state.
    rate = (len(done) - 1) / (done[-1] - done[0]) * 60
    share = rate / args.rpm
    print(f"[2] server limit {args.rpm} rpm, client rpm {args.rpm}: {len(done)} requests in {ours['wall']:.1f}s, "
          f"sustained {rate:.0f} rpm ({share:.1%} of the limit), 429s provoked: {provoked}, retries {ours['retries']}")
    return [(f"{args.rpm:,} rpm enforced by the server, client set to {args.rpm:,} rpm ({args.rpm_requests:,} requests, "
             f"{ours['wall']:.0f} s)", f"sustained **{share:.1%}** of the limit; **{provoked}** 429s provoked",
             "≥ 95%, no 429 " + ("✓" if share >= 0.95 and provoked == 0 else "✗"))]


def bench_cached_rerun(args, work: Path) -> list[tuple[str, str, str]]:
    from pipeline_doubles import write_config

    from builder.generate.pipeline import generate

    with spawn_server(latency=args.pipeline_latency, responder=_responder()) as server:
        cfg = write_config(work / "run.yaml", server.url, limit_keys={"max_concurrency": 64})
        t0 = time.perf_counter()
        first = generate(cfg, work / "run", limit=args.units, progress=False)
        t1 = time.perf_counter()
        second = generate(cfg, work / "run", limit=args.units, progress=False)
        t2 = time.perf_counter()
    share = (t2 - t1) / (t1 - t0)
    print(f"[3] generate --limit {args.units}: first run {t1 - t0:.1f}s ({first['requests']['sent']} requests sent), "
          f"cached re-run {t2 - t1:.2f}s ({second['requests']['sent']} sent, {second['requests']['cached']} cached): "
          f"{share:.1%} of the first")
    return [(f"`generate --limit {args.units}` re-run of a finished run ({first['requests']['sent']:,} requests, "
             f"{args.pipeline_latency * 1000:.0f} ms latency)", f"{t2 - t1:.2f} s vs {t1 - t0:.1f} s = **{share:.1%}**, "
             f"{second['requests']['sent']} requests sent", "< 10% " + ("✓" if share < 0.10 else "✗"))]


def _responder():
    from pipeline_doubles import pipeline_responder

    return pipeline_responder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--latency", type=float, default=0.5)
    p.add_argument("--rpm", type=int, default=3000)
    p.add_argument("--rpm_requests", type=int, default=3500, help="> rpm, so the server's 60 s window fills and slides")
    p.add_argument("--rpm_latency", type=float, default=0.05)
    p.add_argument("--units", type=int, default=60)
    p.add_argument("--pipeline_latency", type=float, default=0.2)
    p.add_argument("--only", choices=("concurrency", "rpm", "rerun"), default=None)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    rows: list[tuple[str, str, str]] = []
    try:
        for name, fn in (("concurrency", bench_concurrency), ("rpm", bench_rpm), ("rerun", bench_cached_rerun)):
            if args.only in (None, name):
                rows += fn(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import openai

    print(f"\nmachine: {platform.machine()}, {platform.python_version()}, openai {openai.__version__}; "
          "command: .venv/bin/python bench/bench_generate.py\n")
    print("| measurement | result | target |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
