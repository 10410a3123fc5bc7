"""The Ray executor of the pipeline: chunks of work units as Ray tasks, on this machine or a cluster.

``run_on_ray`` starts Ray (``ray.init()``, or the cluster at ``RAY_ADDRESS``) and runs chunks of units
as tasks that share the run store through an actor pinned to the driver's node, so workers need no
shared filesystem and every reply lands in the driver's ``run.sqlite``. The driver hands each task the
endpoints it resolved (URL and key), so a worker never reads ``OPENAI_BASE_URL`` or a key from its own
node's environment; nothing of them is written to the run directory.

Each of the N tasks in flight gets 1/N of every endpoint's limits. A lost worker or node is Ray's to
retry (a task re-run finds the replies already stored and sends nothing twice; what was paid for is
counted where the replies are stored, see :meth:`builder.generate.request_cache.RequestCache.usage`). A config
error raised in a worker stops the run with that error, as it does locally.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import threading

from builder.errors import DataError
from builder.generate.model_spec import Endpoint
from builder.generate.outcomes import Meter
from builder.generate.router import ModelRouter
from builder.generate.run_store import RunStore
from builder.generate.units import failed_record, process_unit

CHUNK_MAX = 32  # units per task: small chunks land often and leave little in flight


class _StoreActor:
    """The run store behind a Ray actor on the driver's node: workers on any machine share one cache."""

    def __init__(self, run_dir: str, session: str):
        self.store = RunStore(run_dir, session=session)  # the driver's session: replies count as this run's

    def get(self, key):
        return self.store.lookup(key)

    def put(self, key, model, reply):
        self.store.store(key, model, reply)

    def get_mark(self, name):
        return self.store.mark(name)

    def put_mark(self, name, value):
        self.store.set_mark(name, value)


class _ActorCache:
    """What the router awaits (get, put, get_mark, put_mark), answered by the actor."""

    def __init__(self, actor):
        self.actor = actor

    async def get(self, key):
        return await self.actor.get.remote(key)

    async def put(self, key, model, reply):
        await self.actor.put.remote(key, model, reply)

    async def get_mark(self, name):
        return await self.actor.get_mark.remote(name)

    async def put_mark(self, name, value):
        await self.actor.put_mark.remote(name, value)


def _ray_chunk(cfg, units: list[tuple[dict, bytes]], actor, share: float, until: str, endpoints: dict[str, Endpoint]):
    """A Ray task: run a chunk of units with a share of the limits; return their records and meters."""

    async def run():
        router = ModelRouter(cfg.models, _ActorCache(actor), limit_share=share, endpoints=endpoints)
        try:
            records = await asyncio.gather(*(process_unit(router, cfg, meta, data, until) for meta, data in units))
        finally:
            await router.aclose()
        return records, router.meters

    return asyncio.run(run())


def _config_error(exc: BaseException) -> DataError | None:
    """The DataError a task raised (Ray wraps it with a traceback), as the one line the local run gives."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, DataError):
        return DataError(cause.message, file=cause.file, row=cause.row, field=cause.field)
    return None


def connect() -> None:
    """Start Ray here, or join the cluster at RAY_ADDRESS. Call it from the main thread: Ray installs its
    signal handlers there (from another thread it warns on stderr, and the run's one line would not be alone)."""
    import ray

    if ray.is_initialized():
        return
    on_sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    if on_sigterm is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)  # ray.init sets its own: the CLI's handling of SIGTERM stays


def run_on_ray(cfg, store: RunStore, endpoints: dict[str, Endpoint], meters: dict[str, Meter], metas: list[dict],
               until: str, on_record) -> None:
    """Run ``metas`` through the model stages on Ray; ``on_record(record)`` stores and shows each finished unit."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    connect()  # a no-op when generate() has connected already
    workers = cfg.run.ray_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    # num_cpus=0: the store must sit on the driver's node even when that node lends no CPU to tasks
    actor = ray.remote(_StoreActor).options(scheduling_strategy=here, num_cpus=0).remote(str(store.dir), store.session)
    task = ray.remote(num_cpus=1, max_retries=3)(_ray_chunk)
    size = max(1, min(CHUNK_MAX, math.ceil(len(metas) / (workers * 4))))
    chunks = [metas[i:i + size] for i in range(0, len(metas), size)]
    pending: list = []
    chunk_of: dict = {}
    try:
        while chunks or pending:
            while chunks and len(pending) < workers:  # at most `workers` at once, so 1/workers of each limit holds
                chunk = chunks.pop(0)
                ref = task.remote(cfg, [(m, store.image_data(m["sha256"])) for m in chunk], actor, 1 / workers, until,
                                  endpoints)
                pending.append(ref)
                chunk_of[ref] = chunk
            done, pending = ray.wait(pending, num_returns=1)
            try:
                records, chunk_meters = ray.get(done[0])
            except Exception as e:  # noqa: BLE001 - a lost worker or node (after Ray's retries) fails its chunk's units
                config_error = _config_error(e)
                if config_error is not None:
                    for ref in pending:
                        ray.cancel(ref, force=True)
                    raise config_error from None
                records = [failed_record(cfg, m, until, "questions", None, type(e).__name__, str(e).splitlines()[0][:300])
                           for m in chunk_of[done[0]]]
                chunk_meters = {}
            for record in records:
                on_record(record)
            for name, m in chunk_meters.items():
                meters[name].merge(m)
    finally:
        ray.kill(actor)
