"""What one fetch by reference costs the worker's CPU, without Kafka or a model: ``fetches`` images fetched
through the worker's own :class:`~worker.fetching.fetcher.Fetcher` (parsed, guarded, timed, counted), at
most ``concurrency`` at once, from the bench's child-process origin with no added latency.

The end-to-end rows are bound by the interpreter on small machines, so a fetch's CPU is what the
by-reference row pays that the by-bytes row does not; this section measures it alone, with the origin's
share (a real origin is another machine) apart.
"""

from __future__ import annotations

import asyncio
import os
import resource
import tempfile
import time
from pathlib import Path

from worker.devtools.bench.report import Report
from worker.devtools.origin import OriginProcess
from worker.fetching.fetcher import Fetcher, FetchPolicy
from worker.ops.metrics import WorkerMetrics

_WARM_UP = 300  # fetches on other names first: connections opened, code paths warm


def bench_fetch_cost(report: Report, corpus: list[bytes], fetches: int, concurrency: int) -> None:
    """One row: fetches/s, and CPU per fetch in this process and in the origin's."""
    with tempfile.TemporaryDirectory(prefix="clip-bench-origin-") as folder:
        root = Path(folder)
        for index in range(fetches + _WARM_UP):  # one name per fetch, as in the by-reference row
            (root / f"{index}.jpg").write_bytes(corpus[index % len(corpus)])
        with OriginProcess(root, 0.0) as origin:
            urls = [origin.url(f"/o/{index}.jpg") for index in range(fetches + _WARM_UP)]
            policy = FetchPolicy(schemes=frozenset({"http"}), allow_hosts=("127.0.0.1",))
            fetcher = Fetcher(policy, WorkerMetrics())
            try:
                fetcher.loop.run(_fetch_all(fetcher, urls[fetches:], concurrency)).result()
                origin_before, started = _cpu_s(origin.pid), time.perf_counter()
                own_before = _own_cpu_s()
                fetched = fetcher.loop.run(_fetch_all(fetcher, urls[:fetches], concurrency)).result()
                elapsed = time.perf_counter() - started
                own, origin_cpu = _own_cpu_s() - own_before, _cpu_s(origin.pid) - origin_before
            finally:
                fetcher.close()
    report.add(
        "fetch-cost",
        f"{fetches} fetches, {concurrency} at once, no added latency",
        fetches / elapsed,
        worker_cpu_ms_per_fetch=round(own / fetches * 1000, 3),
        origin_cpu_ms_per_fetch=round(origin_cpu / fetches * 1000, 3),
        mean_kib=round(fetched / fetches / 1024, 1),
    )


async def _fetch_all(fetcher: Fetcher, urls: list[str], concurrency: int) -> int:
    """Fetch every URL, ``concurrency`` at a time; the bytes fetched."""
    slots = asyncio.Semaphore(concurrency)

    async def one(url: str) -> int:
        async with slots:
            return len(await fetcher.fetch(url))

    return sum(await asyncio.gather(*(one(url) for url in urls)))


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_s(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` so far (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
