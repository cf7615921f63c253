"""The threads blocking fetches run on (S3 and file reads, host name lookups): daemon threads, so a fetch
stuck in the kernel never keeps the process from exiting.

``concurrent.futures.ThreadPoolExecutor`` makes non-daemon threads and joins every one of them when the
interpreter exits (whatever ``shutdown(wait=False)`` said): a single read stuck on a silent S3 endpoint or
a hung file system then held a worker that had drained and returned its exit code until the read timed out,
or for good. A stuck fetch is abandoned instead: its answer was already given up at the fetch deadline, and
nothing it holds needs cleaning up at exit (a socket or a file descriptor).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_Work = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DaemonThreads(Executor):
    """At most ``max_workers`` daemon threads, started as work needs them and kept while the pool lives.

    A thread stuck in a call keeps its place: the pool then has one thread fewer (work waits for the others,
    and its fetch deadline still answers for it), so stuck calls never grow the number of threads.
    """

    def __init__(self, max_workers: int, name: str) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._max_workers = max_workers
        self._name = name
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` on a thread of the pool; its result arrives on the returned future."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._work.put((future, fn, args, kwargs))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._max_workers:
                self._start_thread()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; ``cancel_futures`` cancels what has not started. Threads end once their call
        returns; ``wait`` waits for that (never at interpreter exit: they are daemons)."""
        with self._lock:
            self._closed = True
            if cancel_futures:
                self._cancel_queued()
            for _thread in self._threads:
                self._work.put(None)
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()

    @property
    def threads(self) -> int:
        """Threads started so far (stuck ones included)."""
        with self._lock:
            return len(self._threads)

    def _start_thread(self) -> None:
        thread = threading.Thread(target=self._run, name=f"{self._name}_{len(self._threads)}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _cancel_queued(self) -> None:
        kept: list[None] = []
        while True:
            try:
                work = self._work.get_nowait()
            except queue.Empty:
                break
            if work is None:
                kept.append(work)
            else:
                work[0].cancel()
        for stop in kept:
            self._work.put(stop)

    def _run(self) -> None:
        while True:
            work = self._work.get()
            if work is None:
                return
            future, fn, args, kwargs = work
            del work  # a finished call's arguments (a fetched body) must not wait here for the next one
            if not future.set_running_or_notify_cancel():
                del future, fn, args, kwargs
                self._idle.release()
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the caller, as ThreadPoolExecutor does
                self._idle.release()  # idle before the caller hears: its next call finds this thread
                future.set_exception(exc)
            else:
                self._idle.release()
                future.set_result(result)
                del result
            del future, fn, args, kwargs
