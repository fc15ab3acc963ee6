"""Ordered parallel map over worker processes that start quickly.

On Linux the workers are forked from the stage process, so they start in
milliseconds with every module already imported. joblib's default workers
start fresh interpreters that import NumPy, SciPy and the package again,
about a second per stage on a 2-core machine. Where fork is not available
the map falls back to joblib.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import pickle
import signal
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator

from .errors import PipelineError

# Items submitted ahead per worker process: enough to keep every worker busy
# while the caller handles a result, few enough to bound the memory. With
# chunks of 128 recordings of 1,536 float32 features, 4 per process hold
# about 3 MB of results per process.
IN_FLIGHT_PER_PROCESS = 4


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
    file. At most ``IN_FLIGHT_PER_PROCESS`` items per process are submitted
    ahead of the caller, so results that the caller has not taken yet do not
    pile up in memory. An exception in a worker is raised here, in the caller.

    Raises
    ------
    PipelineError
        If a worker process dies, for example killed for lack of memory.
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
    # An argument that cannot be pickled would leave the workers idle and the
    # executor's shutdown waiting for them for ever. Pickling each item here
    # raises the error first.
    for item in items:
        pickle.dumps((function, item), protocol=pickle.HIGHEST_PROTOCOL)
    executor = ProcessPoolExecutor(
        processes, mp_context=multiprocessing.get_context("fork"), initializer=_start_worker
    )
    waiting = iter(items)
    pending = deque(
        executor.submit(function, *item)
        for item in itertools.islice(waiting, IN_FLIGHT_PER_PROCESS * processes)
    )
    try:
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(waiting, 1):
                pending.append(executor.submit(function, *item))
            yield result
    except BrokenProcessPool:
        raise PipelineError(
            f"a worker process of {function.__name__} ended unexpectedly, for example "
            "killed for lack of memory; run again with compute.n_jobs: 1 to see which "
            "file causes it"
        ) from None
    finally:
        # On an error or an interrupt, drop the queued work instead of finishing it.
        executor.shutdown(wait=True, cancel_futures=True)


def _start_worker() -> None:
    """Prepare a worker: one BLAS and OpenMP thread, and Ctrl-C left to the parent.

    With as many threads as cores in every worker, the workers slow each other
    down. The parent handles Ctrl-C and stops the workers, so they ignore it
    instead of each printing a traceback.
    """
    from threadpoolctl import threadpool_limits

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The stage turns SIGTERM into an interrupt; a worker just ends.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threadpool_limits(1)
