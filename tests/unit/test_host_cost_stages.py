"""The host-cost bench's reading of py-spy's output and its stage map: a stack lands in the stage of the
worker code it serves, and kafka-python's time in the stage of what the client was asked to do."""

from collections import Counter

from worker.devtools.bench import stages
from worker.devtools.bench.host_cost import HostCostWork, _breakdown, _Outcome, padded_tiny_jpeg
from worker.devtools.bench.report import host_cost_table
from worker.devtools.bench.sampler import Frame, Stack, parse_raw
from worker.imaging.host import ImageLimits, Preprocessing, prepare

SITE = "/venv/lib/python3.11/site-packages/"
REPO = "/src/clip-worker/worker/"
STDLIB = "/usr/lib/python3.11/"
LOOP = [
    Frame("Thread._bootstrap", STDLIB + "threading.py"),
    Frame("WorkerRun._run", REPO + "bench/worker_run.py"),
    Frame("run_worker", REPO + "loop/service.py"),
    Frame("Pipeline.run", REPO + "loop/pipeline.py"),
    Frame("Pipeline.step", REPO + "loop/pipeline.py"),
]


def stage(*frames: Frame, thread: str = "bench-worker") -> tuple[str, bool]:
    return stages.classify(list(frames), thread)


def test_modules_are_named_from_paths_inside_and_outside_site_packages():
    assert stages.module_of(SITE + "kafka/net/selector.py") == "kafka.net.selector"
    assert stages.module_of(REPO + "output/offsets.py") == "worker.output.offsets"
    assert stages.module_of(STDLIB + "concurrent/futures/thread.py") == "concurrent.futures.thread"
    assert stages.module_of("<codegen_decode:fetch_response_v12>") == "kafka.codegen"


def test_worker_code_takes_the_stage_of_its_innermost_named_frame():
    accept = Frame("Pipeline._accept", REPO + "loop/pipeline.py")
    decode = Frame("decode_request", REPO + "messages.py")
    dataclass_init = Frame("__create_fn__.<locals>.__init__", "<string>")
    assert stage(*LOOP, accept, decode, dataclass_init) == (stages.ENVELOPE, False)
    assert stage(*LOOP, accept, dataclass_init) == (stages.INTAKE, False)
    track = Frame("OffsetTracker.track", REPO + "output/offsets.py")
    assert stage(*LOOP, accept, track) == (stages.ACK, False)
    inc = Frame("MutexValue.inc", SITE + "prometheus_client/values.py")
    assert stage(*LOOP, accept, inc) == (stages.METRICS, False)


def test_kafka_time_goes_to_what_the_client_was_asked_to_do():
    poll = Frame("Pipeline._poll", REPO + "loop/pipeline.py")
    consumer_poll = Frame("KafkaConsumer.poll", SITE + "kafka/consumer/group.py")
    parse = Frame("DefaultRecordBatch._read_msg", SITE + "kafka/record/default_records.py")
    assert stage(*LOOP, poll, consumer_poll, parse) == (stages.POLL, True)
    coordinator = Frame("BaseCoordinator.poll", SITE + "kafka/coordinator/base.py")
    assert stage(*LOOP, poll, consumer_poll, coordinator) == (stages.GROUP, True)
    send = Frame("KafkaProducer.send", SITE + "kafka/producer/kafka.py")
    append = Frame("DefaultRecordBatchBuilder.append", SITE + "kafka/record/default_records.py")
    publish = Frame("InferenceStage._publish", REPO + "inference/stage.py")
    assert stage(publish, Frame("send", REPO + "work.py"), send, append, thread="inference") == (
        stages.SEND,
        True,
    )
    selector = Frame("NetworkSelector.run_forever", SITE + "kafka/net/selector.py")
    buffer = Frame("KafkaBytes.write", SITE + "kafka/protocol/frame.py")
    assert stage(selector, buffer, thread="kafka-io-clip-worker") == (stages.POLL_IO, True)


def test_callbacks_on_the_producer_thread_are_acknowledgement_tracking():
    sender = Frame("Sender.run", SITE + "kafka/producer/sender.py")
    success = Frame("Future.success", SITE + "kafka/future.py")
    delivered = Frame("send.<locals>.delivered", REPO + "work.py")
    ack = Frame("OffsetTracker.ack", REPO + "output/offsets.py")
    assert stage(sender, success, delivered, ack, thread="net") == (stages.ACK, False)
    assert stage(sender, success, thread="net") == (stages.PRODUCER_IO, True)


def test_start_up_shutdown_and_the_bench_are_left_out():
    connect = Frame("KafkaConsumer.__init__", SITE + "kafka/consumer/group.py")
    assert stage(*LOOP[:3], connect)[0] == stages.STARTUP
    assert stage(*LOOP[:4], Frame("Pipeline.drain", REPO + "loop/pipeline.py"))[0] == stages.SHUTDOWN
    assert stage(Frame("sleep", STDLIB + "time.py"), thread="MainThread")[0] == stages.HARNESS
    for left_out in stages.LEFT_OUT_STAGES:
        assert left_out not in stages.HOST_STAGES


def test_raw_output_with_thread_names_is_read_back():
    text = (
        "thread (4242): decode_0;_worker (/usr/lib/python3.11/concurrent/futures/thread.py:83);"
        "prepare (/src/worker/images.py:300) 7\n"
        "thread (4243);Thread._bootstrap (/usr/lib/python3.11/threading.py:1002) 2\n"
        "garbage\n"
    )
    stacks = parse_raw(text)
    assert sum(stacks.values()) == 9
    first = next(s for s in stacks if s.thread_id == 4242)
    assert first.thread_name == "decode_0"
    assert first.frames[-1] == Frame("prepare", "/src/worker/images.py")


def test_the_stand_in_image_has_the_payload_size_and_decodes_as_a_thumbnail():
    data = padded_tiny_jpeg(80_000)
    assert abs(len(data) - 80_000) <= 4
    pixels = prepare(data, ImageLimits(), Preprocessing(resize="device"))
    assert getattr(pixels, "shape", None) == (8, 8, 3)


def test_cpu_is_split_by_samples_waits_left_out_and_gil_is_bounded_by_cpu():
    accept = Frame("Pipeline._accept", REPO + "loop/pipeline.py")
    decode = Frame("decode_request", REPO + "messages.py")
    wait = Frame("Condition.wait", STDLIB + "threading.py")
    main = 11
    envelope = Stack(main, "bench-worker", (*LOOP, accept, decode))
    intake = Stack(main, "bench-worker", (*LOOP, accept))
    waiting = Stack(main, "bench-worker", (*LOOP, wait))
    work = HostCostWork(images=100, sample_rate=100)  # one sample = 10 ms = 100 us per image
    # 4 ms of kernel CPU on the loop thread, sampled 3:1 envelope:intake (and 50 waits, which take none).
    on_cpu = _Outcome(
        500.0, {main: ("bench-worker", 4_000_000)}, Counter({envelope: 3, intake: 1, waiting: 50})
    )
    on_gil = _Outcome(500.0, {}, Counter({envelope: 1, intake: 1}))
    facts = _breakdown(on_cpu, on_gil, work, unprofiled_rate=1000.0)
    rows = {row["stage"]: row for row in facts["stages"]}
    assert rows[stages.ENVELOPE]["cpu_us"] == 30.0 and rows[stages.INTAKE]["cpu_us"] == 10.0
    assert rows[stages.ENVELOPE]["gil_us"] == 100.0 and rows[stages.ENVELOPE]["gil_on_cpu_us"] == 30.0
    assert facts["host"] == {"cpu_us": 40.0, "gil_us": 200.0, "gil_on_cpu_us": 40.0}
    assert facts["implied_ceiling_images_per_s"] == 5000.0
    assert facts["implied_ceiling_on_cpu_images_per_s"] == 25000.0
    assert facts["cross_check"]["gil_busy_at_unprofiled_rate"] == 0.2
    facts.update(unprofiled_images_per_s=1000.0)
    table = "\n".join(host_cost_table(facts))
    assert f"| {stages.ENVELOPE} | 30.0 | 100.0 | 30.0 | 50% |" in table


def test_librdkafka_adapter_time_goes_to_the_stage_it_stands_for():
    rdk = REPO + "kafka_io/librdkafka/"
    poll = Frame("Pipeline._poll", REPO + "loop/pipeline.py")
    adapter_poll = Frame("ConsumerAdapter.poll", rdk + "consumer.py")
    assert stage(*LOOP, poll, adapter_poll, Frame("read", rdk + "consumer.py")) == (stages.POLL, False)
    listener = Frame("_RebalanceListener.on_partitions_assigned", REPO + "loop/pipeline.py")
    assigned = Frame("ConsumerAdapter.subscribe.<locals>.assigned", rdk + "consumer.py")
    assert stage(*LOOP, poll, adapter_poll, assigned) == (stages.GROUP, False)
    assert stage(*LOOP, poll, adapter_poll, assigned, listener) == (stages.GROUP, False)
    publish = Frame("InferenceStage._publish", REPO + "inference/stage.py")
    send = Frame("ProducerAdapter.send", rdk + "producer.py")
    assert stage(publish, Frame("send", REPO + "work.py"), send, thread="inference") == (stages.SEND, False)
    serve = [
        Frame("Thread._bootstrap", STDLIB + "threading.py"),
        Frame("ProducerAdapter._serve", rdk + "producer.py"),
    ]
    report = Frame("Delivery.report", rdk + "producer.py")
    delivered = Frame("Publisher.delivered", REPO + "output/publisher.py")
    reports = "kafka-delivery-reports"
    assert stage(*serve, thread=reports) == (stages.PRODUCER_IO, False)
    assert stage(*serve, report, thread=reports) == (stages.ACK, False)
    assert stage(*serve, report, delivered, thread=reports) == (stages.ACK, False)
    pool = [
        Frame("Thread._bootstrap", STDLIB + "threading.py"),
        Frame("_worker", STDLIB + "concurrent/futures/thread.py"),
        Frame("_WorkItem.run", STDLIB + "concurrent/futures/thread.py"),
        Frame("ConsumerAdapter._call", rdk + "consumer.py"),
    ]
    assert stage(*pool, thread="kafka-commit_0") == (stages.COMMIT, False)
    assert stage(*pool, thread="intake_0") == (stages.INTAKE, False)


def test_librdkafka_native_threads_are_a_host_stage_of_their_own():
    work = HostCostWork(images=100, sample_rate=100)
    outcome = _Outcome(100.0, {7: ("rdk:broker1", 3_000_000), 8: ("bench-worker", 1_000_000)}, Counter())
    facts = _breakdown(outcome, outcome, work, 100.0)
    native = next(row for row in facts["stages"] if row["stage"] == stages.NATIVE_CLIENT)
    assert native["cpu_us"] == 30.0  # 3 ms over 100 images
    assert native["gil_us"] == 0.0
    assert facts["host"]["cpu_us"] >= 30.0
