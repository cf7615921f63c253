"""The worker loop: poll, decode, batch, embed, publish, track acknowledgements, commit, drain.

Threads: the main loop polls, batches and commits, so the consumer stays in its group however long a
batch takes; a thread pool decodes images (PIL releases the GIL); one inference thread
(:mod:`worker.inference`) embeds closed batches from a small bounded queue and publishes them, overlapping
each batch's publishing with the next one's forward pass on a GPU; kafka-python's I/O threads deliver
acknowledgements and rebalance callbacks, which only touch thread-safe state and never block.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import CorruptRecordError, FencedInstanceIdError, KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from worker.batcher import Batch, Batcher
from worker.config import Settings
from worker.embedder import Embedder, default_decode_workers
from worker.errors import (
    BrokerLostError,
    FencedError,
    GroupInstanceFencedError,
    RejectedRecord,
    RejectReason,
    StageFailedError,
)
from worker.gpu import GpuCollector
from worker.images import EncodedJpeg, ImageLimits, prepare
from worker.inference import InferenceStage, ReadyImage
from worker.kafka_io import MAX_POLL_RECORDS, salvage_batch
from worker.messages import Headers, ImageRequest, Source, decode_request
from worker.metrics import HealthState, WorkerMetrics
from worker.observer import Observer
from worker.offsets import OffsetTracker
from worker.publisher import Publisher
from worker.transactions import AbortReason, Transactions
from worker.work import InputRecord

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.005
_DECODE_CHUNK = 8
_COMMIT_TIMEOUT_MS = 5000  # a commit against a lost broker must not stall the poll loop
_IDLE_COMMIT_S = 0.1  # shortest gap between commits made because the worker caught up
_TOPIC_CHECK_EVERY_S = 30.0


@dataclass
class _Decoding:
    record: InputRecord
    request: ImageRequest
    future: Future[list[np.ndarray | EncodedJpeg | Exception]]
    index: int  # position of this image in its chunk's result list


class _RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Runs on kafka-python's I/O thread: it only updates thread-safe state."""

    def __init__(
        self,
        tracker: OffsetTracker,
        metrics: WorkerMetrics,
        health: HealthState,
        transactions: Transactions | None,
    ) -> None:
        self._tracker = tracker
        self._metrics = metrics
        self._health = health
        self._transactions = transactions

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._give_up("revoked", revoked)

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._tracker.assign(set(assigned))
        self._after_change("assigned", assigned)

    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self._give_up("lost", lost)

    def _give_up(self, what: str, partitions: set[TopicPartition]) -> None:
        self._tracker.revoke(set(partitions))
        if self._transactions is not None:
            # The open transaction may hold results of these partitions: the main loop aborts it.
            self._transactions.doom(AbortReason.REBALANCE)
        self._after_change(what, partitions)

    def _after_change(self, what: str, partitions: set[TopicPartition]) -> None:
        owned = self._tracker.owned()
        self._metrics.rebalances.inc()
        self._metrics.assigned_partitions.set(len(owned))
        self._health.in_group = True
        log.info("partitions %s: %s; now own %d", what, _describe(partitions), len(owned))


def _describe(partitions: set[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions)) or "none"


class Pipeline:
    """One worker's loop over its consumer and producer."""

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        metrics: WorkerMetrics,
        health: HealthState,
        gpu: GpuCollector | None = None,
        batch_size: int | None = None,
        topic_limits: dict[str, int] | None = None,
        reopen_producer: Callable[[], KafkaProducer] | None = None,
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self.consumer = consumer
        self.metrics = metrics
        self.health = health
        self.tracker = OffsetTracker()
        self.batch_size = batch_size or settings.batch_size or embedder.auto_batch_size()
        self.batcher: Batcher[ReadyImage] = Batcher(self.batch_size, settings.batch_timeout_s)
        self._decoding: deque[_Decoding] = deque()
        self._limits = ImageLimits(settings.max_image_pixels, settings.min_image_side)
        self._preprocessing = replace(
            embedder.preprocessing,
            resize=settings.resize,
            jpeg_draft=settings.jpeg_draft,
            decode=settings.decode,
        )
        self._decode_workers = settings.decode_workers or default_decode_workers()
        self._pool = ThreadPoolExecutor(max_workers=self._decode_workers, thread_name_prefix="decode")
        self._paused = False
        self._last_commit = time.monotonic()
        self._input_topic_missing: str | None = None
        self._salvaged: list[tuple[InputRecord, ImageRequest]] = []  # read past a batch the client refused
        self._next_topic_check = 0.0
        self.publisher = Publisher(
            settings, producer, consumer, self.tracker, metrics, embedder.label, topic_limits, reopen_producer
        )
        self._transactions = self.publisher.transactions
        self._listener = _RebalanceListener(self.tracker, metrics, health, self._transactions)
        self._closed_batches: deque[Batch[ReadyImage]] = deque()
        self.inference = InferenceStage(embedder, self.publisher, metrics, self._preprocessing, self._limits)
        self.observer = Observer(consumer, self.tracker, metrics, settings.progress_interval_s, gpu)
        health.add_liveness_check(lambda: self.inference.failure)
        health.add_liveness_check(self._stall)
        health.add_readiness_check(lambda: self._input_topic_missing)
        health.add_readiness_check(lambda: self.publisher.failing)

    def _stall(self) -> str | None:
        stalled = self.tracker.stalled_for()
        if stalled < self.settings.stall_timeout_s:
            return None
        return (
            f"no result acknowledged for {stalled:.0f}s with {self.tracker.in_flight} record(s) in flight "
            "(raise --stall-timeout-s if batches legitimately take this long)"
        )

    def subscribe(self) -> None:
        """Join the group on the input topic (exactly-once: after registering the transactional id)."""
        if self._transactions is not None:
            self._transactions.start()
        self.consumer.subscribe([self.settings.input_topic], listener=self._listener)

    # ---------------------------------------------------------------- main loop
    def run(self, stop: threading.Event) -> bool:
        """Process until ``stop`` is set, then drain. Returns True if everything polled was acknowledged."""
        self.subscribe()
        self.inference.start()
        try:
            while not stop.is_set():
                self.step()
        except (BrokerLostError, FencedError, StageFailedError):
            self._pool.shutdown(wait=False, cancel_futures=True)
            raise  # nothing to drain into: no commit, the next owner re-reads the pending records
        except BaseException:
            self.drain(self.settings.shutdown_grace_s)
            raise
        return self.drain(self.settings.shutdown_grace_s)

    def step(self) -> None:
        """One loop iteration: poll, collect decodes, embed due batches, resend, commit."""
        failure = self.inference.failure
        if failure is not None:
            raise StageFailedError(f"{failure}; exiting without committing what it held")
        if self._doomed():
            self._rewind()
        self._apply_backpressure()
        records = self._poll()
        now = time.monotonic()
        self._check_broker()
        self._check_input_topic(now)
        accepted, self._salvaged = self._salvaged, []
        for batch in records.values():
            for message in batch:
                item = self._accept(message, now)
                if item is not None:
                    accepted.append(item)
        self._submit_decodes(accepted)
        if not records and self._decoding:
            # Nothing new to read: sleep on the oldest decode (without the GIL) rather than spin on poll().
            wait([self._decoding[0].future], timeout=_IDLE_WAIT_S)
        self._collect_decoded(wait=False)
        due = self.batcher.take_if_due()
        if due is not None:
            self._closed_batches.append(due)
        self._hand_over_batches()
        self.publisher.resend_due()
        if self._commit_due():
            self.commit()
        self.observer.maybe_observe()
        self.health.beat()

    def _commit_due(self) -> bool:
        """Every --commit-interval-ms, and as soon as everything polled is acknowledged: a worker that has
        caught up makes its results final at once (in exactly-once mode, visible to read_committed)."""
        since = time.monotonic() - self._last_commit
        if since >= self.settings.commit_interval_ms / 1000:
            return True
        return since >= _IDLE_COMMIT_S and self.tracker.in_flight == 0 and bool(self.tracker.committable())

    def _doomed(self) -> bool:
        return self._transactions is not None and self._transactions.doomed is not None

    def _poll(self) -> dict[TopicPartition, list[Any]]:
        """Poll; a record the client cannot parse is dead-lettered as far as it was read, and skipped."""
        try:
            records: dict[TopicPartition, list[Any]] = self.consumer.poll(
                timeout_ms=self._poll_timeout_ms(), max_records=self._poll_budget()
            )
            return records
        except FencedInstanceIdError:
            raise self._instance_fenced() from None
        except CorruptRecordError as exc:
            self._salvaged = self._skip_unreadable(exc)
            return {}

    def _instance_fenced(self) -> GroupInstanceFencedError:
        return GroupInstanceFencedError(
            f"another worker joined group {self.settings.group_id!r} with --group-instance-id "
            f"{self.settings.group_instance_id!r}; give every worker its own"
        )

    def _skip_unreadable(self, exc: CorruptRecordError) -> list[tuple[InputRecord, ImageRequest]]:
        """Dead-letter the record the client could not read and take the rest of its batch from here."""
        salvaged = salvage_batch(exc)
        if salvaged is None:
            raise exc  # the client gave no way to tell which record: a clear crash, never a silent skip
        accepted: list[tuple[InputRecord, ImageRequest]] = []
        now = time.monotonic()
        for found in salvaged.records:
            if found.error is not None:
                self.metrics.unreadable_records.inc()
                log.error(
                    "record %s[%d]@%d cannot be read by the Kafka client (%s); dead-lettering key and value",
                    found.topic, found.partition, found.offset, found.error,
                )  # fmt: skip
            item = self._accept(found, now, found.error)
            if item is not None:
                accepted.append(item)
        if salvaged.records:
            first = salvaged.records[0]
            self.consumer.seek(TopicPartition(first.topic, first.partition), salvaged.next_offset)
        return accepted

    def _check_broker(self) -> None:
        silent = self.publisher.watch.silent_for()
        if self.tracker.in_flight and silent > self.settings.broker_lost_timeout_s:
            raise BrokerLostError(
                f"the broker at {self.settings.bootstrap_servers} has not answered a send for {silent:.0f}s "
                f"with {self.tracker.in_flight} record(s) pending; exiting without committing them "
                "(raise --broker-lost-timeout-s to wait longer)"
            )

    def _check_input_topic(self, now: float) -> None:
        """Say once in a while, not ten times a second, that the input topic is missing."""
        if now < self._next_topic_check:
            return
        self._next_topic_check = now + (1.0 if self._input_topic_missing is None else _TOPIC_CHECK_EVERY_S)
        topic = self.settings.input_topic
        if self.consumer.partitions_for_topic(topic):
            if self._input_topic_missing is not None:
                log.info("input topic %r exists now", topic)
            self._input_topic_missing = None
            return
        self._input_topic_missing = (
            f"input topic {topic!r} does not exist on {self.settings.bootstrap_servers}; "
            "create it or fix --input-topic"
        )
        log.warning("%s (checking again every %.0fs)", self._input_topic_missing, _TOPIC_CHECK_EVERY_S)

    def _poll_timeout_ms(self) -> int:
        if self._decoding:
            return 0  # step() waits on the oldest decode instead
        if self._closed_batches:
            return int(_IDLE_WAIT_S * 1000)
        due_in = self.batcher.seconds_until_due()
        limit = 0.1 if due_in is None else min(due_in, 0.1)
        return max(0, int(limit * 1000))

    def _poll_budget(self) -> int:
        room = self.settings.max_in_flight - self.tracker.in_flight
        return max(1, min(MAX_POLL_RECORDS, room))

    def _apply_backpressure(self) -> None:
        in_flight = self.tracker.in_flight
        if not self._paused and in_flight >= self.settings.max_in_flight:
            assigned = list(self.consumer.assignment())
            self.consumer.pause(*assigned)
            self._paused = True
            self.metrics.paused_partitions.set(len(assigned))
        elif self._paused and in_flight <= self.settings.max_in_flight // 2:
            self.consumer.resume(*self.consumer.paused())
            self._paused = False
            self.metrics.paused_partitions.set(0)

    # ---------------------------------------------------------------- intake and decoding
    def _accept(
        self, message: Any, now: float, unreadable: str | None = None
    ) -> tuple[InputRecord, ImageRequest] | None:
        """Track a polled record and decode its envelope; a bad envelope goes straight to the DLQ (as does
        a record the Kafka client could not read, ``unreadable`` saying why)."""
        tp = TopicPartition(message.topic, message.partition)
        source = Source(message.topic, message.partition, message.offset)
        record = InputRecord(
            source=source,
            key=message.key,
            value=message.value,
            headers=_sendable_headers(message.headers),
            timestamp_ms=int(message.timestamp or 0),
            polled_at=now,
            epoch=self._epoch(),
        )
        if not self._track(tp, message.offset, len(message.value or b""), record):
            return None
        if unreadable is not None:
            self.publisher.dead_letter(record, RejectReason.UNREADABLE_RECORD, unreadable)
            return None
        try:
            return record, decode_request(record.value)
        except RejectedRecord as rejected:
            self.publisher.dead_letter(record, rejected.reason, rejected.message)
            return None

    def _epoch(self) -> int:
        return self._transactions.epoch if self._transactions is not None else 0

    def _track(self, tp: TopicPartition, offset: int, size: int, record: InputRecord) -> bool:
        """Start tracking a polled record; False if it is not this worker's to process."""
        if self._transactions is not None and not self._transactions.expect(tp, offset):
            return False  # exactly-once: already read in this transaction epoch
        if not self.tracker.track(tp, offset, size):
            if tp not in self.consumer.assignment():
                return False  # partition revoked while this record was buffered; its new owner reads it again
            # Owned but never announced to the listener (the client can skip the callback): adopt it.
            log.warning("adopting %s[%d]: assigned without a rebalance callback", tp.topic, tp.partition)
            self.tracker.assign({tp})
            self.tracker.track(tp, offset, size)
        self.metrics.consumed.inc()
        return True

    def _submit_decodes(self, accepted: list[tuple[InputRecord, ImageRequest]]) -> None:
        # A task per chunk of images rather than per image: submitting costs GIL time the decoders need.
        size = max(1, min(_DECODE_CHUNK, -(-len(accepted) // (2 * self._decode_workers))))
        for start in range(0, len(accepted), size):
            chunk = accepted[start : start + size]
            future = self._pool.submit(self._decode_images, [request.image for _record, request in chunk])
            for index, (record, request) in enumerate(chunk):
                self._decoding.append(_Decoding(record, request, future, index))

    def _decode_images(self, images: list[bytes]) -> list[np.ndarray | EncodedJpeg | Exception]:
        results: list[np.ndarray | EncodedJpeg | Exception] = []
        for data in images:
            started = time.perf_counter()
            try:
                results.append(prepare(data, self._limits, self._preprocessing))
            except Exception as exc:  # a rejection, or a decoder bug: either way this image's own result
                results.append(exc)
            self.metrics.stage_seconds.labels("decode").observe(time.perf_counter() - started)
        return results

    def _collect_decoded(self, wait: bool) -> None:
        while self._decoding and (wait or self._decoding[0].future.done()):
            item = self._decoding.popleft()
            try:
                pixels = item.future.result()[item.index]
            except Exception as exc:  # the whole chunk failed (pool shut down): never lose the record
                pixels = exc
            if isinstance(pixels, RejectedRecord):
                self.publisher.dead_letter(item.record, pixels.reason, pixels.message)
                continue
            if isinstance(pixels, Exception):
                message = f"decoder crashed: {type(pixels).__name__}: {pixels}"
                self.publisher.dead_letter(item.record, RejectReason.CORRUPT_IMAGE, message)
                continue
            batch = self.batcher.add(ReadyImage(item.record, item.request, pixels))
            if batch is not None:
                self._closed_batches.append(batch)

    # ---------------------------------------------------------------- inference
    def _hand_over_batches(self, wait_s: float = 0.0) -> None:
        """Move closed batches to the inference thread's queue without blocking the poll loop."""
        while self._closed_batches and self.inference.offer(self._closed_batches[0], wait_s):
            self._closed_batches.popleft()

    # ---------------------------------------------------------------- commits and shutdown
    def commit(self) -> None:
        """Commit every partition's position up to its first unacknowledged record."""
        self._last_commit = time.monotonic()
        if self._transactions is not None:
            if not self._commit_transaction():
                self._rewind()
            return
        offsets = self.tracker.committable()
        if not offsets:
            return
        try:
            self.consumer.commit(
                {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()},
                timeout_ms=_COMMIT_TIMEOUT_MS,
            )
        except FencedInstanceIdError:
            raise self._instance_fenced() from None
        except KafkaError as exc:
            self.metrics.commit_failures.inc()
            log.warning("offset commit failed (%s); will retry with the next commit", exc)
            return
        self.tracker.mark_committed(offsets)
        self.metrics.commits.inc()

    def _commit_transaction(self) -> bool:
        """Exactly-once: commit the open transaction with its offsets. False if it must be aborted."""
        assert self._transactions is not None
        committed = self._transactions.commit(self.tracker.committable)
        if committed is None:
            return False
        if committed:
            self.tracker.mark_committed(committed)
            self.metrics.commits.inc()
        return True

    def _rewind(self) -> None:
        """Exactly-once: abort the open transaction and read every partition again from its committed offset.

        The aborted results are invisible to read_committed consumers; work in flight is dropped (results of
        the old epoch that still arrive are ignored by :class:`Transactions`).
        """
        assert self._transactions is not None
        reason = self._transactions.abort()
        self.publisher.after_abort()
        self._decoding.clear()
        self.batcher.drain()
        self._closed_batches.clear()
        self.inference.discard_queued()
        assigned = self.consumer.assignment()
        targets = {tp: offset for tp, offset in self.tracker.rewind().items() if tp in assigned}
        for tp, offset in targets.items():
            self.consumer.seek(tp, offset)
        self.metrics.transactions_aborted.labels(reason.value).inc()
        log.warning(
            "transaction aborted (%s); reading %d partition(s) again from their committed offsets",
            reason.value,
            len(targets),
        )

    def drain(self, grace_s: float) -> bool:
        """Embed and publish everything polled, flush, commit. True if nothing was left unacknowledged."""
        deadline = time.monotonic() + grace_s
        log.info("draining: %d record(s) in flight", self.tracker.in_flight)
        self._collect_decoded(wait=True)
        remaining = self.batcher.drain()
        if remaining is not None:
            self._closed_batches.append(remaining)
        while self._closed_batches and time.monotonic() < deadline:
            self._hand_over_batches(wait_s=0.2)
        self.inference.stop(deadline)
        while time.monotonic() < deadline:
            self.publisher.resend_due()
            with contextlib.suppress(KafkaError):  # a failed delivery arrives via the errback
                self.publisher.producer.flush(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            if (self.tracker.in_flight == 0 and not self.publisher.retrying) or self._doomed():
                break
            time.sleep(0.05)
        if self._transactions is None:
            self.commit()
        elif not self._commit_transaction():
            reason = self._transactions.abort()  # its records stay uncommitted: the next owner reads them
            self._pool.shutdown(wait=False, cancel_futures=True)
            if reason is AbortReason.REBALANCE:
                # As in at-least-once mode, where records of partitions revoked during the drain are left to
                # their new owner: the group moved work while this worker left, which is no failure.
                log.warning("shutdown: a rebalance aborted the last transaction; new owners read it again")
                return True
            log.error("shutdown: the last transaction was aborted (%s); it will be read again", reason.value)
            return False
        self._pool.shutdown(wait=False, cancel_futures=True)
        left = self.tracker.in_flight
        if left:
            log.error("shutdown grace period ended with %d record(s) unacknowledged; not committed", left)
        return left == 0


def _sendable_headers(headers: Any) -> Headers:
    """The record's headers as the producer takes them: a null header value becomes empty bytes."""
    return [(name, b"" if data is None else data) for name, data in headers or ()]
