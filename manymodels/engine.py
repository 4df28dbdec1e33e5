"""The Ray fan-out: the only module that imports ``ray`` (when an engine starts, not with this module:
a command that stops at bad input never pays for it).

An :class:`Engine` connects to Ray (a new embedded local instance by default, never a stray one; or
a cluster by address), runs one plain Python function over many chunk payloads as Ray tasks with
the job's resources, and yields each chunk's result as soon as its task finishes, so the driver
never holds more than the results still to fold. :func:`pack_chunks` (pure) decides which
partitions share a task.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["NOT_SUBMITTED", "Engine", "EngineError", "TaskResources", "pack_chunks"]

T = TypeVar("T")


class EngineError(RuntimeError):
    """Ray cannot be started or reached."""


class _NotSubmitted:
    """Marks a payload that :meth:`Engine.map` did not submit because its gate said stop."""

    def __repr__(self) -> str:
        return "NOT_SUBMITTED"


NOT_SUBMITTED = _NotSubmitted()


@dataclass(frozen=True)
class TaskResources:
    """What one task reserves from Ray's scheduler."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_mb: int = 0

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``.options()`` of a Ray remote function."""
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_mb:
            opts["memory"] = int(self.memory_mb) * 1024 * 1024
        return opts


def pack_chunks(sizes: Sequence[int], *, slots: int, min_rows: int = 2_000,
                max_rows: int = 250_000, max_items: int = 2_000, waves: int = 12) -> list[list[int]]:
    """Group consecutive items (partitions, by row count) into chunks of similar total size.

    The target chunk holds about ``total / (slots * waves)`` rows, clamped to
    ``[min_rows, max_rows]``: enough tasks to balance ``slots`` parallel workers and to stream
    results, few enough that per-task cost stays small against thousands of tiny partitions. An
    item larger than the target gets a chunk of its own, so one huge partition never holds up a
    batch of small ones. Order is kept (consecutive items usually share files).

    Args:
        sizes: rows per item, in plan order.
        slots: how many tasks can run at once.
        min_rows, max_rows: bounds of the target chunk size in rows.
        max_items: at most this many items per chunk.
        waves: tasks per slot to aim for.

    Returns:
        Lists of item indices; every index appears exactly once.
    """
    total = sum(sizes)
    target = min(max_rows, max(min_rows, total // max(1, slots * waves)))
    chunks: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for i, n in enumerate(sizes):
        if n >= target:
            if current:  # close the open chunk first, so chunks keep the items' order
                chunks.append(current)
                current, rows = [], 0
            chunks.append([i])
            continue
        if current and (rows + n > target or len(current) >= max_items):
            chunks.append(current)
            current, rows = [], 0
        current.append(i)
        rows += n
    if current:
        chunks.append(current)
    return chunks


def _warm() -> int:
    """Import the heavy libraries in a fresh worker while the driver is still planning."""
    import lightgbm  # noqa: F401

    import manymodels.pipeline  # noqa: F401

    return os.getpid()


def _shortfall(res: TaskResources, totals: dict[str, float]) -> str:
    """Why a task with ``res`` can never run on a cluster of ``totals`` ("" when it can)."""
    needs = (("CPU", res.num_cpus, 1.0), ("GPU", res.num_gpus, 1.0),
             ("MB of memory", res.memory_mb, 1024.0 * 1024.0))
    for name, need, unit in needs:
        have = float(totals.get(name.rsplit(" ", 1)[-1], 0.0)) / unit
        if need > have:
            return f"a task needs {need:g} {name} but the local Ray instance has {have:g}"
    return ""


def _call(fn: Callable[..., Any], payload: Any, shared: Any) -> tuple[Any, str, float]:
    import ray

    started = time.perf_counter()
    result = fn(payload, shared)
    return result, ray.get_runtime_context().get_node_id(), time.perf_counter() - started


def _kill_monitor() -> None:
    """End the embedded Ray's autoscaler monitor at once, just before ``ray.shutdown()``.

    ``ray.shutdown()`` stops the raylet and the GCS first, then sends the monitor SIGTERM; its handler
    then tries to report to the GCS that is already gone, and after a second Ray kills it with SIGKILL
    (every time: a third to two thirds of the whole shutdown). A local instance has no autoscaler
    state to save, so that same SIGKILL is sent first, and the shutdown does not wait. Reaches into
    Ray's private node object; if that is not there (another Ray version), Ray's own path is taken.
    """
    try:
        from ray._private import ray_constants, worker

        processes = worker._global_node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, [])
    except (ImportError, AttributeError):
        return
    for info in processes:
        with suppress(OSError):
            info.process.kill()


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once when ``HOST:PORT`` (or ``ray://HOST:PORT``) accepts no connection.

    ``ray.init`` retries an unreachable address for minutes before giving up; a wrong ``--address``
    should be a one-line error in seconds. ``auto`` (read from Ray's address file) is left to Ray.
    """
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or "/" in target:
        return
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise EngineError(f"cannot join Ray at {address}: {exc.strerror or exc}") from None


class Engine:
    """A connection to Ray for one job run (a context manager).

    Args:
        address: ``None`` for a new embedded local Ray (the caller reads ``RAY_ADDRESS`` and passes
            it here when set); ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT`` to join a cluster.
        num_cpus: CPUs of the embedded instance (default: all of this machine's).
        num_gpus: logical GPUs of the embedded instance (default: what Ray detects).
    """

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None,
                 num_gpus: float | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self._started = False

    def __enter__(self) -> Engine:
        import ray

        if ray.is_initialized():
            return self  # a caller (a notebook, a test session) owns this Ray instance
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                                  "log_to_driver": True}
        if self.address:
            _check_reachable(self.address)
        try:
            if self.address:
                ray.init(address=self.address, **kwargs)
            else:
                # Token auth stays on (Ray's default); its notice on every embedded start is noise.
                logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
                    logging.ERROR)
                ray.init(address="local", num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                         object_store_memory=256 * 1024 * 1024, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = self.address or "a local Ray instance"
            raise EngineError(f"cannot start or join Ray at {where}: {str(exc).splitlines()[0]}") from exc
        self._started = True
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        if self._started:
            if not self.address:
                _kill_monitor()
            ray.shutdown()
            self._started = False

    @contextmanager
    def started(self, beside: Callable[[], T]) -> Iterator[T]:
        """Start (or join) Ray while ``beside()`` runs in another thread; yield what it returned.

        An embedded Ray takes seconds to start, most of them waiting for its processes; the driver's
        reading and planning (``beside``: pyarrow and file I/O, mostly without the GIL) fits in that
        wait instead of coming before it. ``ray.init`` itself stays in this (the main) thread: Ray
        sets signal handlers there, and the processes it starts are tied to the thread that started
        them. If Ray is up before ``beside`` is done (a big plan), workers start importing LightGBM
        meanwhile (:meth:`warm_up`).

        If ``beside`` raises, Ray is stopped again and its error raised: the run has not begun. If
        Ray cannot start, ``beside`` is still waited for (a data scan must not outlive the call),
        and its own error, if any, wins: bad input is the more useful message. Ray is stopped when
        the block ends.
        """
        # Imported before the plan's thread starts: imports racing in two threads can deadlock.
        import ray  # noqa: F401

        with ThreadPoolExecutor(1, thread_name_prefix="manymodels-plan") as pool:
            future = pool.submit(beside)
            try:
                self.__enter__()
            except BaseException:
                failed = future.exception()  # waits for it
                if failed is not None:
                    raise failed from None
                raise
            try:
                if not future.done():
                    self.warm_up(int(self.resources().get("CPU", 1)))
                result = future.result()
            except BaseException:
                self.__exit__()
                raise
        try:
            yield result
        finally:
            self.__exit__()

    @property
    def embedded(self) -> bool:
        """Whether this run started its own local Ray instance (not a cluster)."""
        return self._started and not self.address

    def resources(self) -> dict[str, float]:
        """The cluster's total resources (``CPU``, ``GPU``, ``memory``, ...)."""
        import ray

        return {k: float(v) for k, v in ray.cluster_resources().items()}

    def nodes(self) -> int:
        """How many live nodes the cluster has."""
        import ray

        return sum(1 for n in ray.nodes() if n.get("Alive"))

    def warm_up(self, workers: int) -> None:
        """Start ``workers`` worker processes importing LightGBM now, without waiting for them."""
        import ray

        remote = ray.remote(num_cpus=1)(_warm)
        self._warm_refs = [remote.remote() for _ in range(max(0, workers))]

    def map(self, fn: Callable[[Any, Any], Any], payloads: Sequence[Any], *,
            resources: Sequence[TaskResources], shared: Any = None, max_retries: int = 2,
            wait_s: float = 0.5, max_in_flight: int | None = None,
            gate: Callable[[], bool] | None = None) -> Iterator[tuple[int, Any, str, float] | None]:
        """Run ``fn(payload, shared)`` for every payload as a Ray task; yield results as they finish.

        ``shared`` is put in Ray's object store once for all tasks. Tasks are submitted as earlier
        ones finish, keeping ``max_in_flight`` (default: twice the cluster's CPUs) queued or running,
        so Ray always has work queued and the caller can stop submitting: before each submission
        ``gate()`` is asked, and once it says no, the rest are not submitted (a budget guard). A
        task whose worker process dies is retried up to ``max_retries`` times (payload functions
        must be idempotent); an exception raised by ``fn`` itself is not retried and is yielded as
        the result. On an embedded instance, a task needing more CPUs, GPUs or memory than the
        instance has is not submitted (it would wait forever): an :class:`EngineError` is its result.

        Yields:
            ``(payload index, result or exception, node id, task wall seconds)`` per finished
            task; ``(payload index, NOT_SUBMITTED, "", 0.0)`` for each payload the gate held
            back; and ``None`` every ``wait_s`` seconds while nothing finished (so callers can
            refresh progress).
        """
        import ray

        shared_ref = ray.put(shared)
        remote = ray.remote(_call)
        totals = ray.cluster_resources()
        limit = max_in_flight or max(4, 2 * int(totals.get("CPU", 1)))
        # Ray's default policy fills the driver's node first; chunks are alike, so on a cluster
        # spread them over every node instead.
        spread = {"scheduling_strategy": "SPREAD"} if self.nodes() > 1 else {}
        pending: dict[Any, int] = {}
        queue = list(range(len(payloads)))
        queue.reverse()
        stopped = False
        while pending or (queue and not stopped):
            while queue and not stopped and len(pending) < limit:
                if gate is not None and not gate():
                    stopped = True
                    break
                i = queue.pop()
                short = _shortfall(resources[i], totals) if self.embedded else ""
                if short:  # the embedded instance can never run it: fail it instead of waiting forever
                    yield i, EngineError(short), "", 0.0
                    continue
                opts = resources[i].options()
                ref = remote.options(max_retries=max_retries, retry_exceptions=False, **opts,
                                     **spread).remote(
                    fn, payloads[i], shared_ref)
                pending[ref] = i
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
            if not done:
                yield None
                continue
            for ref in done:
                i = pending.pop(ref)
                try:
                    result, node, wall = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    result, node, wall = exc, "", 0.0
                yield i, result, node, wall
        for i in reversed(queue):
            yield i, NOT_SUBMITTED, "", 0.0
