"""The `dask` executor: prediction units and training jobs as Dask tasks on a cluster
(`runner.executor: {name: dask, options: {address: tcp://host:8786}}`), or, without an address, on a
`LocalCluster` of worker processes sized by the run's core budget and closed when the work is done.

Results come back to the client, which writes the cache (core/executor.py): the workers need
perceptcore, the study's plugin packages and the study's input files at the client's paths, but
no access to the cache. A worker that dies while running a task (killed, out of memory, its
machine gone) is Dask's to handle: the scheduler runs its tasks again elsewhere, up to
`distributed.scheduler.allowed-failures` times (Dask's setting, 3 by default); tasks are
deterministic, so a task run twice gives the same result. Errors inside a task are not retried:
they would recur.

Each task is sent as bytes and unpickled by a small function that travels by value, so that a
worker lacking a module (a plugin not installed there, even perceptcore itself) reports it as
data the client turns into one error naming the worker, instead of failing inside Dask.
docs/scale-out.md tells how to run on a cluster.
"""

from __future__ import annotations

import contextlib
import os
import typing
import uuid

import attrs

from perceptcore.errors import PerceptcoreError
from perceptcore.plugins import hookimpl


class RemoteTraceback(Exception):
    """A task's traceback as the worker printed it (shown with --debug)."""


def _make_task():
    """The function every task runs on a worker. Defined inside a function so that cloudpickle sends
    its code rather than a reference to this module: it must run where perceptcore cannot be imported.
    It returns its outcome instead of raising: an error is deterministic, and Dask retries only the
    tasks of workers that died."""

    def perceptcore_task(payload):
        import pickle
        import traceback

        from distributed import get_worker

        worker = get_worker()
        who = str(worker.address) if str(worker.name) == str(worker.address) else f"{worker.name} ({worker.address})"
        try:
            function, item = pickle.loads(payload)
        except ModuleNotFoundError as exc:
            return ("module", who, exc.name or str(exc))
        except Exception as exc:
            return ("error", who, f"could not unpickle the task: {type(exc).__name__}: {exc}", traceback.format_exc())
        try:
            return ("ok", function(item))
        except ModuleNotFoundError as exc:  # a plugin importing its dependencies lazily
            return ("module", who, exc.name or str(exc))
        except FileNotFoundError as exc:
            return ("file", who, str(exc.filename or exc))
        except Exception as exc:
            if type(exc).__name__ == "PerceptcoreError" and hasattr(exc, "message"):
                # Not pickled: its args are the joined text, so it would unpickle without `where`.
                return ("perceptcore", who, exc.message, exc.where)
            return ("error", who, f"{type(exc).__name__}: {exc}", traceback.format_exc())

    return perceptcore_task


class DaskSession:
    local = False

    def __init__(self, client, threads: int, where: str):
        self.client, self.threads, self.where = client, threads, where

    def map(self, function, items):
        import cloudpickle
        from distributed import as_completed

        task = _make_task()
        run = uuid.uuid4().hex[:8]
        name = getattr(function, "__name__", "task")
        futures = {}
        for index, item in enumerate(items):
            payload = cloudpickle.dumps((function, item))
            futures[self.client.submit(task, payload, key=f"perceptcore-{name}-{run}-{index}", pure=False)] = index
        try:
            for future in as_completed(futures, loop=self.client.loop):
                yield futures[future], self._outcome(future)
        finally:
            self.client.cancel(list(futures))

    def _outcome(self, future):
        from distributed import KilledWorker

        try:
            outcome = future.result()
        except KilledWorker as exc:
            worker = getattr(exc.last_worker, "address", exc.last_worker)
            raise PerceptcoreError(
                f"task {exc.task} was running on {exc.allowed_failures + 1} workers that died (the last: {worker}); "
                "Dask does not retry it again (its setting distributed.scheduler.allowed-failures: "
                f"{exc.allowed_failures}); a task that kills every worker it runs on may need more memory",
                self.where) from None
        kind, who = outcome[0], outcome[1] if len(outcome) > 1 else None
        if kind == "ok":
            return outcome[1]
        if kind == "perceptcore":
            _, _, message, where = outcome
            raise PerceptcoreError(f"{message} (on Dask worker {who})", where)
        if kind == "module":
            module = outcome[2]
            raise PerceptcoreError(f"Dask worker {who} cannot import module {module!r}{_provider(module)}: every "
                                   "worker needs perceptcore and the study's plugin packages installed", self.where)
        if kind == "file":
            raise PerceptcoreError(f"Dask worker {who} has no file {outcome[2]}: every worker needs the study's "
                                   "images, masks and checkpoints at the paths the client uses", self.where)
        _, _, message, remote = outcome
        failure = PerceptcoreError(f"a task failed on Dask worker {who}: {message}", self.where)
        raise failure from RemoteTraceback(remote)


def _provider(module: str) -> str:
    """Which installed package provides `module` here, to say what the worker should install."""
    from importlib import metadata

    packages = metadata.packages_distributions().get(module.split(".")[0])
    return f" (provided here by package {', '.join(sorted(set(packages)))})" if packages else ""


def _worker_threads(client) -> int:
    """Torch threads per task on a cluster we did not start: each worker's cores shared among its task
    slots, the fewest over the workers connected now (one before any has joined)."""

    def cores():
        import os

        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:
            return os.cpu_count() or 1

    workers = client.scheduler_info().get("workers", {})
    if not workers:
        return 1
    found = client.run(cores)
    return max(1, min(found[address] // max(1, info.get("nthreads", 1)) for address, info in workers.items()
                      if address in found))


class DaskExecutor:
    name = "dask"

    @attrs.frozen
    class Options:
        # A scheduler's address (tcp://host:8786); none: a LocalCluster of the run's budget on this machine.
        address: typing.Optional[str] = None
        # Torch threads per task; none: the run's budget (LocalCluster), else each worker's cores per task slot.
        threads: typing.Optional[int] = attrs.field(default=None, validator=attrs.validators.optional(
            attrs.validators.ge(1)))

    @contextlib.contextmanager
    def start(self, options, workers: int, threads: int, where: str):
        from distributed import Client, LocalCluster

        with contextlib.ExitStack() as stack:
            if options.address is None:
                # One thread per worker: a task is a whole unit or model, its parallelism is torch's threads.
                cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                           dashboard_address=None))
                client = stack.enter_context(Client(cluster, set_as_default=False))
                per_task = options.threads or threads
            else:
                try:
                    client = stack.enter_context(Client(options.address, timeout=os.environ.get(
                        "PERCEPTCORE_DASK_TIMEOUT", "20s"), set_as_default=False))
                except (OSError, TimeoutError, ValueError) as exc:
                    raise PerceptcoreError(f"cannot reach a Dask scheduler at {options.address!r}: "
                                           f"{type(exc).__name__}: {exc}", f"{where}.options.address") from None
                per_task = options.threads or _worker_threads(client)
            yield DaskSession(client, per_task, where)


@hookimpl
def perceptcore_register_executors(register):
    register(DaskExecutor())
