"""Ordered parallel map over worker processes that start quickly.

On Linux the workers are forked from the stage process, so they start in
milliseconds with every module already imported. joblib's default workers
start fresh interpreters that import NumPy, SciPy and the package again,
about a second per stage on a 2-core machine. Where fork is not available
the map falls back to joblib.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any, Callable, Iterable, Iterator


def worker_count(n_jobs: int) -> int:
    """Return the number of processes for ``n_jobs`` (-1: every core)."""
    if n_jobs == -1:
        return os.cpu_count() or 1
    return n_jobs


def ordered_map(
    function: Callable[..., Any], arguments: Iterable[tuple], n_jobs: int
) -> Iterator[Any]:
    """Yield ``function(*item)`` for every item of ``arguments``, in order.

    Results are yielded as they are ready, so a caller can stream them to a
    file. An exception in a worker is raised here, in the caller.
    """
    items = list(arguments)
    processes = min(worker_count(n_jobs), len(items))
    if processes <= 1:
        for item in items:
            yield function(*item)
        return
    if "fork" not in multiprocessing.get_all_start_methods():
        from joblib import Parallel, delayed

        yield from Parallel(n_jobs=processes, return_as="generator")(
            delayed(function)(*item) for item in items
        )
        return
    context = multiprocessing.get_context("fork")
    with context.Pool(processes, initializer=_one_thread_each) as pool:
        yield from pool.imap(_call, [(function, item) for item in items])


def _one_thread_each() -> None:
    """Limit a worker's BLAS and OpenMP threads to one.

    Without this every worker runs as many threads as there are cores, and
    the workers slow each other down.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _call(task: tuple[Callable[..., Any], tuple]) -> Any:
    function, item = task
    return function(*item)
