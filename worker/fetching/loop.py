"""The one thread every fetch runs on: an asyncio event loop.

Fetching many images at once is mostly waiting; one loop multiplexes every connection, where a thread per
fetch would wake a thread (and take the GIL the decoders and the model need) several times per image
(docs/decisions/0006-one-fetch-loop.md has the figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class FetchLoop:
    """An asyncio loop on its own daemon thread; thread-safe to schedule work on."""

    def __init__(self, name: str = "fetch-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        """Run ``coroutine`` on the loop; its result arrives on the returned future."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def call_soon(self, callback: Callable[..., object], *args: object) -> None:
        """Call ``callback(*args)`` on the loop's thread, from any thread."""
        self.loop.call_soon_threadsafe(callback, *args)

    def in_loop(self) -> bool:
        """Whether the caller is on the loop's thread."""
        return threading.current_thread() is self._thread

    def close(self, cleanup: Coroutine[Any, Any, object] | None = None, timeout_s: float = 5.0) -> None:
        """Cancel what runs on the loop, then run ``cleanup`` (closing connections, say) and stop the
        thread. From another thread it waits for that, at most ``timeout_s``."""
        if not self._thread.is_alive():
            if cleanup is not None:
                cleanup.close()
            return
        finishing = self.run(_finish(cleanup))
        if self.in_loop():  # the loop finishes once this callback returns
            finishing.add_done_callback(lambda _done: self.loop.stop())
            return
        with contextlib.suppress(Exception):  # a failing close must not keep the loop: it goes anyway
            finishing.result(timeout_s)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()


async def _finish(cleanup: Coroutine[Any, Any, object] | None) -> None:
    """Cancel every other task (fetches under way must not reconnect while their pool closes), then run
    ``cleanup``."""
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if cleanup is not None:
        await cleanup
