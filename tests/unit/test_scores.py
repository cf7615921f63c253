"""Score heads: equal to references written from the published architectures, loaded from the published
formats, refused for embeddings they were not trained on; the settings that ask for them; routing."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.fake_kafka import FakeConsumer, FakeProducer
from tests.support.schemas import validate_msgpack
from tests.support.score_heads import (
    REFERENCES,
    load_state,
    random_state,
    reference_aesthetic,
    save_random_heads,
    unit_vectors,
)
from worker.cli import build_parser, settings_from_args
from worker.config import SCORE_NAMES, Settings, load_settings
from worker.errors import ModelLoadError, StartupError
from worker.inference.embedder import Embedder
from worker.inference.scores import load_score_heads
from worker.messages import Request, Source, decode_embedding
from worker.models.checkpoint import RANDOM_PREFIX, ModelSpec
from worker.models.heads import HEADS, ScoreHeads, check_trained_on, load_head
from worker.ops.metrics import WorkerMetrics
from worker.output.delivery import AtLeastOnce, ExactlyOnce
from worker.output.offsets import OffsetTracker
from worker.output.publisher import Publisher
from worker.output.topic_limits import TopicLimits
from worker.work import InputRecord

# float32 on the device against float64 numpy.
TOLERANCE = 1e-5


def settings(**values: object) -> Settings:
    return load_settings({"device": "cpu", **values}, environ={})


def test_every_score_name_has_a_head_and_the_published_keys():
    assert set(HEADS) == set(SCORE_NAMES)
    assert sorted(HEADS["aesthetic"]().state_dict()) == sorted(
        f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")
    )
    assert sorted(HEADS["nsfw"]().state_dict()) == sorted(
        ["norm.mean", "norm.variance"] + [f"linear_{i}.{p}" for i in range(1, 5) for p in ("weight", "bias")]
    )


@pytest.mark.parametrize("name", SCORE_NAMES)
def test_each_head_equals_its_reference_on_random_weights(tmp_path: Path, name: str):
    locations = save_random_heads(tmp_path)
    loaded = load_head(name, ModelSpec(model=str(locations[name])), f"--{name}-head")
    embeddings = unit_vectors(64)
    with torch.inference_mode():
        ours = loaded.head(torch.from_numpy(embeddings)).numpy()
    reference = REFERENCES[name](load_state(locations[name]), embeddings)
    assert ours.shape == (64,)
    assert np.abs(ours - reference).max() < TOLERANCE
    assert reference.std() > 0.01, "random weights that score every image alike would prove nothing"
    assert loaded.label == str(locations[name])


def test_the_nsfw_head_loads_from_the_zip_it_is_published_in(tmp_path: Path):
    pth = save_random_heads(tmp_path)["nsfw"]
    archive = tmp_path / "clip_autokeras_binary_nsfw.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.write(pth, "clip_autokeras_binary_nsfw.pth")
    from_zip = load_head("nsfw", ModelSpec(model=str(archive)), "--nsfw-head").head
    from_pth = load_head("nsfw", ModelSpec(model=str(pth)), "--nsfw-head").head
    for key, value in from_pth.state_dict().items():
        assert torch.equal(value, from_zip.state_dict()[key])


def test_a_directory_with_a_pth_and_a_safetensors_file_prefers_the_hub_file(tmp_path: Path):
    state = random_state("aesthetic", 3)
    torch.save({k: v * 0 for k, v in state.items()}, tmp_path / "other.pth")
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "model.safetensors"))
    head = load_head("aesthetic", ModelSpec(model=str(tmp_path)), "--aesthetic-head").head
    assert torch.equal(head.state_dict()["layers.0.weight"], state["layers.0.weight"])


def _one_line_error(name: str, spec: ModelSpec) -> str:
    with pytest.raises(ModelLoadError) as caught:
        load_head(name, spec, f"--{name}-head")
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_the_keras_savedmodel_is_refused_with_the_format_that_works(tmp_path: Path):
    archive = tmp_path / "clip_autokeras_binary_nsfw.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("clip_autokeras_binary_nsfw/saved_model.pb", b"\x08\x01")
        out.writestr("clip_autokeras_binary_nsfw/variables/variables.index", b"")
    message = _one_line_error("nsfw", ModelSpec(model=str(archive)))
    assert (
        "TensorFlow" in message and "clip_autokeras_binary_nsfw.pth" in message and "--nsfw-head" in message
    )


def test_weights_of_another_head_are_refused_naming_the_keys(tmp_path: Path):
    torch.save(random_state("nsfw", 1), tmp_path / "nsfw.pth")
    message = _one_line_error("aesthetic", ModelSpec(model=str(tmp_path / "nsfw.pth")))
    assert "missing key" in message and "layers.0.bias" in message and "--aesthetic-head" in message


def test_weights_of_the_wrong_shape_are_refused(tmp_path: Path):
    state = random_state("aesthetic", 1)
    state["layers.0.weight"] = state["layers.0.weight"][:, :512]
    torch.save(state, tmp_path / "small.pth")
    assert "does not fit" in _one_line_error("aesthetic", ModelSpec(model=str(tmp_path / "small.pth")))


def test_a_pickle_with_code_is_not_executed(tmp_path: Path):
    torch.save({"layers": torch.nn.Linear(2, 2)}, tmp_path / "module.pth")
    assert "cannot read" in _one_line_error("aesthetic", ModelSpec(model=str(tmp_path / "module.pth")))


def test_missing_locations_and_offline_hub_ids_are_refused_in_one_line(tmp_path: Path):
    assert "no such file" in _one_line_error("aesthetic", ModelSpec(model=str(tmp_path / "absent.pth")))
    assert "holds no" in _one_line_error("aesthetic", ModelSpec(model=str(tmp_path)))
    offline = ModelSpec(model="owner/not-cached", model_dir=tmp_path, local_files_only=True)
    message = _one_line_error("aesthetic", offline)
    assert "--aesthetic-head" in message and "--random-weights" in message


def test_random_weights_need_no_files_and_say_so():
    first = load_head("aesthetic", ModelSpec(model="owner/absent", random_weights=True), "--aesthetic-head")
    again = load_head("aesthetic", ModelSpec(model="owner/absent", random_weights=True), "--aesthetic-head")
    assert first.label == RANDOM_PREFIX + "owner/absent"
    for key, value in first.head.state_dict().items():
        assert torch.equal(value, again.head.state_dict()[key]), "random heads are the same in every run"


@pytest.mark.parametrize(
    ("family", "dim"), [("SigLIP", 768), ("CLIP", 512), ("CLIP", 1024)], ids=["siglip", "b16", "h14"]
)
@pytest.mark.parametrize("name", SCORE_NAMES)
def test_heads_are_refused_for_embeddings_they_were_not_trained_on(name: str, family: str, dim: int):
    with pytest.raises(ModelLoadError) as caught:
        check_trained_on(name, family, dim)
    message = str(caught.value)
    assert "\n" not in message
    assert "openai/clip-vit-large-patch14" in message and f"--score {name}" in message


def test_the_worker_refuses_scores_for_a_model_of_another_size_before_reading_weights(
    tiny_embedder: Embedder, tmp_path: Path
):
    asked = settings(score="aesthetic", aesthetic_head=str(tmp_path / "never-read.pth"))
    with pytest.raises(ModelLoadError, match="embeds CLIP 32-d"):
        load_score_heads(asked, tiny_embedder)


def test_the_nsfw_head_has_no_hub_default_and_says_where_to_get_it(tiny_clip_768_embedder: Embedder):
    with pytest.raises(ModelLoadError) as caught:
        load_score_heads(settings(score="nsfw"), tiny_clip_768_embedder)
    assert "--nsfw-head" in str(caught.value) and "clip_autokeras_binary_nsfw.zip" in str(caught.value)
    heads = load_score_heads(settings(score="nsfw", random_weights=True), tiny_clip_768_embedder)
    assert heads is not None and heads.labels == {"nsfw": RANDOM_PREFIX + "nsfw"}


def test_no_scores_no_heads(tiny_embedder: Embedder):
    assert load_score_heads(settings(), tiny_embedder) is None


def test_scores_come_from_the_same_pass_as_the_embeddings(tiny_clip_768_embedder: Embedder, tmp_path: Path):
    locations = save_random_heads(tmp_path)
    asked = settings(
        score="nsfw,aesthetic", aesthetic_head=str(locations["aesthetic"]), nsfw_head=str(locations["nsfw"])
    )
    heads = load_score_heads(asked, tiny_clip_768_embedder)
    assert heads is not None and heads.names == ("nsfw", "aesthetic")
    crop = tiny_clip_768_embedder.preprocessing.crop
    pixels = np.random.default_rng(1).standard_normal((5, 3, crop, crop)).astype(np.float32)
    pending = tiny_clip_768_embedder.launch(pixels, heads)
    vectors = pending.result()
    scores = pending.scores()
    assert scores is not None and scores.shape == (5, 2) and scores.dtype == np.float32
    np.testing.assert_array_equal(vectors, tiny_clip_768_embedder.embed(pixels))
    for column, name in enumerate(heads.names):
        expected = REFERENCES[name](load_state(locations[name]), vectors)
        assert np.abs(scores[:, column] - expected).max() < TOLERANCE
    assert heads.named(scores[0]) == {"nsfw": float(scores[0, 0]), "aesthetic": float(scores[0, 1])}
    assert tiny_clip_768_embedder.launch(pixels).scores() is None


def test_heads_run_once_per_batch(tiny_clip_768_embedder: Embedder):
    heads = load_score_heads(settings(score="aesthetic", random_weights=True), tiny_clip_768_embedder)
    assert isinstance(heads, ScoreHeads)
    calls: list[int] = []
    head = heads._heads[0]
    handle = head.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    try:
        crop = tiny_clip_768_embedder.preprocessing.crop
        tiny_clip_768_embedder.launch(np.zeros((7, 3, crop, crop), np.float32), heads).result()
    finally:
        handle.remove()
    assert calls == [7]


# ---------------------------------------------------------------- settings


def test_scores_are_a_comma_list_or_repeated_flags_or_the_environment():
    parser = build_parser()
    repeated = settings_from_args(parser.parse_args(["run", "--score", "aesthetic", "--score", "nsfw"]))
    listed = settings_from_args(parser.parse_args(["run", "--score", "aesthetic,nsfw"]))
    assert repeated.score == listed.score == ("aesthetic", "nsfw")
    from_env = load_settings({}, environ={"CLIP_WORKER_SCORE": "nsfw, aesthetic,nsfw"})
    assert from_env.score == ("nsfw", "aesthetic")
    assert load_settings({}, environ={}).score == ()


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"score": "beauty"}, "unknown score 'beauty'; choose from aesthetic, nsfw"),
        ({"route_nsfw_above": 0.5}, "add --score nsfw"),
        ({"score": "aesthetic", "route_nsfw_above": 0.5}, "add --score nsfw"),
        ({"score": "nsfw", "route_nsfw_above": 1.5}, "--route-nsfw-above"),
        ({"score": "nsfw", "route_nsfw_above": -0.1}, "--route-nsfw-above"),
        ({"score": "nsfw", "nsfw_topic": "adult"}, "only applies with --route-nsfw-above"),
        ({"score": "nsfw", "route_nsfw_above": 0.5, "nsfw_topic": "images.dlq"}, "must differ"),
        ({"score": "nsfw", "route_nsfw_above": 0.5, "nsfw_topic": "bad topic"}, "--nsfw-topic"),
    ],
)
def test_score_settings_are_checked_at_start_up(values: dict[str, object], fragment: str):
    with pytest.raises(StartupError) as caught:
        load_settings(values, environ={})
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_nsfw_topic_is_listed_with_the_other_output_topics():
    plain = load_settings({"output_topic": "out"}, environ={})
    assert plain.nsfw_output_topic is None
    assert plain.output_topics() == [("--output-topic", "out"), ("--dlq-topic", "images.dlq")]
    routed = load_settings({"output_topic": "out", "score": "nsfw", "route_nsfw_above": 0.8}, environ={})
    assert routed.nsfw_output_topic == "out.nsfw"
    assert ("--nsfw-topic", "out.nsfw") in routed.output_topics()
    named = load_settings({"score": "nsfw", "route_nsfw_above": 0.8, "nsfw_topic": "adult"}, environ={})
    assert named.nsfw_output_topic == "adult"


# ---------------------------------------------------------------- publishing and routing


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
def test_outputs_over_the_threshold_go_to_the_nsfw_topic_and_are_acknowledged(exactly_once: bool):
    values = {"output_topic": "out", "score": "nsfw,aesthetic", "route_nsfw_above": 0.7}
    config = load_settings({**values, "exactly_once": exactly_once}, environ={})
    producer, tracker, metrics = FakeProducer(), OffsetTracker(), WorkerMetrics()
    delivery: AtLeastOnce | ExactlyOnce
    if exactly_once:
        delivery = ExactlyOnce(producer, FakeConsumer(), tracker, metrics, TopicLimits(), timeout_s=5.0)
    else:
        delivery = AtLeastOnce(producer, FakeConsumer(), tracker, metrics)
    publisher = Publisher(config, delivery, tracker, metrics, "tiny")
    vector = np.full(4, 0.5, np.float32)
    given = {0: 0.2, 1: 0.7, 2: 0.71, 3: 0.99}
    for offset, nsfw in given.items():
        record = InputRecord(Source("images", 0, offset), None, b"x", [], 0, 0.0)
        tracker.assign({record.partition})
        tracker.track(record.partition, offset)
        if isinstance(delivery, ExactlyOnce):
            delivery.transactions.expect(record.partition, offset)
        publisher.embedding(
            record, Request(id=f"r{offset}", image=b"x"), vector, {"nsfw": nsfw, "aesthetic": 5.0}
        )
    values_sent = [sent.value for sent in producer.sent if sent.value is not None]
    assert len(values_sent) == len(producer.sent) == len(given)
    topics = {
        decode_embedding(value)["id"]: sent.topic
        for value, sent in zip(values_sent, producer.sent, strict=True)
    }
    assert topics == {"r0": "out", "r1": "out", "r2": "out.nsfw", "r3": "out.nsfw"}, "above, not at, T"
    for value in values_sent:
        assert validate_msgpack(value, "image-embedding.schema.json")["scores"]["aesthetic"] == 5.0
    for future in producer.futures:
        future.success()
    assert metrics.nsfw_routed._value.get() == 2
    assert metrics.published._value.get() == 4
    assert list(tracker.committable().values()) == [len(given)], "every routed record is acknowledged"


def test_a_record_without_scores_has_no_scores_field():
    config = load_settings({"output_topic": "out"}, environ={})
    producer, tracker, metrics = FakeProducer(), OffsetTracker(), WorkerMetrics()
    publisher = Publisher(
        config, AtLeastOnce(producer, FakeConsumer(), tracker, metrics), tracker, metrics, "m"
    )
    record = InputRecord(Source("images", 0, 0), None, b"x", [], 0, 0.0)
    publisher.embedding(record, Request(id="r", image=b"x"), np.full(4, 0.5, np.float32))
    value = producer.sent[0].value
    assert value is not None and "scores" not in validate_msgpack(value, "image-embedding.schema.json")


def test_reference_is_not_the_identity():
    # The references themselves are checked to read their weights: other weights, other scores.
    embeddings = unit_vectors(8)
    first = reference_aesthetic(
        {k: v.double().numpy() for k, v in random_state("aesthetic", 1).items()}, embeddings
    )
    second = reference_aesthetic(
        {k: v.double().numpy() for k, v in random_state("aesthetic", 2).items()}, embeddings
    )
    assert np.abs(first - second).max() > 0.01


def test_the_run_command_refuses_a_head_for_another_model_before_any_broker(
    tiny_clip_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    from worker.cli import main
    from worker.errors import ExitCode

    monkeypatch.setattr("worker.cli.configure_logging", lambda *_args: None)
    argv = ["run", "--model", str(tiny_clip_dir), "--device", "cpu", "--score", "nsfw", "--random-weights"]
    argv += ["--metrics-port", "0", "--bootstrap-servers", "127.0.0.1:9", "--connect-timeout-s", "1"]
    assert main(argv) == ExitCode.STARTUP
    err = capsys.readouterr().err
    # An earlier test's log handler may write start-up log lines (or its own closed-stream complaint) to
    # stderr too: what matters is the one error line.
    [line] = [line for line in err.splitlines() if line.startswith("clip-worker: error:")]
    assert line.startswith("clip-worker: error: --score nsfw: the nsfw head was trained on ")
    assert "use --model openai/clip-vit-large-patch14" in line


def test_a_missing_nsfw_topic_stops_start_up_naming_its_flag():
    from worker.kafka_io import check_output_topics

    config = load_settings({"output_topic": "out", "score": "nsfw", "route_nsfw_above": 0.5}, environ={})
    check_output_topics(FakeProducer(), config)
    with pytest.raises(StartupError, match=r"topic 'out.nsfw' does not exist .*fix --nsfw-topic"):
        check_output_topics(FakeProducer(missing_topics={"out.nsfw"}), config)
