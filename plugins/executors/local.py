"""The `local` executor (the default): tasks run on this machine, in `workers` spawned processes of
`threads` torch threads each (core/resources.py's budget), or in this process with one worker.

The tasks share this machine's files, so the session is `local`: a prediction unit writes its
cache file itself and training stays in this process (resumable after each epoch).
"""

from __future__ import annotations

import concurrent.futures
import contextlib

import attrs

from perceptcore.plugins import hookimpl
from perceptcore.resources import worker_pool


class LocalSession:
    local = True

    def __init__(self, workers: int, threads: int):
        self.workers, self.threads = workers, threads
        self.pool = None

    def map(self, function, items):
        items = list(items)
        if self.pool is None:
            # In this process: no pool to start, and the same numbers a worker process computes.
            for index, item in enumerate(items):
                yield index, function(item)
            return
        futures = {self.pool.submit(function, item): index for index, item in enumerate(items)}
        try:
            for future in concurrent.futures.as_completed(futures):
                yield futures[future], future.result()
        finally:
            # An error or an interruption: the units not started are not worth waiting for.
            for future in futures:
                future.cancel()


class LocalExecutor:
    name = "local"

    @attrs.frozen
    class Options:
        pass

    @contextlib.contextmanager
    def start(self, options, workers: int, threads: int, where: str):
        session = LocalSession(workers, threads)
        if workers <= 1:
            yield session
            return
        with worker_pool(workers, threads) as pool:
            session.pool = pool
            yield session


@hookimpl
def perceptcore_register_executors(register):
    register(LocalExecutor())
