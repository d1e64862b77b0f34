"""Executors: where prediction units and training jobs run — this machine's processes (`local`, the
default) or a cluster (`dask`). The spec's `runner.executor: {name, options}` picks one; executors
are plugins (hook `perceptcore_register_executors`), so another engine can be supplied.

An executor has `name`, `Options` (an attrs class of typed options, all with defaults) and
`start(options, workers, threads, where)`, a context manager giving a `Session` for one batch of
work. `workers` and `threads` are the run's budget on this machine (core/resources.py): processes
and torch threads per process; an executor that runs elsewhere may size itself differently and
says so through `Session.threads`. Leaving the context ends the session (a cluster it started
closes; one it connected to stays).

Cache policy. A `local` session's tasks share this machine's files: a prediction unit writes its
cache file itself, as a single process would. A session with `local = False` may run tasks on
machines that cannot write the client's cache: its tasks return their results (a unit's cache
file's bytes, a trained model's checkpoint contents and losses) and the client writes the
content-addressed cache, atomically, as it would itself. Inputs — images, ROI masks, checkpoints,
a fine-tuning start — are read by the tasks, so every worker must see them at the paths the client
does.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Iterable, Iterator, Protocol, runtime_checkable

from .spec import Spec, structure


@runtime_checkable
class Session(Protocol):
    """One started executor.

    `local`: whether tasks run on this machine, seeing its files (the core then lets a prediction
    unit write its cache file itself and keeps training in this process, resumable after each
    epoch); otherwise tasks return their results and the client writes the cache.
    `threads`: the torch threads each task should use (the core puts it into the work items).
    `map(function, items)`: run `function(item)` for every item, yielding `(index, result)` as each
    finishes, in any order. With `local = False`, `function` (a module-level function) and the items
    must pickle; a `PerceptcoreError` a task raises reaches the client as a `PerceptcoreError` with
    its message and `where`, naming the worker; a worker lacking a module or a file is one
    `PerceptcoreError` naming the worker and what it lacks. Leaving the session's context while
    tasks are pending cancels them."""

    local: bool
    threads: int

    def map(self, function: Callable, items: list) -> Iterator[tuple[int, object]]:
        ...


@runtime_checkable
class Executor(Protocol):
    name: str
    Options: type

    def start(self, options, workers: int, threads: int, where: str) -> ContextManager[Session]:
        """A session with at most `workers` tasks at a time of `threads` torch threads each on this
        machine; errors in `options` (a scheduler that cannot be reached) are located at `where`."""


WHERE = "runner.executor"


def executor_of(spec: Spec, registry) -> tuple[Executor, object]:
    """The spec's executor plugin and its structured options; errors located at runner.executor.*."""
    section = spec.runner.executor
    executor = registry.get("executor", section.name, f"{WHERE}.name")
    return executor, structure(executor.Options, section.options, f"{WHERE}.options")


def missing_files(paths: Iterable) -> None:
    """Raise FileNotFoundError for the first of `paths` (None: skipped) that is not a file here: a
    task checks its inputs first, so a worker without the study's files says which one it lacks
    (rather than a plugin's message about a checkpoint it could not read)."""
    import errno
    import os
    from pathlib import Path

    for path in paths:
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
