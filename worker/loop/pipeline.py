"""The worker loop: poll, hand records to intake, batch, embed, publish, commit, drain.

Threads: the main loop polls, batches and commits, so the consumer stays in its group however long a batch
takes; the intake stage (:mod:`worker.intake.stage`) decodes images on a thread pool; one inference thread
(:mod:`worker.inference.stage`) embeds closed batches from a small bounded queue and publishes them; the Kafka
client's I/O threads deliver acknowledgements and rebalance callbacks, which only touch thread-safe state and
never block. What "delivered" and "committed" mean is the delivery guarantee's business
(:mod:`worker.output.delivery`): the loop only asks it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from worker.config import Settings
from worker.errors import (
    BrokerLostError,
    FencedError,
    GroupInstanceFencedError,
    RejectedRecord,
    RejectReason,
    StageFailedError,
)
from worker.imaging.host import ImageLimits
from worker.inference.embedder import Embedder
from worker.inference.stage import InferenceStage
from worker.intake.batcher import Batch, Batcher
from worker.intake.inputs.select import build_handlers
from worker.intake.stage import IntakeStage, Ready, Rejected
from worker.kafka_io import MAX_POLL_RECORDS, Consumer, Record, TopicPartition, UnreadableRecord
from worker.kafka_io.errors import InstanceFencedError, KafkaLayerError
from worker.loop.observer import Observer
from worker.messages import Headers, Modality, Source
from worker.models.heads import ScoreHeads
from worker.ops.gpu import GpuCollector
from worker.ops.health import HealthState
from worker.ops.metrics import WorkerMetrics
from worker.output.delivery import Delivery, DrainOutcome
from worker.output.offsets import OffsetTracker
from worker.output.publisher import Publisher
from worker.output.topic_limits import TopicLimits
from worker.work import InputRecord

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.005
_IDLE_COMMIT_S = 0.1  # shortest gap between commits made because the worker caught up
_TOPIC_CHECK_EVERY_S = 30.0
# Share of the shutdown grace period the drain waits for fetches and decodes under way; the rest is for
# embedding, publishing and committing what they brought. A fetch still stuck then (a silent store, a
# long --fetch-timeout-s) is given up rather than let hold the drain past the grace period.
_PREPARE_SHARE = 0.5


class _RebalanceListener:
    """Runs on the Kafka client's I/O thread: it only updates thread-safe state."""

    def __init__(
        self, tracker: OffsetTracker, delivery: Delivery, metrics: WorkerMetrics, health: HealthState
    ) -> None:
        self._tracker = tracker
        self._delivery = delivery
        self._metrics = metrics
        self._health = health

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._give_up("revoked", revoked)

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._tracker.assign(set(assigned))
        self._after_change("assigned", assigned)

    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self._give_up("lost", lost)

    def _give_up(self, what: str, partitions: set[TopicPartition]) -> None:
        self._tracker.revoke(set(partitions))
        self._delivery.partitions_revoked()
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
    """One worker's loop over its consumer and its delivery guarantee."""

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        consumer: Consumer,
        delivery: Delivery,
        tracker: OffsetTracker,
        metrics: WorkerMetrics,
        health: HealthState,
        batch_size: int,
        decode_workers: int,
        limits: TopicLimits | None = None,
        gpu: GpuCollector | None = None,
        heads: ScoreHeads | None = None,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.delivery = delivery
        self.tracker = tracker
        self.metrics = metrics
        self.health = health
        self.batch_size = batch_size
        # One batcher per modality: a batch of images and a batch of texts go through different towers.
        self.batchers: dict[Modality, Batcher[Ready]] = {
            modality: Batcher(batch_size, settings.batch_timeout_s) for modality in Modality
        }
        image_limits = ImageLimits(
            settings.max_image_pixels, settings.min_image_side, settings.max_message_bytes
        )
        preprocessing = replace(
            embedder.preprocessing,
            resize=settings.resize,
            jpeg_draft=settings.jpeg_draft,
            decode=settings.decode,
        )
        self.intake = IntakeStage(
            build_handlers(settings, image_limits, preprocessing, decode_workers, metrics, embedder.text)
        )
        self.publisher = Publisher(settings, delivery, tracker, metrics, embedder.label, limits)
        self.inference = InferenceStage(embedder, self.publisher, metrics, preprocessing, image_limits, heads)
        self.observer = Observer(consumer, tracker, metrics, settings.progress_interval_s, gpu)
        self._listener = _RebalanceListener(tracker, delivery, metrics, health)
        self._closed_batches: deque[Batch[Ready]] = deque()
        self._paused = False
        self._last_commit = time.monotonic()
        self._input_topic_missing: str | None = None
        self._next_topic_check = 0.0
        health.add_liveness_check(lambda: self.inference.failure)
        health.add_liveness_check(self._stall)
        health.add_readiness_check(lambda: self._input_topic_missing)
        health.add_readiness_check(lambda: self.publisher.failing)

    def subscribe(self) -> None:
        """Join the group on the input topic (after the delivery guarantee prepared its producer)."""
        self.delivery.start()
        self.consumer.subscribe([self.settings.input_topic], self._listener)

    # ---------------------------------------------------------------- main loop
    def run(self, stop: threading.Event) -> bool:
        """Process until ``stop`` is set, then drain. Returns True if everything polled was acknowledged."""
        self.subscribe()
        self.inference.start()
        try:  # fencing can surface in the loop or in the drain's last commit: one exit either way
            try:
                while not stop.is_set():
                    self.step()
            except (BrokerLostError, FencedError, StageFailedError, InstanceFencedError):
                self.intake.shutdown()
                raise  # nothing to drain into: no commit, the next owner re-reads the pending records
            except BaseException:
                self.drain(self.settings.shutdown_grace_s)
                raise
            return self.drain(self.settings.shutdown_grace_s)
        except InstanceFencedError:
            self.intake.shutdown()
            raise self._instance_fenced() from None

    def step(self) -> None:
        """One loop iteration: poll, collect decodes, embed due batches, resend, commit."""
        failure = self.inference.failure
        if failure is not None:
            raise StageFailedError(f"{failure}; exiting without committing what it held")
        if self.delivery.must_rewind:
            self._rewind()
        self._apply_backpressure()
        records = self._poll()
        now = time.monotonic()
        self._check_broker()
        self._check_input_topic(now)
        self.intake.submit([record for batch in records.values() for record in self._accept(batch, now)])
        if not records:
            # Nothing new to read: sleep on the oldest decode (without the GIL) rather than spin on poll().
            self.intake.wait_for_oldest(_IDLE_WAIT_S)
        self._collect(wait=False)
        for batcher in self.batchers.values():
            due = batcher.take_if_due()
            if due is not None:
                self._closed_batches.append(due)
        self._hand_over_batches()
        self.delivery.resend_due()
        if self._commit_due():
            self.commit()
        self.observer.maybe_observe()
        self.health.beat()

    def _stall(self) -> str | None:
        stalled = self.tracker.stalled_for()
        if stalled < self.settings.stall_timeout_s:
            return None
        return (
            f"no result acknowledged for {stalled:.0f}s with {self.tracker.in_flight} record(s) in flight "
            "(raise --stall-timeout-s if batches legitimately take this long)"
        )

    def _commit_due(self) -> bool:
        """Every --commit-interval-ms, and as soon as everything polled is acknowledged: a worker that has
        caught up makes its results final at once (in exactly-once mode, visible to read_committed)."""
        since = time.monotonic() - self._last_commit
        if since >= self.settings.commit_interval_ms / 1000:
            return True
        return since >= _IDLE_COMMIT_S and self.tracker.in_flight == 0 and bool(self.tracker.committable())

    def _poll(self) -> Mapping[TopicPartition, Sequence[Record]]:
        return self.consumer.poll(timeout_ms=self._poll_timeout_ms(), max_records=self._poll_budget())

    def _instance_fenced(self) -> GroupInstanceFencedError:
        return GroupInstanceFencedError(
            f"another worker joined group {self.settings.group_id!r} with --group-instance-id "
            f"{self.settings.group_instance_id!r}; give every worker its own"
        )

    def _check_broker(self) -> None:
        silent = self.delivery.watch.silent_for()
        # Sends still unanswered count even when their partitions are gone: a client that ends its session
        # on its own when the broker vanishes (librdkafka does, after the session timeout) takes the
        # records in flight with it, and the broker is no less gone.
        pending = self.tracker.in_flight or self.delivery.watch.awaiting()
        if pending and silent > self.settings.broker_lost_timeout_s:
            raise BrokerLostError(
                f"the broker at {self.settings.bootstrap_servers} has not answered a send for {silent:.0f}s "
                f"with {pending} record(s) pending; exiting without committing them "
                "(raise --broker-lost-timeout-s to wait longer)"
            )

    def _check_input_topic(self, now: float) -> None:
        """Say once in a while, not ten times a second, that the input topic is missing."""
        if now < self._next_topic_check:
            return
        self._next_topic_check = now + (1.0 if self._input_topic_missing is None else _TOPIC_CHECK_EVERY_S)
        topic = self.settings.input_topic
        try:
            exists = self.consumer.topic_exists(topic)
        except KafkaLayerError as exc:  # the metadata request failed: ask again next time
            log.debug("cannot tell whether %s exists: %s", topic, exc)
            return
        if exists:
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
        if self.intake.busy:
            return 0  # step() waits on the oldest decode instead
        if self._closed_batches:
            return int(_IDLE_WAIT_S * 1000)
        waits = [batcher.seconds_until_due() for batcher in self.batchers.values()]
        limit = min([0.1, *(wait for wait in waits if wait is not None)])
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

    # ---------------------------------------------------------------- intake
    def _accept(self, records: Sequence[Any], now: float) -> list[InputRecord]:
        """Track polled records; returns those to hand to intake (a record the Kafka client could not
        decode is rejected here)."""
        accepted = []
        tracked = 0
        epoch = self.delivery.epoch
        tp: TopicPartition | None = None
        for message in records:
            if tp is None or tp.partition != message.partition or tp.topic != message.topic:
                tp = TopicPartition(message.topic, message.partition)  # one per partition, not per record
            record = InputRecord(
                source=Source(message.topic, message.partition, message.offset),
                key=message.key,
                value=message.value,
                headers=_sendable_headers(message.headers),
                timestamp_ms=int(message.timestamp or 0),
                polled_at=now,
                epoch=epoch,
            )
            if not self._track(tp, message.offset, len(message.value or b"")):
                continue
            tracked += 1
            if type(message) is UnreadableRecord:
                self._reject_unreadable(record, message.problem)
            else:
                accepted.append(record)
        if tracked:
            self.metrics.consumed.inc(tracked)  # once per poll: a counter update costs GIL time per call
        return accepted

    def _reject_unreadable(self, record: InputRecord, problem: str) -> None:
        """Dead-letter a record the Kafka client could not decode, with its key and value."""
        self.metrics.unreadable_records.inc()
        source = record.source
        log.error(
            "record %s[%d]@%d cannot be read by the Kafka client (%s); dead-lettering key and value",
            source.topic, source.partition, source.offset, problem,
        )  # fmt: skip
        self.intake.reject(record, RejectedRecord(RejectReason.UNREADABLE_RECORD, problem))

    def _track(self, tp: TopicPartition, offset: int, size: int) -> bool:
        """Start tracking a polled record; False if it is not this worker's to process."""
        if not self.delivery.admit(tp, offset):
            return False  # already read in this epoch
        if not self.tracker.track(tp, offset, size):
            if tp not in self.consumer.assignment():
                return False  # partition revoked while this record was buffered; its new owner reads it again
            # Owned but never announced to the listener (the client can skip the callback): adopt it.
            log.warning("adopting %s[%d]: assigned without a rebalance callback", tp.topic, tp.partition)
            self.tracker.assign({tp})
            self.tracker.track(tp, offset, size)
        return True

    def _collect(self, wait: bool) -> None:
        """Move intake's results on: images and texts into batches of their own, rejections to the DLQ (the
        one place)."""
        for result in self.intake.collect(wait):
            if isinstance(result, Rejected):
                self.publisher.reject(result.record, result.rejection)
                continue
            batch = self.batchers[result.modality].add(result)
            if batch is not None:
                self._closed_batches.append(batch)

    # ---------------------------------------------------------------- inference
    def _hand_over_batches(self, wait_s: float = 0.0) -> None:
        """Move closed batches to the inference thread's queue without blocking the poll loop."""
        while self._closed_batches and self.inference.offer(self._closed_batches[0], wait_s):
            self._closed_batches.popleft()

    # ---------------------------------------------------------------- commits and shutdown
    def commit(self) -> None:
        """Commit the acknowledged work (or abort and re-read it, when the delivery guarantee says so)."""
        self._last_commit = time.monotonic()
        if not self.delivery.commit():
            self._rewind()

    def _rewind(self) -> None:
        """Abort the work since the last commit and read every partition again from its committed offset.

        Only the exactly-once guarantee asks for it: the aborted results are invisible to read_committed
        consumers; work in flight is dropped (results of the old epoch that still arrive are ignored).
        """
        reason = self.delivery.abort()
        self.intake.clear()
        for batcher in self.batchers.values():
            batcher.drain()
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
        """Embed and publish everything polled, flush, commit. True if nothing was left unacknowledged but
        the records given back: those still being fetched at half the grace period (a fetch stuck on a
        silent store), left uncommitted for the next owner to read again."""
        started = time.monotonic()
        deadline = started + grace_s
        log.info("draining: %d record(s) in flight", self.tracker.in_flight)
        given_back = self._collect_until(started + grace_s * _PREPARE_SHARE)
        for batcher in self.batchers.values():
            remaining = batcher.drain()
            if remaining is not None:
                self._closed_batches.append(remaining)
        while self._closed_batches and time.monotonic() < deadline:
            self._hand_over_batches(wait_s=0.2)
        self.inference.stop(deadline)
        while time.monotonic() < deadline:
            self.delivery.resend_due()
            self.delivery.flush(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            acknowledged = self.tracker.unacknowledged(given_back) == 0
            if (acknowledged and not self.delivery.retrying) or self.delivery.must_rewind:
                break
            time.sleep(0.05)
        outcome = self.delivery.final_commit()
        self.intake.shutdown()
        if outcome is not DrainOutcome.COMMITTED:
            return outcome is DrainOutcome.HANDED_OVER
        left = self.tracker.unacknowledged(given_back)
        if left:
            log.error("shutdown grace period ended with %d record(s) unacknowledged; not committed", left)
        return left == 0

    def _collect_until(self, deadline: float) -> dict[TopicPartition, int]:
        """Collect intake's results until every one is in, or ``deadline``. What is still being prepared
        then is given up: returns the first offset given up per partition (never committed by this worker,
        so the next owner reads it, and what follows it, again)."""
        while True:
            self._collect(wait=False)
            remaining = deadline - time.monotonic()
            if not self.intake.busy or remaining <= 0:
                break
            self.intake.wait_for_oldest(remaining)
        given_back: dict[TopicPartition, int] = {}
        abandoned = self.intake.abandon()
        for record in abandoned:
            given_back.setdefault(record.partition, record.source.offset)  # in order: the first comes first
        if abandoned:
            first = abandoned[0].source
            log.warning(
                "shutdown: gave up on %d record(s) still being fetched or decoded, from %s[%d]@%d on; "
                "not committed, they are read again after the restart",
                len(abandoned), first.topic, first.partition, first.offset,
            )  # fmt: skip
        return given_back


def _sendable_headers(headers: Any) -> Headers:
    """The record's headers as the producer takes them: a null header value becomes empty bytes."""
    if not headers:
        return []
    return [(name, b"" if data is None else data) for name, data in headers]
