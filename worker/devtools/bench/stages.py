"""Which stage of the worker a sampled Python stack belongs to.

A stack is read from its innermost frame outwards and takes the stage of the first frame the table below
names; frames it does not name (the standard library's locks, queues and futures, dataclass ``__init__``s)
take the stage of the code that called them. Time inside kafka-python is told apart by the outermost
kafka-python frame, that is by what the worker (or the client's own thread) asked the client to do, so a
record parsed in ``KafkaConsumer.poll`` is poll time and one built in ``KafkaProducer.send`` is send time.
With ``--kafka-client librdkafka`` the client's work runs in C: its adapters' frames
(``worker.kafka_io.librdkafka``) take the stage of the kafka-python call they stand for
(``ConsumerAdapter.poll`` is poll, ``ProducerAdapter.send`` is send, the delivery-report thread is the
producer's I/O thread and its callbacks acknowledgement, the commit thread commit), and librdkafka's own
native threads are a stage of their own.
Stacks of start-up, shutdown and the bench's own threads are kept apart and left out of the host cost.

The mapping, by module and function:

==================================  =====================================================================
stage                               frames
==================================  =====================================================================
poll: kafka-io thread               kafka-python's I/O thread (``kafka.net``): fetch requests, reading
                                    and decoding fetch responses, every byte of the payloads
poll: record parsing                ``KafkaConsumer.poll`` and below (``kafka.consumer``, ``kafka.record``:
                                    record batches, CRC checks); ``Pipeline._poll``, the record parser,
                                    ``ConsumerAdapter.poll``
group coordination                  ``kafka.coordinator`` (heartbeats, joins) wherever it runs
envelope decoding                   ``worker.messages.decode_request`` (msgpack unpacking)
intake hand-off                     ``Pipeline._accept``, ``_track``, ``worker.intake.stage`` (but its
                                    decoding and ``collect``), ``InputRecord``, the decode pool's dispatch
batching                            ``Pipeline._collect``, ``IntakeStage.collect``, ``_hand_over_batches``,
                                    ``worker.intake.batcher``,
                                    the inference thread's queue and loop (``InferenceStage`` but
                                    ``_publish``)
publish: encode                     ``InferenceStage._publish``, ``Publisher`` (but ``delivered``),
                                    ``worker.output.delivery`` (but commits), ``worker.output.topic_limits``,
                                    ``worker.messages.encode_embedding``, ``worker.work.send``
publish: KafkaProducer.send         ``ProducerAdapter.send``, ``KafkaProducer.send`` and below
publish: producer I/O thread        ``kafka.producer.sender``: draining batches, produce requests, responses
acknowledgement + offset tracking   ``Publisher.delivered``, the send callbacks, ``worker.work.BrokerWatch``,
                                    ``worker.output.offsets``, error translation
commit                              ``Pipeline.commit``, the guarantees' ``commit``, ``KafkaConsumer.commit``
librdkafka threads (native)         librdkafka's own threads (``rdk:*``): fetches, produce requests,
                                    decompression; CPU from the kernel, no Python frames, no GIL
metrics                             ``prometheus_client``, ``worker.ops``, ``worker.loop.observer``
main loop (other)                   the rest of ``worker.loop.pipeline`` and ``worker.loop.service`` while
                                    running
decode (stand-in)                   ``ImageDecoder.decode_now``, ``worker.imaging.host``, ``PIL``: a tiny
                                    image
model (stand-in)                    ``worker.inference.embedder``, ``worker.devtools.bench.null_model``
==================================  =====================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from worker.devtools.bench.sampler import Frame

POLL_IO: Final = "poll: kafka-io thread (fetch I/O, response decoding)"
POLL: Final = "poll: record parsing (KafkaConsumer.poll)"
GROUP: Final = "group coordination (heartbeats)"
ENVELOPE: Final = "envelope decoding (msgpack)"
INTAKE: Final = "intake hand-off (tracking, decode pool)"
BATCHING: Final = "batching and hand-over to inference"
ENCODE: Final = "publish: encode + bookkeeping"
SEND: Final = "publish: KafkaProducer.send"
PRODUCER_IO: Final = "publish: producer I/O thread"
ACK: Final = "acknowledgement + offset tracking"
COMMIT: Final = "commit"
NATIVE_CLIENT: Final = "librdkafka threads (native, no GIL)"
METRICS: Final = "metrics"
LOOP: Final = "main loop (other)"
OTHER: Final = "unattributed"
DECODE: Final = "decode (stand-in: tiny JPEG)"
MODEL: Final = "model (stand-in: fixed vectors)"
STARTUP: Final = "start-up"
SHUTDOWN: Final = "shutdown"
HARNESS: Final = "bench harness"

# The per-image host cost: every stage of the running worker except the stand-ins.
HOST_STAGES: Final = (
    POLL_IO, POLL, GROUP, ENVELOPE, INTAKE, BATCHING, ENCODE, SEND, PRODUCER_IO, ACK, COMMIT, METRICS, LOOP,
    OTHER, NATIVE_CLIENT,
)  # fmt: skip
STAND_IN_STAGES: Final = (DECODE, MODEL)
LEFT_OUT_STAGES: Final = (STARTUP, SHUTDOWN, HARNESS)
# Native threads of librdkafka (their kernel names): no Python frames, counted by CPU alone.
NATIVE_CLIENT_THREADS: Final = "rdk:"
# Threads of the bench itself, not of the worker.
HARNESS_THREADS: Final = ("MainThread", "py-spy-output")
# kafka-python's own code: the floor no change to the worker can go below at these client settings.
KAFKA_CONSUMER_STAGES: Final = (POLL_IO, POLL, GROUP)
KAFKA_PRODUCER_STAGES: Final = (SEND, PRODUCER_IO)

# (module prefix, qualified-name prefix or "" for any) -> stage; the first match wins.
_RULES: Final[tuple[tuple[str, str, str], ...]] = (
    ("prometheus_client", "", METRICS),
    ("worker.ops", "", METRICS),
    ("worker.loop.observer", "", METRICS),
    ("worker.output.offsets", "", ACK),
    ("worker.work", "BrokerWatch", ACK),
    ("worker.work", "send.<locals>", ACK),
    ("worker.work", "send", ENCODE),
    ("worker.work", "InputRecord", INTAKE),
    ("worker.work", "Outgoing", ENCODE),
    ("worker.output.publisher", "Publisher.delivered", ACK),
    ("worker.output.publisher", "", ENCODE),
    ("worker.output.delivery.at_least_once", "AtLeastOnce.commit", COMMIT),
    ("worker.output.delivery.exactly_once", "ExactlyOnce.commit", COMMIT),
    ("worker.output.delivery.transactions", "Transactions.commit", COMMIT),
    ("worker.output.delivery", "", ENCODE),
    ("worker.output.topic_limits", "", ENCODE),
    ("worker.kafka_io.adapters", "ConsumerAdapter.poll", POLL),
    ("worker.kafka_io.adapters", "ConsumerAdapter.commit", COMMIT),
    ("worker.kafka_io.adapters", "ProducerAdapter.send", SEND),
    ("worker.kafka_io.adapters", "_TranslatedFuture", ACK),
    ("worker.kafka_io.adapters", "_Listener", GROUP),
    ("worker.kafka_io.errors", "", ACK),
    ("worker.kafka_io.record_parser", "", POLL),
    ("worker.kafka_io.librdkafka.consumer", "ConsumerAdapter.poll", POLL),
    ("worker.kafka_io.librdkafka.consumer", "ConsumerAdapter.commit", COMMIT),
    ("worker.kafka_io.librdkafka.consumer", "ConsumerAdapter.subscribe.<locals>", GROUP),
    ("worker.kafka_io.librdkafka.consumer", "read", POLL),
    ("worker.kafka_io.librdkafka.consumer", "refused", POLL),
    ("worker.kafka_io.librdkafka.consumer", "ConsumedRecord", POLL),
    ("worker.kafka_io.librdkafka.consumer", "_unreadable", POLL),
    ("worker.kafka_io.librdkafka.producer", "ProducerAdapter.send", SEND),
    ("worker.kafka_io.librdkafka.producer", "ProducerAdapter._serve", PRODUCER_IO),
    ("worker.kafka_io.librdkafka.producer", "Delivery", ACK),
    ("worker.kafka_io.librdkafka.errors", "", ACK),
    ("worker.messages", "decode_request", ENVELOPE),
    ("worker.messages", "", ENCODE),
    ("msgpack", "", ENCODE),  # only packb has a Python frame; unpacking is decode_request's own time
    ("worker.kafka_io", "record_bytes", ENCODE),
    ("worker.inference.stage", "InferenceStage._publish", ENCODE),
    ("worker.inference.stage", "", BATCHING),
    ("worker.inference.embedder", "", MODEL),
    ("worker.models", "", MODEL),
    ("worker.devtools.bench.null_model", "", MODEL),
    ("worker.imaging.host", "", DECODE),
    ("PIL", "", DECODE),
    ("worker.intake.batcher", "", BATCHING),
    ("worker.intake.inputs.image_bytes", "ImageDecoder.decode_now", DECODE),
    ("worker.intake.stage", "IntakeStage.collect", BATCHING),
    ("worker.intake.stage", "", INTAKE),
    ("worker.loop.pipeline", "Pipeline._poll", POLL),
    ("worker.loop.pipeline", "Pipeline._apply_backpressure", POLL),
    ("worker.loop.pipeline", "Pipeline._accept", INTAKE),
    ("worker.loop.pipeline", "Pipeline._track", INTAKE),
    ("worker.loop.pipeline", "_sendable_headers", INTAKE),
    ("worker.loop.pipeline", "Pipeline._collect", BATCHING),
    ("worker.loop.pipeline", "Pipeline._hand_over_batches", BATCHING),
    ("worker.loop.pipeline", "Pipeline.commit", COMMIT),
    ("worker.loop.pipeline", "Pipeline._commit", COMMIT),
    ("worker.loop.pipeline", "_RebalanceListener", GROUP),
    ("worker.loop.pipeline", "", LOOP),
    ("worker.loop.service", "", LOOP),
    ("concurrent.futures.thread", "_worker", INTAKE),
    ("concurrent.futures.thread", "_WorkItem", INTAKE),
    ("worker.devtools.bench", "", HARNESS),
)
# librdkafka's adapter commits on a thread of its own (a bounded synchronous commit).
_COMMIT_THREAD: Final = "kafka-commit"
# Frames that say the whole stack is outside the steady state, wherever they are.
_PHASES: Final[tuple[tuple[str, str, str], ...]] = (
    ("worker.loop.pipeline", "Pipeline.drain", SHUTDOWN),
    ("worker.loop.service", "Clients.close", SHUTDOWN),
)


# Innermost frames of a thread that waits: select, a condition, an event, a future.
_WAITS: Final = frozenset(
    {
        "EpollSelector.select",
        "PollSelector.select",
        "SelectSelector.select",
        "DefaultSelector.select",
        "Condition.wait",
        "Event.wait",
        "Thread.join",
    }
)


def is_waiting(frames: Sequence[Frame]) -> bool:
    """Whether the innermost frame is a wait, whose time is no work (its thread is blocked, or about to)."""
    if not frames:
        return False
    innermost = frames[-1]
    if innermost.function in _WAITS:
        return True
    return innermost.function == "wait" and module_of(innermost.path) == "concurrent.futures._base"


def module_of(path: str) -> str:
    """The dotted module of a source path: ``.../site-packages/kafka/net/selector.py`` is
    ``kafka.net.selector``; code kafka-python generates at run time (``<codegen_...>``) counts as kafka."""
    if path.startswith("<codegen"):
        return "kafka.codegen"
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            path = path.rsplit(marker, 1)[1]
            break
    else:
        if "/worker/" in path:
            path = "worker/" + path.rsplit("/worker/", 1)[1]
        elif "/python3." in path:
            path = path.rsplit("/python3.", 1)[1].partition("/")[2]  # the standard library
    return path.removesuffix(".py").replace("/", ".")


def classify(frames: Sequence[Frame], thread_name: str) -> tuple[str, bool]:
    """The stage of a stack (outermost frame first), and whether its time is kafka-python's own."""
    modules = [module_of(frame.path) for frame in frames]
    for module, frame in zip(modules, frames, strict=True):
        phase = _match(_PHASES, module, frame.function)
        if phase is not None:
            return phase, False
    if any(m == "worker.loop.service" for m in modules) and not any(
        f.function == "Pipeline.run" for f in frames
    ):
        return STARTUP, False
    if thread_name.startswith(_COMMIT_THREAD):
        return COMMIT, False
    for index in range(len(frames) - 1, -1, -1):
        module = modules[index]
        if _is_kafka(module):
            return _kafka_stage(frames, modules, thread_name), True
        stage = _match(_RULES, module, frames[index].function)
        if stage is not None:
            return stage, False
    return (HARNESS if thread_name in HARNESS_THREADS else OTHER), False


def _match(rules: Sequence[tuple[str, str, str]], module: str, function: str) -> str | None:
    for prefix, name, stage in rules:
        if (module == prefix or module.startswith(prefix + ".")) and function.startswith(name):
            return stage
    return None


def _is_kafka(module: str) -> bool:
    return module == "kafka" or module.startswith("kafka.")


def _kafka_stage(frames: Sequence[Frame], modules: Sequence[str], thread_name: str) -> str:
    """kafka-python's time, by what it was asked to do: its outermost frame (and thread) says."""
    outer = next(i for i, m in enumerate(modules) if _is_kafka(m))
    module, function = modules[outer], frames[outer].function
    if any(m.startswith("kafka.coordinator") for m in modules[outer:]):
        return COMMIT if _in_commit(frames) else GROUP
    if module.startswith("kafka.producer.sender"):
        return PRODUCER_IO
    if module.startswith("kafka.producer"):
        return SEND
    if module.startswith("kafka.consumer"):
        return COMMIT if _in_commit(frames) else POLL
    if module.startswith("kafka.net") or thread_name.startswith("kafka-io"):
        return POLL_IO
    if function.startswith("TopicPartition") or module.startswith("kafka.structs"):
        return _caller_stage(frames[:outer], modules[:outer], thread_name)
    return OTHER


def _in_commit(frames: Sequence[Frame]) -> bool:
    return any(f.function.startswith(("Pipeline.commit", "KafkaConsumer.commit")) for f in frames)


def _caller_stage(frames: Sequence[Frame], modules: Sequence[str], thread_name: str) -> str:
    """The stage of whoever called into kafka-python for a small helper (a ``TopicPartition``)."""
    for index in range(len(frames) - 1, -1, -1):
        stage = _match(_RULES, modules[index], frames[index].function)
        if stage is not None:
            return stage
    return OTHER
