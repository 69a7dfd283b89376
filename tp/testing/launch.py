"""Run a function on N local CPU processes joined in a gloo process group.

``WorkerPool`` starts the processes and the process group once and runs many tasks on
them, which is what the tests and ``tp.verify`` need: starting torch in a fresh process
costs seconds, a task on a warm pool costs milliseconds.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch.multiprocessing as mp

from ..errors import TPError

TASK_TIMEOUT_S = 600
FAILURE_GRACE_S = 5  # after one rank fails, how long the others get to report before the pool is stopped


class WorkerError(TPError):
    """A task failed on one of the ranks; the message holds that rank's traceback."""


@dataclass
class _Failure:
    """What a rank reported when its task raised."""

    rank: int
    tp_error: TPError | None  # the exception itself when it is tp's own (bad input), else None
    type_name: str
    message: str
    traceback: str
    received: float = 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # several ranks share a few cores
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=timedelta(seconds=120),
    )
    while (task := tasks.get()) is not None:
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException as e:  # the parent re-raises it
            results.put((rank, False, (e if isinstance(e, TPError) else None, type(e).__name__, str(e),
                                       traceback.format_exc())))
    dist.destroy_process_group()


class WorkerPool:
    """``world_size`` ranks that run picklable module-level functions on demand.

    Example::
        >>> with WorkerPool(2) as pool:
        ...     ranks = pool.run(torch.distributed.get_rank)
        >>> ranks
        [0, 1]
    """

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._procs = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_worker, args=(r, self.world_size, port, self._tasks[r], self._results), daemon=True)
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn, *args, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; the results, in rank order.

        When a rank fails, the others get ``FAILURE_GRACE_S`` to report too; a rank still
        running then is most likely waiting in a collective the failed rank will never join,
        so the pool is stopped and the first failure is raised at once, instead of the
        waiting rank's gloo timeout minutes later."""
        if not self._procs:
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        results, failures, pending = [None] * self.world_size, [], set(range(self.world_size))
        deadline = time.monotonic() + TASK_TIMEOUT_S
        while pending:
            if failures:
                deadline = min(deadline, failures[0].received + FAILURE_GRACE_S)
            reported = self._next_result(fn, deadline, stop_on_death=not failures)
            if reported is None:
                break
            rank, ok, value = reported
            pending.discard(rank)
            if ok:
                results[rank] = value
            else:
                failures.append(_Failure(rank, *value, received=time.monotonic()))
        if failures:
            self._raise(failures, sorted(pending))
        if pending:
            self.close()
            raise WorkerError(f"{fn.__name__} did not finish on every rank within {TASK_TIMEOUT_S}s")
        return results

    def _raise(self, failures: list[_Failure], still_running: list[int]) -> None:
        """Raise the first failure reported: the others are often its consequences. The pool is
        kept only when every rank refused the same way (a TPError for bad input, found before
        any collective), since ranks that failed at different points leave the process group
        out of step."""
        if still_running or not all(f.tp_error is not None for f in failures):
            self.close(wait_s=1)
        first = failures[0]
        if first.tp_error is not None:
            raise first.tp_error  # bad input: the same clear error as in a single process
        stopped = (f"\n(rank{'s' if len(still_running) > 1 else ''} {', '.join(map(str, still_running))} "
                   f"did not report within {FAILURE_GRACE_S}s of it, probably waiting in a collective, "
                   "and the pool was stopped)" if still_running else "")
        error = WorkerError(f"rank {first.rank}: {first.type_name}: {first.message}{stopped}\n{first.traceback}")
        error.remote_type, error.remote_message, error.remote_traceback = first.type_name, first.message, first.traceback
        error.rank = first.rank
        raise error

    def _next_result(self, fn, deadline: float, stop_on_death: bool = True):
        """The next (rank, ok, value) a rank reports, or None at the deadline or, when
        ``stop_on_death`` is false, as soon as a rank has died."""
        while time.monotonic() < deadline:
            try:
                return self._results.get(timeout=max(0.05, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead and not stop_on_death:
                    return None
                if dead:
                    self.close(wait_s=1)
                    raise WorkerError(f"{fn.__name__}: rank {dead[0][0]} exited with code {dead[0][1]}") from None
        return None

    def close(self, wait_s: float = 10) -> None:
        """Ask every rank to leave the process group and exit; kill those still running after
        ``wait_s`` (a rank stuck in a collective never reads the request)."""
        for q in getattr(self, "_tasks", []):
            q.put(None)
        deadline = time.monotonic() + wait_s
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
