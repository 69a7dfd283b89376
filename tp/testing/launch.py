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
from datetime import timedelta

import torch.multiprocessing as mp

from ..errors import TPError

TASK_TIMEOUT_S = 600


class WorkerError(TPError):
    """A task failed on one of the ranks; the message holds that rank's traceback."""


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
        """Run ``fn(*args, **kwargs)`` on every rank; the results, in rank order."""
        if not self._procs:
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        results, failures = [None] * self.world_size, []
        deadline = time.monotonic() + TASK_TIMEOUT_S
        for _ in range(self.world_size):
            rank, ok, value = self._next_result(fn, deadline)
            if ok:
                results[rank] = value
            else:
                failures.append((rank, value))
        if failures:
            # Ranks that failed at different points may leave the process group out of step; a
            # refusal raised by every rank (bad input, found before any collective) does not.
            if not (len(failures) == self.world_size and all(v[0] is not None for _, v in failures)):
                self.close()
            rank, (tp_error, name, message, tb) = min(failures, key=lambda f: f[0])
            if tp_error is not None:
                raise tp_error  # bad input: the same clear error as in a single process
            error = WorkerError(f"rank {rank}: {name}: {message}\n{tb}")
            error.remote_type, error.remote_message, error.remote_traceback = name, message, tb
            raise error
        return results

    def _next_result(self, fn, deadline: float):
        while time.monotonic() < deadline:
            try:
                return self._results.get(timeout=1)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead:
                    self.close()
                    raise WorkerError(f"{fn.__name__}: rank {dead[0][0]} exited with code {dead[0][1]}") from None
        self.close()
        raise WorkerError(f"{fn.__name__} did not finish on every rank within {TASK_TIMEOUT_S}s")

    def close(self) -> None:
        for q in getattr(self, "_tasks", []):
            q.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self._procs = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
